"""Jobs trained for real by a Celery worker process on the tiny demo model (CPU, 4-bit
bitsandbytes, peft LoRA, trl SFT), on the embedded stack (test_crash_recovery.py trains on
PostgreSQL + Redis too)."""

import json
import random
import re
import statistics
import time
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from afina.core.storage import adapter_key, checkpoint_key
from afina.models import Job, JobCheckpoint, JobMetric, JobStatus
from tests.e2e.conftest import wait_for_job
from tests.support import jsonl, rows, upload


def arithmetic(count: int, seed: int) -> bytes:
    generator = random.Random(seed)
    examples = []
    for _ in range(count):
        a, b = generator.randint(0, 9), generator.randint(0, 9)
        examples.append(
            {
                "messages": [
                    {"role": "user", "content": f"What is {a} + {b}?"},
                    {"role": "assistant", "content": f"The answer is {a + b}."},
                ]
            }
        )
    return jsonl(*examples)


def upload_id(api, content: bytes) -> str:
    response = upload(api, content)
    assert response.status_code == 200, response.text
    return response.json()["id"]


def create_job(api, **body) -> dict:
    response = api.post("/v1/fine_tuning/jobs", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def messages(api, job_id: str) -> list[str]:
    page = api.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100}).json()
    return [event["message"] for event in reversed(page["data"])]


def test_a_job_trains_to_success_and_keeps_its_record(api, stack, demo_model):
    training = upload_id(api, arithmetic(64, seed=0))
    validation = upload_id(api, arithmetic(16, seed=1))
    job = create_job(
        api,
        model=str(demo_model),
        training_file=training,
        validation_file=validation,
        suffix="e2e",
        seed=5,
        method={
            "type": "supervised",
            "supervised": {"hyperparameters": {"n_epochs": 4, "batch_size": 8}},
        },
        training={"learning_rate": 3e-3, "eval_steps": 8, "save_steps": 16},
    )
    job = wait_for_job(api, stack, job["id"])
    assert job["status"] == "succeeded", job["error"]
    job_id = job["id"]
    assert job["fine_tuned_model"] == f"ft:{demo_model}:default:e2e:{job_id[6:14]}"
    assert job["trained_tokens"] > 0
    assert job["finished_at"] >= job["created_at"]
    assert job["progress"]["steps_done"] == job["progress"]["total_steps"] == 32
    assert job["config"]["training"]["max_seq_length"] == 512  # the demo model's limit
    # What the worker made of the fast path's "auto": a tiny model on a CPU needs no
    # checkpointing, and SDPA runs per example of the padding-free rows.
    resolved = job["config"]["training"]
    assert resolved["gradient_checkpointing"] is False
    assert resolved["padding_free"] is True
    assert resolved["attention"] == "sdpa"
    assert resolved["liger_kernels"] is False

    series = api.get(f"/v1/fine_tuning/jobs/{job_id}/metrics").json()["data"]
    assert [point["step"] for point in series] == list(range(1, 33))  # short: every step
    losses = [point["loss"] for point in series]
    assert statistics.mean(losses[-5:]) < losses[0] - 0.5, losses
    assert all(point["tokens_per_second"] > 0 for point in series)
    assert [p["step"] for p in series if p["eval_loss"] is not None] == [8, 16, 24, 32]

    checkpoints = api.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
    assert [c["step_number"] for c in checkpoints] == [32, 16]
    assert checkpoints[0]["metrics"]["train_loss"] == pytest.approx(losses[-1])
    assert checkpoints[0]["metrics"]["valid_loss"] == series[-1]["eval_loss"]

    events = messages(api, job_id)
    assert events[:5] == [
        f"Validated training file {training}: 64 chat examples",
        events[1],
        events[2],
        "Job queued",
        "Job started (attempt 1)",
    ]
    # the worker registers as it starts: the job may come first
    assert re.fullmatch(
        r"Checked: needs [\d.]+ MiB \(batch size 8, gradient checkpointing off\); fits 1 of "
        r"the registered workers|Could not check that the job fits a worker: none is "
        r"registered yet",
        events[1],
    ), events[1]
    assert events[2] in (
        "Queued on train: the smallest worker class that fits",
        "Queued on train: the default queue (no worker class was checked)",
    )
    for expected in (
        "Training with packed_sdpa attention, padding-free batches, gradient checkpointing "
        "off, Liger kernels off",
        "Training started: 32 steps",
        "Checkpoint saved at step 16",
        "Epoch 4",
        "Training done: 32 steps in",
    ):
        assert any(message.startswith(expected) for message in events), events
    assert events[-1].startswith("Job succeeded: 32 steps")

    (row,) = [job for job in rows(stack, Job) if job.id == job_id]
    assert row.status == JobStatus.SUCCEEDED
    assert row.heartbeat_at is not None
    assert len([m for m in rows(stack, JobMetric) if m.job_id == job_id]) == 32
    assert len([c for c in rows(stack, JobCheckpoint) if c.job_id == job_id]) == 2

    artifacts = Path(stack.storage_url)
    for step in (16, 32):
        assert (artifacts / checkpoint_key(job_id, step) / "adapter_model.safetensors").is_file()
    adapter = artifacts / adapter_key(job_id)
    # the scratch space goes once the job's end is committed, moments after it shows
    scratch, deadline = stack.data_dir / "work" / job_id, time.monotonic() + 30
    while scratch.exists():
        assert time.monotonic() < deadline, "the scratch space stayed"
        time.sleep(0.1)

    tokenizer = AutoTokenizer.from_pretrained(adapter)
    assert tokenizer.chat_template  # serving renders chats as training did
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(demo_model), adapter)
    trained = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert trained
    assert any(torch.count_nonzero(p) for p in trained)  # B starts at zero: it learned


def test_the_same_seed_gives_the_same_run(api, stack, demo_model):
    training = upload_id(api, arithmetic(32, seed=2))
    curves = []
    for _ in range(2):
        job = create_job(
            api,
            model=str(demo_model),
            training_file=training,
            seed=11,
            hyperparameters={"batch_size": 4},
            training={"max_steps": 6, "learning_rate": 3e-3},
        )
        assert wait_for_job(api, stack, job["id"])["status"] == "succeeded"
        series = api.get(f"/v1/fine_tuning/jobs/{job['id']}/metrics").json()["data"]
        curves.append([point["loss"] for point in series])
    assert len(curves[0]) == 6
    assert curves[0] == curves[1]


def test_a_cancelled_running_job_stops_within_a_couple_of_steps(api, stack, demo_model):
    training = upload_id(api, arithmetic(64, seed=3))
    job = create_job(
        api, model=str(demo_model), training_file=training, training={"max_steps": 100_000}
    )
    deadline = time.monotonic() + 60
    while api.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["progress"]["steps_done"] < 3:
        assert time.monotonic() < deadline, "the job never got going"
        time.sleep(0.05)
    cancelled = api.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").json()
    assert cancelled["status"] == "cancelled"
    at_cancel = cancelled["progress"]["steps_done"]

    deadline = time.monotonic() + 30
    while not any(m.startswith("Training stopped") for m in messages(api, job["id"])):
        assert time.monotonic() < deadline, "the trainer did not stop"
        time.sleep(0.1)
    final = api.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
    assert final["status"] == "cancelled"
    assert final["fine_tuned_model"] is None
    assert final["estimated_finish"] is None  # no progress is recorded after the cancel
    (stopped,) = [m for m in messages(api, job["id"]) if m.startswith("Training stopped")]
    step = int(stopped.split()[4].rstrip(":"))
    assert at_cancel <= step <= at_cancel + 2, (at_cancel, stopped)
    assert not (Path(stack.storage_url) / adapter_key(job["id"])).exists()


def test_a_job_with_nothing_left_to_learn_fails_naming_the_setting(api, stack, demo_model):
    long_prompts = jsonl(*({"prompt": "word " * 40, "completion": " answer"} for _ in range(4)))
    training = upload_id(api, long_prompts)
    job = create_job(
        api, model=str(demo_model), training_file=training, training={"max_seq_length": 16}
    )
    job = wait_for_job(api, stack, job["id"])
    assert job["status"] == "failed"
    assert job["error"]["code"] == "no_trainable_examples"
    assert job["error"]["param"] == "training_file"
    assert "raise training.max_seq_length" in job["error"]["message"]
    assert not (stack.data_dir / "work" / job["id"]).exists()


def test_a_model_that_cannot_load_fails_with_a_message(api, stack, tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    training = upload_id(api, arithmetic(8, seed=4))
    job = create_job(api, model=str(broken), training_file=training)
    job = wait_for_job(api, stack, job["id"])
    assert job["status"] == "failed"
    assert job["error"]["code"] == "model_load_failed"
    assert job["error"]["param"] == "model"
    assert str(broken) in job["error"]["message"]
    assert job["finished_at"] is not None
    events = api.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()["data"]
    assert events[0]["level"] == "error"
    assert events[0]["message"].startswith("Job failed: cannot load model")
