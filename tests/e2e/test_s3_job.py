"""A job end to end on S3 storage (`AFINA_STORAGE_URL=s3://bucket/prefix`, moto's server in
CI): the dataset is uploaded into the bucket, a worker process streams it from there, trains
the demo model with a checkpoint and stores the checkpoint and the adapter there; the adapter
downloads and loads with peft, the fine-tuned model and its checkpoint generate, and
deleting the model empties its folder in the bucket. A paused job resumes from the trainer
state and tokenized dataset it kept in the bucket."""

import secrets

import pytest
from fastapi.testclient import TestClient
from peft import PeftModel
from transformers import AutoModelForCausalLM

from afina.api.app import create_app
from afina.core.settings import Settings
from afina.core.storage import (
    TEMPORARY_MARK,
    WHOLE_MARKER,
    WRITING_MARKER,
    adapter_key,
    checkpoint_key,
    file_key,
    job_key,
    resume_key,
    tokenized_key,
)
from tests.e2e.conftest import stack_settings, wait_for_job, worker_process
from tests.e2e.test_take_away import unpacked
from tests.e2e.test_training import arithmetic, create_job, messages, upload_id
from tests.e2e.test_worker_shutdown import wait_until
from tests.support import LOCAL, S3Bucket

STEPS, SAVE_EVERY = 4, 2


@pytest.fixture
def settings(database_url: str, tmp_path, s3_bucket: S3Bucket) -> Settings:
    return stack_settings(
        database_url,
        tmp_path,
        storage_url=s3_bucket.url(f"e2e-{secrets.token_hex(4)}"),
        **s3_bucket.settings(),
    )


def test_a_job_trains_and_serves_from_s3(settings, s3_bucket, demo_model, tmp_path):
    prefix = settings.storage_url.removeprefix(f"s3://{s3_bucket.name}/")

    def objects() -> list[str]:
        return s3_bucket.objects(prefix)

    with TestClient(create_app(settings), base_url=LOCAL) as api, worker_process(settings):
        assert api.get("/readyz").status_code == 200  # the bucket takes a new object
        training = upload_id(api, arithmetic(24, seed=3))
        assert objects() == [file_key(training)]
        job = create_job(
            api,
            model=str(demo_model),
            training_file=training,
            suffix="s3",
            hyperparameters={"batch_size": 4},
            training={"max_steps": STEPS, "save_steps": SAVE_EVERY, "learning_rate": 1e-2},
        )
        done = wait_for_job(api, settings, job["id"])
        assert done["status"] == "succeeded", done["error"]
        job_id, name = done["id"], done["fine_tuned_model"]

        # The trainer state and the tokenized datasets go once the job is over.
        def ended() -> bool:
            kept = (resume_key(job_id), tokenized_key(job_id))
            return not any(key.startswith(kept) for key in objects())

        wait_until(ended, 30, "the job's trainer state stayed in the bucket")
        stored = objects()
        adapter = adapter_key(job_id)
        checkpoint = checkpoint_key(job_id, SAVE_EVERY)
        for key in (
            file_key(training),
            f"{adapter}/adapter_config.json",
            f"{adapter}/adapter_model.safetensors",
            f"{adapter}/tokenizer_config.json",
            f"{adapter}/{WHOLE_MARKER}",
            f"{checkpoint}/adapter_model.safetensors",
            f"{checkpoint}/{WHOLE_MARKER}",
        ):
            assert key in stored, stored
        # The staged adapter was moved into place; nothing half written is left.
        assert not any(key.startswith(f"{job_key(job_id)}/adapter-") for key in stored), stored
        assert not any(WRITING_MARKER in key or TEMPORARY_MARK in key for key in stored), stored
        assert not (settings.data_dir / "artifacts").exists()  # nothing stored on local disk

        response = api.get(f"/v1/fine_tuning/jobs/{job_id}/adapter")
        assert response.status_code == 200, response.text
        folder = unpacked(response.content, tmp_path / "downloaded")
        assert WHOLE_MARKER not in {path.name for path in folder.iterdir()}
        weights = s3_bucket.filesystem().cat_file(
            f"{s3_bucket.name}/{prefix}/{adapter}/adapter_model.safetensors"
        )
        assert (folder / "adapter_model.safetensors").read_bytes() == weights
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(demo_model), folder)

        for model in (name, f"{job_id}:ckpt-step-{SAVE_EVERY}"):
            generated = api.post(
                "/generate", json={"model": model, "prompt": "What is 1 + 2?", "max_new_tokens": 3}
            )
            assert generated.status_code == 200, generated.text
            assert generated.json()["usage"]["completion_tokens"] > 0
        by_job = api.post(
            "/generate", json={"job_id": job_id, "prompt": "1 +", "max_new_tokens": 2}
        )
        assert by_job.status_code == 200, by_job.text

        assert api.delete(f"/v1/models/{name}").status_code == 200
        assert api.delete(f"/v1/files/{training}").status_code == 200
        left = objects()
        assert not any(key.startswith(f"{job_key(job_id)}/") for key in left), left
        assert file_key(training) not in left


def test_a_paused_job_resumes_from_its_state_in_the_bucket(settings, s3_bucket, demo_model):
    """The trainer state and the tokenized dataset a paused run kept in the bucket are what
    the resumed run fetches and goes on from."""
    prefix = settings.storage_url.removeprefix(f"s3://{s3_bucket.name}/")
    steps = 24
    with TestClient(create_app(settings), base_url=LOCAL) as api, worker_process(settings):
        training = upload_id(api, arithmetic(48, seed=8))
        job_id = create_job(
            api,
            model=str(demo_model),
            training_file=training,
            hyperparameters={"batch_size": 4},
            training={"max_steps": steps, "save_steps": 100, "learning_rate": 3e-3},
        )["id"]

        def steps_done() -> int:
            return api.get(f"/v1/fine_tuning/jobs/{job_id}").json()["progress"]["steps_done"]

        wait_until(lambda: steps_done() >= 3, 90, "training never started")
        assert api.post(f"/v1/fine_tuning/jobs/{job_id}/pause").status_code == 200
        paused = wait_for_job(api, settings, job_id, until=("paused",))
        step = paused["progress"]["steps_done"]
        stored = s3_bucket.objects(prefix)
        for key in (resume_key(job_id, step), tokenized_key(job_id, "train")):
            assert f"{key}/{WHOLE_MARKER}" in stored, stored

        assert api.post(f"/v1/fine_tuning/jobs/{job_id}/resume").status_code == 200
        final = wait_for_job(api, settings, job_id)
        assert final["status"] == "succeeded", final["error"]
        assert final["progress"]["steps_done"] == steps
        events = messages(api, job_id)
        assert f"Resuming from the checkpoint saved at step {step}" in events
        assert any(m.startswith(f"Training resumed at step {step} of {steps}") for m in events)
        assert any(m.endswith("tokenized by an earlier run") for m in events), events
