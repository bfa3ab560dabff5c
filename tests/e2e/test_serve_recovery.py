"""`afina serve` as a user runs it (embedded default: SQLite, the SQLite broker, a worker
child) getting over a lost worker and over its own restarts:
- its worker child killed with SIGKILL in the middle of training: serve starts another, the
  reconciler (in the API) sees the job's heartbeat stop and queues it again, and the new
  worker resumes it from its last checkpoint; the job succeeds with every step's metrics;
- a job that keeps losing its worker ends `failed` (`worker_lost`) after AFINA_MAX_ATTEMPTS;
- stopping `afina serve` and starting it again on the same data dir loses no job, running or
  queued, and a job queued while no worker runs starts when one comes;
- serve's supervisor keeps trying when a worker cannot even be started, and starts none once
  it is stopping."""

import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from afina.cli import main as cli
from afina.core.settings import Settings
from afina.core.storage import resume_key
from afina.models import Job, JobStatus
from tests.e2e.test_training import arithmetic, create_job, messages, upload_id
from tests.e2e.test_worker_shutdown import wait_until
from tests.support import afina_serve, child_pids, rows

WORKER_TIMEOUT = 6  # seconds without a heartbeat before the reconciler takes a job back
# A job of a few seconds, slow enough to be caught in the middle: 50 steps (a metric point
# for every step) of 24 examples each.
STEPS, SAVE_EVERY = 50, 10
SLOW_STEPS = {"batch_size": 4}
TRAINING = {"max_steps": STEPS, "save_steps": SAVE_EVERY, "gradient_accumulation_steps": 6}


@contextmanager
def serve(workdir: Path, *args: str, **env: str) -> Iterator[tuple[httpx.Client, int]]:
    """`afina serve` in `workdir`, a short worker timeout, `env` added: a client on it and
    its pid. It must stop cleanly."""
    env = {"AFINA_WORKER_TIMEOUT_SECONDS": str(WORKER_TIMEOUT), **env}
    with (
        afina_serve(workdir, *args, env=env) as (base, server),
        httpx.Client(base_url=base, timeout=30) as client,
    ):
        yield client, server.pid
    assert server.returncode == 0, log(workdir)


def log(workdir: Path) -> str:
    return (workdir / "serve.log").read_text(errors="replace")[-6000:]


def new_job(api: httpx.Client, model: Path, steps: int = STEPS) -> str:
    training = upload_id(api, arithmetic(64, seed=8))
    return create_job(
        api,
        model=str(model),
        training_file=training,
        seed=4,
        hyperparameters=SLOW_STEPS,
        training={**TRAINING, "max_steps": steps},
    )["id"]


def job(api: httpx.Client, job_id: str) -> dict:
    return api.get(f"/v1/fine_tuning/jobs/{job_id}").json()


def wait_for_status(api: httpx.Client, job_id: str, workdir: Path, *statuses: str) -> dict:
    wait_until(
        lambda: job(api, job_id)["status"] in statuses,
        180,
        f"job {job_id} never became {statuses}:\n{log(workdir)}",
    )
    return job(api, job_id)


def the_worker(serve_pid: int, workdir: Path, other_than: tuple[int, ...] = ()) -> int:
    """The pid of serve's worker child, waiting for one that is not in `other_than`."""
    found: list[int] = []

    def started() -> bool:
        found[:] = [pid for pid in child_pids(serve_pid) if pid not in other_than]
        return len(found) == 1

    wait_until(started, 60, f"afina serve runs no new worker child:\n{log(workdir)}")
    return found[0]


def kill_after(api: httpx.Client, job_id: str, worker: int, step: int, workdir: Path) -> int:
    """SIGKILL the worker once the job has done `step` steps; the steps done by then."""
    wait_until(
        lambda: job(api, job_id)["progress"]["steps_done"] >= step,
        120,
        f"job {job_id} never reached step {step}:\n{log(workdir)}",
    )
    os.kill(worker, signal.SIGKILL)
    return job(api, job_id)["progress"]["steps_done"]


def metric_steps(api: httpx.Client, job_id: str) -> list[int]:
    series = api.get(f"/v1/fine_tuning/jobs/{job_id}/metrics").json()["data"]
    return [point["step"] for point in series]


def stored_job(workdir: Path, job_id: str) -> Job:
    """The job's row, read from the data dir's database while no serve runs."""
    settings = Settings(
        _env_file=None,
        data_dir=workdir / "data",
        database_url=f"sqlite:///{workdir / 'data' / 'afina.db'}",
    )
    (row,) = [row for row in rows(settings, Job) if row.id == job_id]
    return row


def test_serve_restarts_a_killed_worker_and_the_job_resumes_from_its_checkpoint(
    tmp_path, demo_model
):
    with serve(tmp_path) as (api, serve_pid):
        first = the_worker(serve_pid, tmp_path)
        job_id = new_job(api, demo_model)
        at_kill = kill_after(api, job_id, first, SAVE_EVERY + 2, tmp_path)

        second = the_worker(serve_pid, tmp_path, other_than=(first,))
        wait_until(
            lambda: any(m.startswith("Worker lost") for m in messages(api, job_id)),
            10 * WORKER_TIMEOUT,
            f"the reconciler never took the job back:\n{log(tmp_path)}",
        )
        final = wait_for_status(api, job_id, tmp_path, "succeeded", "failed", "cancelled")
        assert final["status"] == "succeeded", final["error"]
        assert final["progress"]["steps_done"] == STEPS
        assert child_pids(serve_pid) == [second]  # the new worker stays up, idle

        events = messages(api, job_id)
        (lost,) = [m for m in events if m.startswith("Worker lost")]
        resume_step = int(lost.split("to resume from step ")[1].split()[0])
        assert resume_step % SAVE_EVERY == 0
        assert SAVE_EVERY <= resume_step <= at_kill
        assert "(worker lost 1 time(s); the job fails at 3)" in lost
        # serve saw its worker die and took the job back at once, not after the timeout.
        assert "(its worker process ended)" in lost
        after_loss = events[events.index(lost) :]
        assert "Job started (attempt 2)" in after_loss
        assert f"Resuming from the checkpoint saved at step {resume_step}" in after_loss
        assert any(
            m.startswith(f"Training resumed at step {resume_step} of {STEPS}") for m in after_loss
        )
        assert not any(m.startswith("Training started") for m in after_loss)
        assert events[-1].startswith("Job succeeded")
        assert metric_steps(api, job_id) == list(range(1, STEPS + 1))
    # What the user running serve sees of it.
    assert (
        f"the training worker (pid {first}) was killed by SIGKILL"
        in (tmp_path / "serve.log").read_text()
    )
    row = stored_job(tmp_path, job_id)
    assert (row.attempts, row.lost_workers) == (2, 1)
    assert not (tmp_path / "data" / "artifacts" / resume_key(job_id)).exists()


def test_a_job_that_keeps_losing_its_worker_fails_after_max_attempts(tmp_path, demo_model):
    with serve(tmp_path, AFINA_MAX_ATTEMPTS="2") as (api, serve_pid):
        first = the_worker(serve_pid, tmp_path)
        job_id = new_job(api, demo_model)
        kill_after(api, job_id, first, SAVE_EVERY + 2, tmp_path)

        second = the_worker(serve_pid, tmp_path, other_than=(first,))
        wait_until(
            lambda: any(m.startswith("Training resumed") for m in messages(api, job_id)),
            10 * WORKER_TIMEOUT + 60,
            f"the job never resumed:\n{log(tmp_path)}",
        )
        kill_after(api, job_id, second, SAVE_EVERY + 1, tmp_path)

        failed = wait_for_status(api, job_id, tmp_path, "failed", "succeeded", "cancelled")
        assert failed["status"] == "failed"
        assert failed["error"]["code"] == "worker_lost"
        assert "lost 2 times" in failed["error"]["message"]
        the_worker(serve_pid, tmp_path, other_than=(first, second))  # serve keeps one up

        events = messages(api, job_id)
        lost = [m for m in events if m.startswith("Worker lost")]
        assert len(lost) == 1
        assert "(worker lost 1 time(s); the job fails at 2)" in lost[0]
        assert [m for m in events if m.startswith("Job started")] == [
            "Job started (attempt 1)",
            "Job started (attempt 2)",
        ]
        assert events[-1].startswith("Job failed: the worker running this job was lost 2 times")
    row = stored_job(tmp_path, job_id)
    assert (row.status, row.attempts, row.lost_workers) == (JobStatus.FAILED, 2, 2)
    assert not (tmp_path / "data" / "artifacts" / resume_key(job_id)).exists()


def test_restarting_serve_loses_no_job(tmp_path, demo_model):
    # No worker: the job waits in the queue, and the API stops with it there.
    with serve(tmp_path, "--no-worker") as (api, serve_pid):
        assert child_pids(serve_pid) == []
        running = new_job(api, demo_model)
        assert job(api, running)["status"] == "queued"
    assert stored_job(tmp_path, running).status == JobStatus.QUEUED

    # A worker comes and takes it; serve stops while it trains and another job waits.
    with serve(tmp_path) as (api, serve_pid):
        wait_until(
            lambda: job(api, running)["progress"]["steps_done"] >= 1,
            90,
            f"the queued job never started:\n{log(tmp_path)}",
        )
        waiting = new_job(api, demo_model, steps=2)
    stopped = stored_job(tmp_path, running)
    assert stopped.status == JobStatus.QUEUED
    assert 1 <= stopped.steps_done < STEPS
    assert stored_job(tmp_path, waiting).status == JobStatus.QUEUED

    # Started again: both run to the end, the first from where it stopped.
    with serve(tmp_path) as (api, serve_pid):
        for job_id in (running, waiting):
            final = wait_for_status(api, job_id, tmp_path, "succeeded", "failed", "cancelled")
            assert final["status"] == "succeeded", final["error"]
        events = messages(api, running)
        saved = stopped.steps_done
        shut_down = f"Worker shut down at step {saved}: the job is queued again and resumes from"
        assert f"{shut_down} step {saved}" in events
        assert "Job started (attempt 2)" in events
        assert f"Resuming from the checkpoint saved at step {saved}" in events
        assert not any(m.startswith("Worker lost") for m in events)
        assert metric_steps(api, running) == list(range(1, STEPS + 1))
        assert metric_steps(api, waiting) == [1, 2]
    row = stored_job(tmp_path, running)
    assert (row.attempts, row.lost_workers) == (2, 0)


def test_the_supervisor_keeps_trying_until_a_worker_starts_and_stops_the_last(monkeypatch):
    attempts: list[int] = []
    workers: list[subprocess.Popen[bytes]] = []

    def start_worker(_worker_id: str) -> subprocess.Popen[bytes]:
        # The first worker exits at once, the second cannot be started, the third stays up.
        attempts.append(len(attempts) + 1)
        if len(attempts) == 2:
            raise OSError("no more processes")
        workers.append(subprocess.Popen(["true"] if len(attempts) == 1 else ["sleep", "600"]))
        return workers[-1]

    monkeypatch.setattr(cli, "_start_worker", start_worker)
    monkeypatch.setattr(cli.WorkerSupervisor, "FIRST_DELAY", 0.05)
    deaths: list[str] = []
    supervisor = cli.WorkerSupervisor(deaths.append)
    try:
        wait_until(lambda: len(workers) == 2, 30, "the supervisor gave up starting a worker")
    finally:
        supervisor.stop()
    first, last = workers
    assert first.returncode == 0
    assert last.returncode == -signal.SIGTERM  # stopped with the supervisor
    assert attempts == [1, 2, 3]
    assert len(deaths) == 1  # the first worker's: its job is taken back at once
