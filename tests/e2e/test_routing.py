"""Routing to worker classes with a real worker: a worker started on the queue `train-big`
alone registers that queue, trains the job routed there, and leaves alone a job sent to the
default queue `train` (queued before any worker had registered, so unchecked)."""

import time

from fastapi.testclient import TestClient

from afina.api.app import create_app
from afina.models.schema import upgrade_database
from tests.e2e.conftest import stack_settings, wait_for_job, worker_log, worker_process
from tests.e2e.test_training import arithmetic, create_job, messages, upload_id
from tests.support import LOCAL


def test_a_worker_on_its_class_s_queue_trains_only_the_jobs_routed_there(tmp_path, demo_model):
    # A database of its own: no other test's worker in the registry to route to.
    database_url = f"sqlite:///{tmp_path / 'afina.db'}"
    upgrade_database(database_url)
    settings = stack_settings(database_url, tmp_path / "data")
    with TestClient(create_app(settings), base_url=LOCAL) as api:
        training = upload_id(api, arithmetic(16, seed=3))
        job = {"model": str(demo_model), "training_file": training, "training": {"max_steps": 2}}
        unchecked = create_job(api, **job)  # no worker registered yet
        assert unchecked["queue"] == "train"

        with worker_process(settings, queues=["train-big"]):
            deadline = time.monotonic() + 120
            while not (listed := api.get("/v1/workers").json()["data"]):
                assert time.monotonic() < deadline, worker_log(settings)
                time.sleep(0.2)
            assert [worker["queue"] for worker in listed] == ["train-big"]

            routed = create_job(api, **job)
            assert routed["queue"] == "train-big"
            assert "Queued on train-big: the smallest worker class that fits" in messages(
                api, routed["id"]
            )
            done = wait_for_job(api, settings, routed["id"], timeout=180)
            assert done["status"] == "succeeded", (done["error"], worker_log(settings))
            # The job on `train` waits for a worker that takes that queue.
            left = api.get(f"/v1/fine_tuning/jobs/{unchecked['id']}").json()
            assert (left["status"], left["progress"]["steps_done"]) == ("queued", 0)
            assert not any(m.startswith("Job started") for m in messages(api, unchecked["id"]))
        assert api.post(f"/v1/fine_tuning/jobs/{unchecked['id']}/cancel").status_code == 200
