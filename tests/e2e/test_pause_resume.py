"""Pausing a running job and resuming it, on the embedded stack and on PostgreSQL + Redis:
the run saves a checkpoint at its next step and frees its worker, which trains another job
meanwhile; resumed, the job goes on from that checkpoint and ends with the very loss curve of
a run never paused."""

import pytest
from fastapi.testclient import TestClient

from afina.api.app import create_app
from afina.core.settings import Settings
from afina.models import JobCheckpoint
from tests.e2e.conftest import loss_curve, stack_settings, wait_for_job, worker_process
from tests.e2e.test_training import arithmetic, create_job, messages, upload_id
from tests.e2e.test_worker_shutdown import wait_until
from tests.support import LOCAL, assert_error, rows

STEPS = 24


@pytest.fixture
def settings(database_url: str, tmp_path) -> Settings:
    return stack_settings(database_url, tmp_path)


@pytest.mark.both_backends
def test_a_paused_job_frees_its_worker_and_resumes_with_the_same_results(settings, demo_model):
    with TestClient(create_app(settings), base_url=LOCAL) as api, worker_process(settings):
        training = upload_id(api, arithmetic(48, seed=8))
        body = {
            "model": str(demo_model),
            "training_file": training,
            "seed": 5,
            "hyperparameters": {"batch_size": 4},
            "training": {"max_steps": STEPS, "save_steps": 100, "learning_rate": 3e-3},
        }
        job_id = create_job(api, **body)["id"]

        def job(job_id: str = job_id) -> dict:
            return api.get(f"/v1/fine_tuning/jobs/{job_id}").json()

        wait_until(lambda: job()["progress"]["steps_done"] >= 3, 90, "training never started")
        asked = api.post(f"/v1/fine_tuning/jobs/{job_id}/pause")
        assert asked.status_code == 200, asked.text
        asked_at = asked.json()["progress"]["steps_done"]
        paused = wait_for_job(api, settings, job_id, until=("paused",))
        step = paused["progress"]["steps_done"]
        assert asked_at <= step <= asked_at + 2
        assert paused["estimated_finish"] is None
        assert paused["pause_requested"] is False
        # The checkpoint it paused at (save_steps alone would have made none yet).
        assert [c.step for c in rows(settings, JobCheckpoint) if c.job_id == job_id] == [step]
        assert_error(api.post(f"/v1/fine_tuning/jobs/{job_id}/pause"), 409, "id")

        # The worker is free: the same job, never paused, trains to its end meanwhile, and
        # the paused one stays as it is.
        uninterrupted_id = create_job(api, **body)["id"]
        assert wait_for_job(api, settings, uninterrupted_id)["status"] == "succeeded"
        assert job()["status"] == "paused"

        resumed = api.post(f"/v1/fine_tuning/jobs/{job_id}/resume")
        assert resumed.status_code == 200, resumed.text
        final = wait_for_job(api, settings, job_id)
        assert final["status"] == "succeeded", final["error"]
        assert loss_curve(api, job_id) == loss_curve(api, uninterrupted_id)
        assert len(loss_curve(api, job_id)) == STEPS
        events = messages(api, job_id)
        assert "Pause requested: the job saves a checkpoint at its next step, then pauses" in events
        assert f"Job paused: it resumes from step {step}" in events
        assert "Job resumed: queued again" in events
        assert any(m.startswith(f"Training resumed at step {step} of {STEPS}") for m in events)
        assert_error(api.post(f"/v1/fine_tuning/jobs/{job_id}/resume"), 409, "id")
