"""A worker killed with SIGKILL in the middle of training, on the embedded stack and on
PostgreSQL + Redis: the reconciler (in the API process) sees its heartbeat stop and queues
the job again; the next worker resumes it from its last checkpoint, optimizer and scheduler
state included, from the records the first run tokenized, and it succeeds with the very
results of a run never interrupted."""

from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file

from afina.api.app import create_app
from afina.core.settings import Settings
from afina.core.storage import adapter_key
from afina.models import Job, JobMetric
from afina.models.base import utcnow
from afina.worker.celery_app import TRAIN_QUEUE, create_celery
from tests.e2e.conftest import stack_settings, wait_for_job, worker_process
from tests.e2e.test_training import arithmetic, create_job, messages, upload_id
from tests.e2e.test_worker_shutdown import wait_until
from tests.support import LOCAL, rows

WORKER_TIMEOUT = 6.0
STEPS, SAVE_EVERY = 50, 10  # 50 steps: a metric point for every step


@pytest.fixture
def settings(database_url: str, tmp_path) -> Settings:
    return stack_settings(database_url, tmp_path, worker_timeout_seconds=WORKER_TIMEOUT)


def waiting_messages(settings: Settings) -> int:
    """How many messages wait on the broker's training queue, counted without taking one."""
    celery = create_celery(settings)
    try:
        with celery.connection_for_read() as connection:
            return connection.default_channel.queue_declare(queue=TRAIN_QUEUE).message_count
    finally:
        celery.close()


def adapter_weights(settings: Settings, job_id: str) -> dict:
    artifacts = Path(settings.storage_url) / adapter_key(job_id)
    return load_file(artifacts / "adapter_model.safetensors")


@pytest.mark.both_backends
def test_a_killed_worker_s_job_resumes_from_its_last_checkpoint(settings, demo_model):
    with TestClient(create_app(settings), base_url=LOCAL) as api:
        training = upload_id(api, arithmetic(64, seed=6))
        # 16 steps an epoch, a checkpoint every 10: the resumed run crosses epoch boundaries.
        body = {
            "model": str(demo_model),
            "training_file": training,
            "seed": 3,
            "hyperparameters": {"batch_size": 4},
            "training": {"max_steps": STEPS, "save_steps": SAVE_EVERY, "learning_rate": 3e-3},
        }
        job_id = create_job(api, **body)["id"]

        def job() -> dict:
            return api.get(f"/v1/fine_tuning/jobs/{job_id}").json()

        def curve(job_id: str = job_id) -> dict[int, tuple[float, float]]:
            series = api.get(f"/v1/fine_tuning/jobs/{job_id}/metrics").json()["data"]
            return {point["step"]: (point["loss"], point["grad_norm"]) for point in series}

        assert job()["status"] == "queued"  # no worker yet: it waits for one
        with worker_process(settings) as worker:
            wait_until(
                lambda: job()["progress"]["steps_done"] >= SAVE_EVERY + 5,
                90,
                "training never got past its first checkpoint",
            )
            worker.kill()
            worker.wait()
        killed_at = utcnow()
        steps_at_kill = job()["progress"]["steps_done"]
        first_curve = curve()

        wait_until(lambda: job()["status"] == "queued", 3 * WORKER_TIMEOUT, "never re-queued")
        (lost,) = [m for m in messages(api, job_id) if m.startswith("Worker lost")]
        resume_step = job()["progress"]["steps_done"]
        assert resume_step % SAVE_EVERY == 0
        assert steps_at_kill - SAVE_EVERY - 1 <= resume_step <= steps_at_kill
        assert f"queued again, to resume from step {resume_step}" in lost

        with worker_process(settings):
            final = wait_for_job(api, settings, job_id)
            # The same job never interrupted, for the resumed one to match.
            uninterrupted_id = create_job(api, **body)["id"]
            uninterrupted = wait_for_job(api, settings, uninterrupted_id)
        assert final["status"] == "succeeded", final["error"]
        assert uninterrupted["status"] == "succeeded", uninterrupted["error"]
        assert final["progress"]["steps_done"] == STEPS

        events = messages(api, job_id)
        assert "Job started (attempt 2)" in events
        assert f"Resuming from the checkpoint saved at step {resume_step}" in events
        assert any(
            m.startswith(f"Training resumed at step {resume_step} of {STEPS}") for m in events
        )
        after_loss = events[events.index(lost) :]
        assert not any(m.startswith("Training started") for m in after_loss)
        # The resumed run took the records the first run tokenized.
        assert any(m.startswith("Reused the 64 training examples") for m in after_loss)
        assert not any(m.startswith("Tokenized") for m in after_loss)

        # Every step has one point. Those up to the checkpoint are the first run's, written
        # before the kill; every later one was written again by the resumed run.
        metrics = sorted(
            (m for m in rows(settings, JobMetric) if m.job_id == job_id), key=lambda m: m.step
        )
        assert [m.step for m in metrics] == list(range(1, STEPS + 1))
        assert all(m.at < killed_at for m in metrics if m.step <= resume_step)
        assert all(m.at > killed_at for m in metrics if m.step > resume_step)
        # The resumed run repeats the steps the killed one did after its checkpoint exactly
        # (same weights, optimizer, schedule, data order and random state), and the whole run
        # is, bit for bit, the one never interrupted: every loss, every grad norm, the adapter.
        # A step's point is written after its progress: the killed run's last step may have
        # none, the one before it has.
        second_curve = curve()
        repeated = [step for step in sorted(first_curve) if step > resume_step]
        assert repeated[-1] >= steps_at_kill - 1, (repeated, steps_at_kill)
        assert [second_curve[step] for step in repeated] == [first_curve[s] for s in repeated]
        assert second_curve == curve(uninterrupted_id)
        resumed_weights = adapter_weights(settings, job_id)
        uninterrupted_weights = adapter_weights(settings, uninterrupted_id)
        assert resumed_weights.keys() == uninterrupted_weights.keys()
        assert all(
            torch.equal(weights, uninterrupted_weights[name])
            for name, weights in resumed_weights.items()
        )

        (row,) = [row for row in rows(settings, Job) if row.id == job_id]
        assert (row.attempts, row.lost_workers) == (2, 1)
        kept = settings.data_dir / "artifacts" / "jobs" / job_id
        assert not (kept / "resume").exists()
        assert not (kept / "tokenized").exists()


def test_a_queued_job_waits_for_a_worker_and_starts_when_one_comes(settings, demo_model):
    with TestClient(create_app(settings), base_url=LOCAL) as api:
        training = upload_id(api, arithmetic(16, seed=7))
        job_id = create_job(
            api, model=str(demo_model), training_file=training, training={"max_steps": 4}
        )["id"]
        assert api.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"] == "queued"
        assert waiting_messages(settings) == 1  # its message waits on the queue for a worker
        with worker_process(settings):
            assert wait_for_job(api, settings, job_id)["status"] == "succeeded"
