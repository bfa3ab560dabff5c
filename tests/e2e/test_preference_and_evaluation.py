"""DPO and the end-of-run evaluation, trained for real on the demo model by a worker process:
a DPO job learns which answer to prefer and serves; a supervised job with a validation file
leaves checkpoint metrics and both result files; a DPO job trains an SFT job's fine-tuned
model further."""

import csv
import io
import json
import math
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from afina.api.app import create_app
from afina.core.job_config import ConfigRequest, resolve_config
from afina.core.settings import Settings
from afina.worker.training.run import TrainingRun, train
from tests.e2e.conftest import stack_settings, wait_for_job, worker_process
from tests.e2e.test_training import arithmetic, create_job, messages, upload_id
from tests.support import LOCAL, jsonl

# A separable preference set: the preferred answer is always the sum, the other a refusal.
PAIRS = jsonl(
    *(
        {
            "input": {"messages": [{"role": "user", "content": f"What is {a} + {b}?"}]},
            "preferred_output": [{"role": "assistant", "content": f"{a + b}"}],
            "non_preferred_output": [{"role": "assistant", "content": "I cannot say."}],
        }
        for a in range(4)
        for b in range(4)
    )
)


@pytest.fixture
def settings(database_url: str, tmp_path) -> Settings:
    """The stack of one test: on PostgreSQL, with Redis as the broker."""
    return stack_settings(database_url, tmp_path)


def metrics(api, job_id: str) -> list[dict]:
    return api.get(f"/v1/fine_tuning/jobs/{job_id}/metrics").json()["data"]


def checkpoints(api, job_id: str) -> list[dict]:
    page = api.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints", params={"limit": 100}).json()
    return sorted(page["data"], key=lambda checkpoint: checkpoint["step_number"])


def content(api, file_id: str) -> bytes:
    response = api.get(f"/v1/files/{file_id}/content")
    assert response.status_code == 200, response.text
    return response.content


def dpo_body(model: str, training: str, **extra) -> dict:
    return {
        "model": model,
        "training_file": training,
        "seed": 4,
        "method": {
            "type": "dpo",
            "dpo": {"hyperparameters": {"n_epochs": 4, "batch_size": 4, "beta": 0.1}},
        },
        "training": {"learning_rate": 5e-3},
        **extra,
    }


@pytest.mark.both_backends
def test_a_dpo_job_learns_the_preferred_answers_and_its_adapter_serves(settings, demo_model):
    with TestClient(create_app(settings), base_url=LOCAL) as api, worker_process(settings):
        pairs = upload_id(api, PAIRS)
        job = create_job(api, **dpo_body(str(demo_model), pairs, validation_file=pairs))
        job = wait_for_job(api, settings, job["id"], timeout=240)
        assert job["status"] == "succeeded", job["error"]
        series = metrics(api, job["id"])
        trained = [point for point in series if point["loss"] is not None]
        # The policy starts as its reference (the base, adapter off): DPO's loss is ln 2 and
        # no pair is ranked right yet; at a high learning rate it ranks them all right.
        assert trained[0]["loss"] == pytest.approx(math.log(2), abs=0.02)
        assert trained[-1]["rewards_accuracies"] > 0.5
        assert trained[-1]["rewards_margins"] > trained[0]["rewards_margins"]
        assert trained[-1]["loss"] < trained[0]["loss"]
        evaluated = [point for point in series if point["eval_loss"] is not None]
        assert evaluated[-1]["eval_rewards_accuracies"] > 0.5
        final = checkpoints(api, job["id"])[-1]
        assert final["step_number"] == job["progress"]["total_steps"]
        assert final["metrics"]["train_mean_token_accuracy"] == trained[-1]["rewards_accuracies"]
        assert final["metrics"]["full_valid_loss"] == evaluated[-1]["eval_loss"]
        assert len(job["result_files"]) == 2
        header = content(api, job["result_files"][0]).decode().splitlines()[0]
        assert "rewards_accuracies" in header.split(",")
        answer = api.post(
            "/v1/chat/completions",
            json={
                "model": job["fine_tuned_model"],
                "messages": [{"role": "user", "content": "What is 1 + 2?"}],
                "max_tokens": 4,
                "temperature": 0,
            },
        )
        assert answer.status_code == 200, answer.text


def test_a_supervised_job_with_a_validation_file_evaluates_and_leaves_result_files(
    api, stack, demo_model
):
    training = upload_id(api, arithmetic(32, seed=2))
    validation = upload_id(api, arithmetic(8, seed=3))
    job = create_job(
        api,
        model=str(demo_model),
        training_file=training,
        validation_file=validation,
        seed=6,
        hyperparameters={"n_epochs": 2, "batch_size": 8},
        training={"learning_rate": 3e-3},
        evaluation={"samples": 5, "max_new_tokens": 8},
    )
    job = wait_for_job(api, stack, job["id"])
    assert job["status"] == "succeeded", job["error"]
    series = metrics(api, job["id"])
    evaluated = [point for point in series if point["eval_loss"] is not None]
    assert evaluated
    assert all(point["eval_mean_token_accuracy"] is not None for point in evaluated)
    assert all(point["rewards_accuracies"] is None for point in series)
    saved = checkpoints(api, job["id"])
    openai_metrics = {
        "step",
        "train_loss",
        "valid_loss",
        "train_mean_token_accuracy",
        "valid_mean_token_accuracy",
    }
    assert all(openai_metrics <= set(checkpoint["metrics"]) for checkpoint in saved)
    assert saved[-1]["step_number"] == job["progress"]["total_steps"]
    assert saved[-1]["metrics"]["full_valid_loss"] == evaluated[-1]["eval_loss"]
    assert "full_valid_loss" not in saved[0]["metrics"]

    metrics_file, generations_file = job["result_files"]
    files = {file["id"]: file for file in api.get("/v1/files").json()["data"]}
    assert files[metrics_file]["purpose"] == "fine-tune-results"
    assert files[metrics_file]["validation"] is None
    rows = list(csv.DictReader(io.StringIO(content(api, metrics_file).decode())))
    assert [int(row["step"]) for row in rows] == [point["step"] for point in series]
    assert float(rows[-1]["valid_loss"]) == pytest.approx(evaluated[-1]["eval_loss"])
    generations = [json.loads(line) for line in content(api, generations_file).splitlines()]
    assert [line["example"] for line in generations] == [1, 2, 3, 4, 5]
    for line in generations:
        assert line["prompt"].endswith("<|im_start|>assistant\n")
        assert line["reference"].startswith("The answer is")
    # The adapter changed the answers: the base model's are the random model's.
    assert [line["fine_tuned_model"] for line in generations] != [
        line["base_model"] for line in generations
    ]
    assert any(
        message.startswith("Evaluation: the fine-tuned and the base model answered 5")
        for message in messages(api, job["id"])
    )


def test_a_dpo_job_trains_an_sft_job_s_fine_tuned_model_or_checkpoint_further(
    api, stack, demo_model
):
    sft = create_job(
        api,
        model=str(demo_model),
        training_file=upload_id(api, arithmetic(16, seed=4)),
        seed=2,
        hyperparameters={"n_epochs": 1, "batch_size": 8},
        lora={"r": 8, "alpha": 16},
    )
    sft = wait_for_job(api, stack, sft["id"])
    assert sft["status"] == "succeeded", sft["error"]
    pairs = upload_id(api, PAIRS)
    job = create_job(api, **dpo_body(sft["fine_tuned_model"], pairs))
    assert job["continued_from"] == sft["fine_tuned_model"]
    assert job["model"] == str(demo_model)
    assert job["config"]["lora"]["r"] == 8
    job = wait_for_job(api, stack, job["id"])
    assert job["status"] == "succeeded", job["error"]
    # Its reference is the SFT model it started from: it starts at DPO's ln 2 all the same.
    first = next(point for point in metrics(api, job["id"]) if point["loss"] is not None)
    assert first["loss"] == pytest.approx(math.log(2), abs=0.02)
    # No validation file: no evaluation, and only the metrics file.
    assert len(job["result_files"]) == 1
    assert not any(m.startswith("Evaluation") for m in messages(api, job["id"]))
    # A checkpoint trains further the same way.
    checkpoint = checkpoints(api, sft["id"])[0]["fine_tuned_model_checkpoint"]
    again = create_job(api, **dpo_body(checkpoint, pairs))
    assert again["continued_from"] == checkpoint
    again = wait_for_job(api, stack, again["id"])
    assert again["status"] == "succeeded", again["error"]


class StopAt:
    """A `Reporter` that records the loss curve and, like a worker shutting down, asks the
    run to save and stop once it reaches `stop_at`."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.stop_at = stop_at
        self.losses: dict[int, float | None] = {}
        self.saved: list[str] = []

    def event(self, message, *, data=None) -> None: ...

    def configured(self, config) -> None: ...

    def tokenized(self, name, directory) -> None: ...

    def metric(self, step, values) -> None:
        if "loss" in values:
            self.losses[step] = values["loss"]

    def progress(self, steps_done, total_steps, epoch, estimated_finish) -> bool:
        return self.stop_at is None or steps_done < self.stop_at

    def save_before_stopping(self) -> bool:
        return True

    def checkpoint(self, step, directory, metrics) -> None:
        self.saved.append(directory)


def test_a_dpo_run_resumed_from_its_checkpoint_repeats_the_uninterrupted_run(demo_model, tmp_path):
    request = ConfigRequest.model_validate(
        {
            "method": {
                "type": "dpo",
                "dpo": {"hyperparameters": {"n_epochs": 2, "batch_size": 4}},
            },
            "training": {"learning_rate": 5e-3},
        }
    )
    config = resolve_config(request, num_examples=16, model_max_length=512)

    def run(name: str, reporter: StopAt, resume_from=None):
        return train(
            TrainingRun(
                model=str(demo_model),
                config=config,
                seed=3,
                training_data=lambda: io.BytesIO(PAIRS),
                validation_data=None,
                workdir=tmp_path / name,
                max_line_bytes=2**20,
                resume_from=resume_from,
            ),
            reporter,
        )

    whole = StopAt()
    assert run("whole", whole).adapter_dir is not None
    first = StopAt(stop_at=3)
    assert run("first", first).adapter_dir is None  # stopped, with a checkpoint
    second = StopAt()
    run("second", second, resume_from=Path(first.saved[-1]))
    assert min(second.losses) == 4  # it went on after the checkpoint of step 3
    expected = {step: whole.losses[step] for step in second.losses}
    assert second.losses == pytest.approx(expected, rel=1e-5)
    assert max(second.losses) == max(whole.losses)
