"""`POST /v1/fine_tuning/jobs/estimate`, the worker registry and admission: a job that fits
no live worker is refused, one that fits gets the batch size and checkpointing it needs."""

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import update

from afina.core.base_models import read_local_config
from afina.core.datasets import ChatExample, PreferenceExample
from afina.core.estimate import ModelShape
from afina.core.model_loading import load_tokenizer
from afina.core.records import to_preference_record, to_record
from afina.jobs.planning import CPU_RESIDENT_FACTOR, FIT_SHARE
from afina.jobs.workers import size_key
from afina.models import Job, JobEvent, Worker
from tests.support import GROWING_CHATS, assert_error, jsonl, register_worker, rows, upload


def body(model: str, training_file: str, **training) -> dict:
    return {
        "model": model,
        "training_file": training_file,
        "hyperparameters": {"n_epochs": 2},
        "training": training,
    }


def estimate(client, model, training_file, **training) -> dict:
    response = client.post(
        "/v1/fine_tuning/jobs/estimate", json=body(model, training_file, **training)
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_the_estimate_counts_the_runs_tokens_and_memory_and_stores_nothing(
    client, settings, model, training_file
):
    plan = estimate(client, model, training_file)
    tokenizer = load_tokenizer(model, trust_remote_code=False)
    lengths = [
        len(to_record(ChatExample.model_validate(chat), tokenizer, loss_on="completion").input_ids)
        for chat in GROWING_CHATS
    ]
    assert (plan["tokens"], plan["examples"], plan["tokens_counted"]) == (sum(lengths), 8, True)
    assert plan["steps"] == 2 * 2  # 8 examples, batches of 4, 2 epochs
    shape = ModelShape.of(read_local_config(model))
    assert plan["trainable_parameters"] == shape.lora_parameters(16, "all-linear")
    memory = plan["memory"]
    parts = ("base_weights", "lora_parameters", "gradients_and_optimizer", "activations", "logits")
    assert memory["total"] == sum(memory[part] for part in parts)
    assert memory["activations"] == memory["activations_without_checkpointing"]
    assert plan["settings"] == {
        "batch_size": 4,
        "gradient_checkpointing": False,
        "max_seq_length": 512,  # the demo model's limit
    }
    # no worker: nothing to check against, no time
    assert plan["fits"] == {"checked": False, "workers": [], "reason": None, "param": None}
    assert plan["estimated_seconds"] is None
    assert rows(settings, Job) == []
    assert rows(settings, JobEvent) == []


@pytest.mark.parametrize(
    "change",
    [
        {"model": "relative/../path"},
        {"training_file": "file-doesnotexist000000000000"},
        {"hyperparameters": {"batch_size": 0}},
        {"training": {"max_seq_length": 10**6}},
        {"lora": {"rank": 8}},
    ],
)
def test_a_body_create_refuses_is_refused_the_same_way(client, model, training_file, change):
    sent = {**body(model, training_file), **change}
    estimated = client.post("/v1/fine_tuning/jobs/estimate", json=sent)
    created = client.post("/v1/fine_tuning/jobs", json=sent)
    assert estimated.status_code == created.status_code == 400
    assert estimated.json() == created.json()


def test_a_hub_model_not_on_this_server_cannot_be_estimated(client, training_file):
    response = client.post(
        "/v1/fine_tuning/jobs/estimate", json=body("org/not-downloaded", training_file)
    )
    assert_error(response, 400, "model", "model_config_unavailable")


def test_registered_workers_are_listed_until_their_stamp_is_old(client, settings):
    with client.app.state.session_factory.begin() as db:
        register_worker(db, "gpu-a")
        register_worker(db, "gpu-b", memory_total=80 * 2**30, name="NVIDIA H100 80GB HBM3")
    listed = client.get("/v1/workers").json()["data"]
    assert [(w["id"], w["device"]["memory_total"], w["busy"]) for w in listed] == [
        ("gpu-a", 24 * 2**30, False),
        ("gpu-b", 80 * 2**30, False),
    ]
    old = datetime.now(UTC) - timedelta(seconds=settings.worker_timeout_seconds + 1)
    with client.app.state.session_factory.begin() as db:
        db.execute(update(Worker).where(Worker.id == "gpu-a").values(heartbeat_at=old))
    assert [w["id"] for w in client.get("/v1/workers").json()["data"]] == ["gpu-b"]


def test_a_worker_that_fits_gives_the_time_from_its_measured_throughput(
    client, model, training_file
):
    with client.app.state.session_factory.begin() as db:
        register_worker(db, "cpu-a", kind="cpu", name="AMD EPYC")
    plan = estimate(client, model, training_file)
    assert plan["fits"]["workers"] == ["cpu-a"]
    assert plan["estimated_from"] == "flops_model"
    assert plan["estimated_seconds"] > 0
    shape = ModelShape.of(read_local_config(model))
    with client.app.state.session_factory.begin() as db:
        db.get(Worker, "cpu-a").throughput = {size_key(shape.parameters, 4): 100.0}
    plan = estimate(client, model, training_file)
    assert plan["estimated_from"] == "measured_throughput"
    assert plan["estimated_seconds"] == pytest.approx(2 * plan["tokens"] / 100.0)


def test_auto_settings_shrink_to_fit_the_smallest_worker_that_takes_the_job(
    client, settings, model, training_file
):
    least = client.post(
        "/v1/fine_tuning/jobs/estimate",
        json={
            **body(model, training_file, gradient_checkpointing=True),
            "hyperparameters": {"n_epochs": 2, "batch_size": 1},
        },
    ).json()["memory"]["total"]
    most = estimate(client, model, training_file)["memory"]["total"]
    assert least < most
    small = int((least + most) / 2 / FIT_SHARE)
    with client.app.state.session_factory.begin() as db:
        register_worker(db, "small", memory_total=small)
        register_worker(db, "large", memory_total=100 * small)
    plan = estimate(client, model, training_file)
    assert plan["fits"]["workers"] == ["small", "large"]
    chosen = (plan["settings"]["batch_size"], plan["settings"]["gradient_checkpointing"])
    assert chosen != (4, False)
    assert plan["memory"]["total"] <= FIT_SHARE * small
    created = client.post("/v1/fine_tuning/jobs", json=body(model, training_file))
    assert created.status_code == 200, created.text
    config = created.json()["config"]
    assert (
        config["hyperparameters"]["batch_size"],
        config["training"]["gradient_checkpointing"],
    ) == chosen
    (job,) = rows(settings, Job)
    events = [event.message for event in rows(settings, JobEvent) if event.job_id == job.id]
    assert any(message.startswith("Checked: needs ") for message in events), events


def test_a_job_that_fits_no_worker_is_refused_naming_the_setting_and_stores_nothing(
    client, settings, model, training_file
):
    with client.app.state.session_factory.begin() as db:
        register_worker(db, "tiny", memory_total=2**20, name="Tiny GPU")
    sent = {**body(model, training_file), "hyperparameters": {"batch_size": 4}}
    sent["training"] = {"gradient_checkpointing": True}
    response = client.post("/v1/fine_tuning/jobs", json=sent)
    error = assert_error(response, 400, "hyperparameters.batch_size", "does_not_fit")
    assert "the largest worker (Tiny GPU) has 1.0 MiB" in error["message"]
    assert rows(settings, Job) == []
    plan = client.post("/v1/fine_tuning/jobs/estimate", json=sent).json()
    assert plan["fits"]["workers"] == []
    assert plan["fits"]["param"] == "hyperparameters.batch_size"


def test_with_no_worker_a_job_is_queued_unchecked_and_says_so(
    client, settings, model, training_file
):
    response = client.post("/v1/fine_tuning/jobs", json=body(model, training_file))
    assert response.status_code == 200, response.text
    events = [event.message for event in rows(settings, JobEvent)]
    assert "Could not check that the job fits a worker: none is registered yet" in events


def test_a_cpu_worker_needs_room_for_what_a_cpu_process_adds(client, model, training_file):
    fixed = {
        **body(model, training_file, gradient_checkpointing=False),
        "hyperparameters": {"batch_size": 4},
        "quantization": {"compute_dtype": "float32"},  # the same estimate on both devices
    }

    def plan() -> dict:
        return client.post("/v1/fine_tuning/jobs/estimate", json=fixed).json()

    total = plan()["memory"]["total"]
    memory = int(2 * total / FIT_SHARE)  # room for the estimate, not for 2.5 times it
    assert CPU_RESIDENT_FACTOR * total > FIT_SHARE * memory  # the set-up, as it says
    with client.app.state.session_factory.begin() as db:
        register_worker(db, "cpu", memory_total=memory, kind="cpu", name="CPU")
        register_worker(db, "gpu", memory_total=memory, kind="cuda", name="GPU")
    assert plan()["fits"]["workers"] == ["gpu"]


def test_a_dpo_job_is_estimated_on_both_rows_of_each_pair(client, model):
    pairs = [
        {
            "input": {"messages": [{"role": "user", "content": "tell me " + "more " * n}]},
            "preferred_output": [{"role": "assistant", "content": "sure " * (n + 1)}],
            "non_preferred_output": [{"role": "assistant", "content": "no"}],
        }
        for n in range(4)
    ]
    training_file = upload(client, jsonl(*pairs)).json()["id"]
    response = client.post(
        "/v1/fine_tuning/jobs/estimate",
        json={"model": model, "training_file": training_file, "method": {"type": "dpo"}},
    )
    assert response.status_code == 200, response.text
    plan = response.json()
    tokenizer = load_tokenizer(model, trust_remote_code=False)
    records = [
        to_preference_record(PreferenceExample.model_validate(pair), tokenizer) for pair in pairs
    ]
    # Each pair runs as two rows, the prompt and each answer, padded to the longer answer.
    expected = sum(
        2 * (len(r.prompt_ids) + max(len(r.chosen_ids), len(r.rejected_ids))) for r in records
    )
    assert (plan["tokens"], plan["examples"]) == (expected, 4)
