"""A job on two ranks (`resources.gpus: 2`): on this CPU machine, two gloo processes that
torchrun starts, the code path of a multi-GPU node. It trains to success with one writer,
and pausing it stops both ranks after one checkpoint; resumed, it ends with the very loss
curve and adapter of the same two-rank job never paused. A stopping worker's ranks save and
the job is queued again; the next worker resumes it, and a cancel stops both ranks."""

import signal
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file

from afina.api.app import create_app
from afina.core.settings import Settings
from afina.core.storage import adapter_key, resume_key
from afina.models import JobCheckpoint
from tests.e2e.conftest import loss_curve, stack_settings, wait_for_job, worker_process
from tests.e2e.test_training import arithmetic, create_job, messages, upload_id
from tests.e2e.test_worker_shutdown import wait_until
from tests.support import LOCAL, jsonl, rows

STEPS = 16


@pytest.fixture
def settings(database_url: str, tmp_path) -> Settings:
    return stack_settings(database_url, tmp_path)


def test_a_two_rank_job_pauses_resumes_and_ends_as_one_never_paused(settings, demo_model):
    with TestClient(create_app(settings), base_url=LOCAL) as api, worker_process(settings):
        training = upload_id(api, arithmetic(64, seed=16))
        body = {
            "model": str(demo_model),
            "training_file": training,
            "seed": 4,
            "hyperparameters": {"batch_size": 2},
            "training": {"max_steps": STEPS, "save_steps": 100, "learning_rate": 3e-3},
            "resources": {"gpus": 2},
        }
        job_id = create_job(api, **body)["id"]

        def job(job_id: str = job_id) -> dict:
            return api.get(f"/v1/fine_tuning/jobs/{job_id}").json()

        wait_until(lambda: job()["progress"]["steps_done"] >= 3, 120, "training never started")
        assert api.post(f"/v1/fine_tuning/jobs/{job_id}/pause").status_code == 200
        paused = wait_for_job(api, settings, job_id, until=("paused",))
        step = paused["progress"]["steps_done"]
        # One writer: one checkpoint row, and both ranks' RNG state in the kept trainer state.
        assert [c.step for c in rows(settings, JobCheckpoint) if c.job_id == job_id] == [step]
        kept = Path(settings.storage_url) / "jobs" / job_id / "resume" / f"step-{step}"
        assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in kept.iterdir()}

        assert api.post(f"/v1/fine_tuning/jobs/{job_id}/resume").status_code == 200
        final = wait_for_job(api, settings, job_id, timeout=240)
        assert final["status"] == "succeeded", final["error"]
        uninterrupted_id = create_job(api, **body)["id"]
        uninterrupted = wait_for_job(api, settings, uninterrupted_id, timeout=240)
        assert uninterrupted["status"] == "succeeded", uninterrupted["error"]

        events = messages(api, job_id)
        assert events.count("Training on 2 ranks (distributed data parallel)") == 2
        assert f"Job paused: it resumes from step {step}" in events
        assert len(loss_curve(api, job_id)) == STEPS
        assert loss_curve(api, job_id) == loss_curve(api, uninterrupted_id)
        weights = [
            load_file(Path(settings.storage_url) / adapter_key(j) / "adapter_model.safetensors")
            for j in (job_id, uninterrupted_id)
        ]
        assert weights[0].keys() == weights[1].keys()
        assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])


def test_a_stopping_worker_s_ranks_save_and_requeue_and_a_cancel_stops_both(settings, demo_model):
    with TestClient(create_app(settings), base_url=LOCAL) as api:
        training = upload_id(api, arithmetic(64, seed=17))
        job_id = create_job(
            api,
            model=str(demo_model),
            training_file=training,
            training={"max_steps": 100_000},
            resources={"gpus": 2},
        )["id"]

        def job() -> dict:
            return api.get(f"/v1/fine_tuning/jobs/{job_id}").json()

        with worker_process(settings) as worker:
            wait_until(lambda: job()["progress"]["steps_done"] >= 3, 120, "training never began")
            worker.send_signal(signal.SIGTERM)  # the task asks its ranks to stop
            assert worker.wait(60) == 0
        stopped = job()
        assert stopped["status"] == "queued"
        saved = stopped["progress"]["steps_done"]
        assert f"Worker shut down at step {saved}: the job is queued again and resumes from" in (
            " ".join(messages(api, job_id))
        )
        kept = Path(settings.storage_url) / resume_key(job_id, saved)
        assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in kept.iterdir()}

        with worker_process(settings):
            wait_until(lambda: job()["progress"]["steps_done"] > saved, 120, "never resumed")
            assert api.post(f"/v1/fine_tuning/jobs/{job_id}/cancel").status_code == 200
            wait_until(
                lambda: any(m.startswith("Training stopped") for m in messages(api, job_id)),
                60,
                "the ranks did not stop",
            )
        events = messages(api, job_id)
        assert f"Resuming from the checkpoint saved at step {saved}" in events
        assert job()["status"] == "cancelled"
        assert not kept.exists()  # a cancelled job keeps nothing to resume from


def test_a_rank_s_error_is_the_job_s(settings, demo_model):
    long_prompts = jsonl(*({"prompt": "word " * 40, "completion": " answer"} for _ in range(4)))
    with TestClient(create_app(settings), base_url=LOCAL) as api, worker_process(settings):
        job = create_job(
            api,
            model=str(demo_model),
            training_file=upload_id(api, long_prompts),
            training={"max_seq_length": 16},
            resources={"gpus": 2},
        )
        failed = wait_for_job(api, settings, job["id"], timeout=120)
    assert failed["status"] == "failed"
    assert (failed["error"]["code"], failed["error"]["param"]) == (
        "no_trainable_examples",
        "training_file",
    )
