"""A worker told to stop (SIGTERM, as `afina serve` and `docker compose stop` do) halts its
run at the next step, saves it, and puts the job back in the queue; the next worker to start
resumes it from that step."""

import signal
import time
from pathlib import Path

from fastapi.testclient import TestClient

from afina.api.app import create_app
from afina.core.storage import resume_key
from tests.e2e.conftest import stack_settings, worker_process
from tests.e2e.test_training import arithmetic, create_job, messages, upload_id
from tests.support import LOCAL


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_a_stopped_worker_requeues_its_job_for_the_next(database_url, tmp_path, demo_model):
    settings = stack_settings(database_url, tmp_path)
    with TestClient(create_app(settings), base_url=LOCAL) as api:
        training = upload_id(api, arithmetic(64, seed=5))
        job_id = create_job(
            api, model=str(demo_model), training_file=training, training={"max_steps": 100_000}
        )["id"]

        def job() -> dict:
            return api.get(f"/v1/fine_tuning/jobs/{job_id}").json()

        with worker_process(settings) as worker:
            wait_until(lambda: job()["progress"]["steps_done"] >= 3, 90, "training never began")
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(30) == 0
        stopped = job()
        assert stopped["status"] == "queued"
        saved = stopped["progress"]["steps_done"]
        assert saved >= 3
        events = messages(api, job_id)
        requeued = f"Worker shut down at step {saved}: the job is queued again and resumes from"
        assert f"{requeued} step {saved}" in events, events
        assert events.count("Job started (attempt 1)") == 1
        assert not any(m.startswith("Job started (attempt 2)") for m in events), events
        checkpoints = api.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
        assert checkpoints[0]["step_number"] == saved
        assert (Path(settings.storage_url) / resume_key(job_id, saved)).is_dir()

        with worker_process(settings):
            wait_until(
                lambda: job()["progress"]["steps_done"] > saved, 90, "the next worker never took it"
            )
            assert api.post(f"/v1/fine_tuning/jobs/{job_id}/cancel").status_code == 200
            wait_until(
                lambda: any(m.startswith("Training stopped") for m in messages(api, job_id)),
                30,
                "the cancelled run did not stop",
            )
        events = messages(api, job_id)
        assert "Job started (attempt 2)" in events
        assert f"Resuming from the checkpoint saved at step {saved}" in events
        assert any(m.startswith(f"Training resumed at step {saved} of 100000") for m in events)
        assert not (Path(settings.storage_url) / resume_key(job_id)).exists()
