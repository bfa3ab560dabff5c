"""/v1/fine_tuning/jobs through HTTP, with no worker running: what create accepts and
refuses, what it stores, listing, cancelling, and the empty series of a queued job."""

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from afina.api.app import create_app
from afina.core.job_config import ConfigRequest, resolve_config
from afina.jobs import lifecycle
from afina.models import RESULTS_PURPOSE, File, Job, JobCheckpoint, JobEvent, JobStatus
from afina.models.session import make_engine, make_session_factory
from tests.support import (
    CHAT,
    LOCAL,
    add_rows,
    assert_error,
    config_only_model,
    job_row,
    jsonl,
    rows,
    upload,
)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return config_only_model(tmp_path)


@pytest.fixture
def training_file(client: TestClient) -> str:
    response = upload(client, CHAT)
    assert response.status_code == 200, response.text
    return response.json()["id"]


@pytest.fixture
def body(model_dir: Path, training_file: str) -> dict:
    return {"model": str(model_dir), "training_file": training_file}


@contextmanager
def lifecycle_session(settings) -> Iterator[Session]:
    """A transaction on the app's database, for what a worker would do."""
    engine = make_engine(settings.database_url)
    try:
        with make_session_factory(engine).begin() as session:
            yield session
    finally:
        engine.dispose()


def create(client: TestClient, body: dict):
    return client.post("/v1/fine_tuning/jobs", json=body)


@pytest.mark.both_backends
def test_create_queues_the_job_with_the_resolved_config(client, body, settings):
    body |= {
        "suffix": "my-model_1",
        "seed": 7,
        "metadata": {"team": "search"},
        "method": {
            "type": "supervised",
            "supervised": {"hyperparameters": {"n_epochs": 2, "learning_rate_multiplier": 0.5}},
        },
        "lora": {"r": 8},
        "training": {"packing": True},
    }
    response = create(client, body)
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["id"].startswith("ftjob-")
    assert job["object"] == "fine_tuning.job"
    assert job["status"] == "queued"
    assert job["model"] == body["model"]
    assert job["training_file"] == body["training_file"]
    assert job["fine_tuned_model"] is None
    assert job["seed"] == 7
    assert job["suffix"] == job["user_provided_suffix"] == "my-model_1"
    assert job["metadata"] == {"team": "search"}
    assert job["hyperparameters"] == {
        "n_epochs": 2,
        "batch_size": 4,  # auto: min(4, examples)
        "learning_rate_multiplier": 0.5,
    }
    assert job["method"]["supervised"]["hyperparameters"] == job["hyperparameters"]
    config = job["config"]
    assert config["lora"] == {"r": 8, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}
    assert config["quantization"]["bits"] == 4
    assert config["training"]["learning_rate"] == pytest.approx(1e-4)
    assert config["training"]["max_seq_length"] == 512  # the model's limit, under 2048
    assert config["training"]["packing"] is True
    # The fast path: on by default, its device-dependent choices left to the worker.
    assert config["training"]["padding_free"] is True
    for choice in ("gradient_checkpointing", "attention", "liger_kernels"):
        assert config["training"][choice] == "auto"
    assert job["progress"] == {
        "steps_done": 0,
        "total_steps": None,
        "epoch": None,
        "estimated_finish": None,
    }
    (row,) = rows(settings, Job)
    assert (row.id, row.status, row.project) == (job["id"], JobStatus.QUEUED, "default")
    messages = [event.message for event in rows(settings, JobEvent)]
    assert "Job queued" in messages


def test_legacy_hyperparameters_and_a_random_seed(client, body):
    body["hyperparameters"] = {"n_epochs": 5, "batch_size": 2}
    job = create(client, body).json()
    assert job["hyperparameters"]["n_epochs"] == 5
    assert job["hyperparameters"]["batch_size"] == 2
    assert 0 <= job["seed"] < 2**31


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"surprise": 1}, "surprise"),
        ({"lora": {"rank": 8}}, "lora.rank"),
        ({"training": {"warmup_ratio": 1}}, "training.warmup_ratio"),
        ({"training": {"learning_rate": 0}}, "training.learning_rate"),
        ({"training": {"max_steps": "ten"}}, "training.max_steps"),
        ({"quantization": {"bits": 3}}, "quantization.bits"),
        ({"lora": {"dropout": 1}}, "lora.dropout"),
        ({"lora": {"r": 0}}, "lora.r"),
        ({"suffix": "has space"}, "suffix"),
        ({"suffix": "x" * 65}, "suffix"),
        ({"seed": -1}, "seed"),
        ({"metadata": {"k": "v" * 513}}, "metadata.k"),
        ({"method": {"type": "ppo"}}, "method.type"),
        (
            {"method": {"supervised": {"hyperparameters": {"n_epochs": 0}}}},
            "method.supervised.hyperparameters.n_epochs",
        ),
        ({"hyperparameters": {"batch_size": "big"}}, "hyperparameters.batch_size"),
        ({"model": ""}, "model"),
        ({"training_file": None}, "training_file"),
    ],
    ids=lambda value: json.dumps(value)[:40] if isinstance(value, dict) else value,
)
def test_bad_body_is_refused_naming_the_field(client, body, settings, change, param):
    assert_error(create(client, body | change), 400, param)
    assert rows(settings, Job) == []


def test_a_missing_required_field_is_named(client, body):
    del body["training_file"]
    error = assert_error(create(client, body), 400, "training_file")
    assert "required" in error["message"]


def test_hyperparameters_in_two_places_are_refused(client, body, settings):
    body |= {"method": {"type": "supervised"}, "hyperparameters": {"n_epochs": 2}}
    error = assert_error(create(client, body), 400, "hyperparameters")
    assert "not both" in error["message"]
    assert rows(settings, Job) == []


def test_max_seq_length_over_the_model_limit_is_refused(client, body, settings):
    body["training"] = {"max_seq_length": 513}
    error = assert_error(create(client, body), 400, "training.max_seq_length")
    assert "512" in error["message"]
    assert rows(settings, Job) == []


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("relative/../../etc", "neither a Hugging Face id"),
        ("./models/tiny", "neither a Hugging Face id"),
        ("/nonexistent/model", "is not a model directory this service can read"),
        ("/tmp/" + "a" * 300, "is not a model directory"),  # is_dir() itself raises
        ("/proc/1/root", "is not a model directory"),  # realpath() itself raises
        ("/proc/self/cwd", "is not a model directory"),
    ],
)
def test_unusable_models_are_refused(client, body, settings, model, message):
    body["model"] = model
    error = assert_error(create(client, body), 400, "model", "model_not_available")
    assert message in error["message"]
    assert rows(settings, Job) == []


def test_a_refused_model_path_reveals_no_server_path(client, body, settings):
    """The message names the model as it was sent, never where it leads: not the install
    directory (`/proc/self/cwd`), not the database file an open descriptor points at."""
    server_paths = {os.getcwd(), str(settings.data_dir)}
    for model in ["/proc/self/cwd", "/proc/self/cwd/..", "/proc/1/root", "/proc/self/root/etc"]:
        model_fds = [f"/proc/self/fd/{fd.name}" for fd in Path("/proc/self/fd").iterdir()]
        for sent in [model, *model_fds[:8]]:
            body["model"] = sent
            error = assert_error(create(client, body), 400, "model", "model_not_available")
            shown = error["message"].replace(repr(sent), "")
            assert not any(path in shown for path in server_paths), error["message"]


def test_a_directory_without_a_model_is_refused(client, body, model_dir):
    (model_dir / "config.json").unlink()
    error = assert_error(create(client, body), 400, "model")
    assert "config.json" in error["message"]


def test_the_allow_list_is_enforced_on_normalised_paths(make_settings, model_dir, tmp_path):
    allowed = str(tmp_path / "models" / "*")
    link = tmp_path / "models" / "link-out"
    link.symlink_to("/etc")
    with TestClient(create_app(make_settings(allowed_models=[allowed])), base_url=LOCAL) as client:
        file_id = upload(client, CHAT).json()["id"]
        escape = f"{model_dir}/../../../etc"
        for model in ("meta-llama/Llama-3.1-8B", escape, "/etc", "/no/such/dir", str(link)):
            response = create(client, {"model": model, "training_file": file_id})
            error = assert_error(response, 400, "model", "model_not_available")
            # Whether a path outside the list exists does not show: one message for all.
            assert error["message"].startswith(f"model {model!r} is not allowed here")
        assert create(client, {"model": str(model_dir), "training_file": file_id}).is_success


def test_a_hub_id_defers_max_seq_length_to_the_worker(client, body):
    body["model"] = "meta-llama/Llama-3.1-8B"
    job = create(client, body).json()
    assert job["status"] == "queued"
    assert job["config"]["training"]["max_seq_length"] is None


@pytest.mark.both_backends
@pytest.mark.parametrize("field", ["training_file", "validation_file"])
def test_files_must_exist_and_belong_to_the_caller(make_settings, model_dir, field):
    app = create_app(make_settings(api_keys=["a:key-a", "b:key-b"]))
    with TestClient(app, base_url=LOCAL) as client:
        theirs = upload(client, CHAT, headers={"Authorization": "Bearer key-b"}).json()["id"]
        mine = upload(client, CHAT, headers={"Authorization": "Bearer key-a"}).json()["id"]
        for file_id in (theirs, "file-doesnotexist", "not-an-id"):
            body = {"model": str(model_dir), "training_file": mine, field: file_id}
            response = client.post(
                "/v1/fine_tuning/jobs", json=body, headers={"Authorization": "Bearer key-a"}
            )
            assert_error(response, 400, field, "file_not_found")


def test_an_unreachable_queue_stores_no_job(make_settings, model_dir):
    settings = make_settings(broker_url="redis://127.0.0.1:1/0")
    with TestClient(create_app(settings), base_url=LOCAL) as client:
        file_id = upload(client, CHAT).json()["id"]
        response = create(client, {"model": str(model_dir), "training_file": file_id})
    assert_error(response, 503, None, "queue_unavailable")
    assert rows(settings, Job) == []
    assert rows(settings, JobEvent) == []


@pytest.mark.both_backends
def test_list_pages_newest_first(client, body):
    ids = [create(client, body).json()["id"] for _ in range(3)]
    page = client.get("/v1/fine_tuning/jobs", params={"limit": 2}).json()
    assert [job["id"] for job in page["data"]] == ids[::-1][:2]
    assert page["has_more"] is True
    rest = client.get("/v1/fine_tuning/jobs", params={"after": page["last_id"]}).json()
    assert [job["id"] for job in rest["data"]] == [ids[0]]
    assert rest["has_more"] is False


def test_cancel_a_queued_job(client, body, settings):
    job = create(client, body).json()
    response = client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
    assert response.status_code == 200, response.text
    cancelled = response.json()
    assert cancelled["status"] == "cancelled"
    assert cancelled["finished_at"] is not None
    (row,) = rows(settings, Job)
    assert row.status == JobStatus.CANCELLED
    again = client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
    assert_error(again, 409, "id", "job_not_cancellable")
    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()
    assert events["data"][0]["message"] == "Job cancelled"  # newest first
    assert events["data"][0]["object"] == "fine_tuning.job.event"


@pytest.mark.both_backends
def test_pause_a_queued_job_then_resume_it(client, body, settings):
    job = create(client, body).json()
    paused = client.post(f"/v1/fine_tuning/jobs/{job['id']}/pause")
    assert paused.status_code == 200, paused.text
    assert (paused.json()["status"], paused.json()["estimated_finish"]) == ("paused", None)
    (row,) = rows(settings, Job)
    assert (row.status, row.enqueued_at) == (JobStatus.PAUSED, None)
    # Its message still waits on the broker: a worker that takes it starts nothing.
    with lifecycle_session(settings) as session:
        assert lifecycle.claim(session, job["id"], "w") is None
    assert_error(
        client.post(f"/v1/fine_tuning/jobs/{job['id']}/pause"), 409, "id", "job_not_pausable"
    )

    resumed = client.post(f"/v1/fine_tuning/jobs/{job['id']}/resume")
    assert resumed.status_code == 200, resumed.text
    assert resumed.json()["status"] == "queued"
    (row,) = rows(settings, Job)
    assert row.status == JobStatus.QUEUED
    assert row.enqueued_at is not None  # a new message went to the queue
    again = client.post(f"/v1/fine_tuning/jobs/{job['id']}/resume")
    error = assert_error(again, 409, "id", "job_not_paused")
    assert "is queued: only a paused job can be resumed" in error["message"]
    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()["data"]
    assert [event["message"] for event in events[:2]] == [
        "Job resumed: queued again",
        "Job paused while queued",
    ]


def test_a_paused_job_can_be_cancelled_and_a_finished_one_neither_paused_nor_resumed(
    client, body, settings
):
    job_id = create(client, body).json()["id"]
    assert client.post(f"/v1/fine_tuning/jobs/{job_id}/pause").json()["status"] == "paused"
    assert client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    error = assert_error(
        client.post(f"/v1/fine_tuning/jobs/{job_id}/pause"), 409, "id", "job_not_pausable"
    )
    assert error["message"] == (
        f"Job {job_id} has cancelled: only a queued or running job can be paused"
    )
    assert_error(client.post(f"/v1/fine_tuning/jobs/{job_id}/resume"), 409, "id", "job_not_paused")


def test_pausing_a_running_job_asks_its_run_to_pause_at_its_next_step(client, body, settings):
    job_id = create(client, body).json()["id"]
    with lifecycle_session(settings) as session:
        run = lifecycle.claim(session, job_id, "w")
    assert run is not None
    for _ in range(2):  # asking twice is asking once
        pausing = client.post(f"/v1/fine_tuning/jobs/{job_id}/pause").json()
        assert (pausing["status"], pausing["pause_requested"]) == ("running", True)
    assert_error(client.post(f"/v1/fine_tuning/jobs/{job_id}/resume"), 409, "id", "job_not_paused")
    with lifecycle_session(settings) as session:
        assert lifecycle.progress(session, run, 3, 10, 0.5, None) == "pause"
        assert lifecycle.requeue(session, job_id, run.holds(), "-", resume_step=2) == "paused"
    paused = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert (paused["status"], paused["pause_requested"]) == ("paused", False)
    assert (paused["progress"]["steps_done"], paused["estimated_finish"]) == (2, None)
    events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events").json()["data"]
    messages = [event["message"] for event in events]
    assert messages[:2] == [
        "Job paused: it resumes from step 2",
        "Pause requested: the job saves a checkpoint at its next step, then pauses",
    ]
    assert messages.count(messages[1]) == 1


def test_a_queued_job_has_events_but_no_checkpoints_or_metrics(client, body):
    job_id = create(client, body).json()["id"]
    events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events").json()
    assert events["data"][0]["message"] == "Job queued"
    checkpoints = client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()
    assert (checkpoints["data"], checkpoints["has_more"]) == ([], False)
    metrics = client.get(f"/v1/fine_tuning/jobs/{job_id}/metrics").json()
    assert metrics == {"object": "list", "job_id": job_id, "data": [], "has_more": False}


@pytest.mark.both_backends
@pytest.mark.parametrize(
    "path",
    ["", "/cancel", "/pause", "/resume", "/events", "/checkpoints", "/metrics"],
)
def test_another_projects_job_is_not_found(make_settings, model_dir, path):
    app = create_app(make_settings(api_keys=["a:key-a", "b:key-b"]))
    with TestClient(app, base_url=LOCAL) as client:
        a = {"Authorization": "Bearer key-a"}
        file_id = upload(client, CHAT, headers=a).json()["id"]
        job_id = client.post(
            "/v1/fine_tuning/jobs",
            json={"model": str(model_dir), "training_file": file_id},
            headers=a,
        ).json()["id"]
        b = {"Authorization": "Bearer key-b"}
        method = client.post if path in ("/cancel", "/pause", "/resume") else client.get
        assert_error(method(f"/v1/fine_tuning/jobs/{job_id}{path}", headers=b), 404, "id")
        assert client.get("/v1/fine_tuning/jobs", headers=b).json()["data"] == []
        if path == "/resume":
            client.post(f"/v1/fine_tuning/jobs/{job_id}/pause", headers=a)
        assert method(f"/v1/fine_tuning/jobs/{job_id}{path}", headers=a).status_code == 200


def test_unknown_job_ids_are_not_found(client):
    for job_id in ("ftjob-doesnotexist", "file-abc", "x" * 300):
        assert_error(client.get(f"/v1/fine_tuning/jobs/{job_id}"), 404, "id", "not_found")


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"seed": True}, "seed"),
        ({"hyperparameters": {"n_epochs": "3"}}, "hyperparameters.n_epochs"),
        ({"hyperparameters": {"batch_size": True}}, "hyperparameters.batch_size"),
        ({"lora": {"r": True}}, "lora.r"),
        ({"training": {"packing": "yes"}}, "training.packing"),
        ({"training": {"packing": 1}}, "training.packing"),
        ({"quantization": {"double_quant": "false"}}, "quantization.double_quant"),
        ({"training": {"save_steps": 10**30}}, "training.save_steps"),
    ],
    ids=lambda value: json.dumps(value)[:40] if isinstance(value, dict) else value,
)
def test_values_of_the_wrong_json_type_are_not_coerced(client, body, settings, change, param):
    assert_error(create(client, body | change), 400, param)
    assert rows(settings, Job) == []


def test_a_float_field_takes_a_json_integer(client, body):
    body["lora"] = {"alpha": 16}
    assert create(client, body).json()["config"]["lora"]["alpha"] == 16


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("/tmp/x\u0000y", "control characters"),
        ("org/..", "neither a Hugging Face id"),
    ],
)
def test_model_names_with_tricks_are_refused(client, body, model, message):
    body["model"] = model
    error = assert_error(create(client, body), 400, "model", "model_not_available")
    assert message in error["message"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[" * 200_000, "cannot read"),
        ("{not json", "cannot read"),
        (" " * (1024 * 1024 + 1), "over 1048576 bytes"),
    ],
    ids=["deep", "invalid", "huge"],
)
def test_a_bad_config_json_is_refused(client, body, model_dir, content, message):
    (model_dir / "config.json").write_text(content)
    error = assert_error(create(client, body), 400, "model")
    assert message in error["message"]


def test_a_config_json_that_is_not_a_file_is_refused(client, body, model_dir):
    (model_dir / "config.json").unlink()
    os.mkfifo(model_dir / "config.json")  # reading it would block the request forever
    error = assert_error(create(client, body), 400, "model")
    assert "is not a model directory" in error["message"]


def test_a_symlink_out_of_the_allow_list_is_refused(make_settings, model_dir, tmp_path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "link").symlink_to(model_dir.parent)
    with TestClient(
        create_app(make_settings(allowed_models=[f"{allowed}/*"])), base_url=LOCAL
    ) as client:
        file_id = upload(client, CHAT).json()["id"]
        response = create(client, {"model": f"{allowed}/link/tiny", "training_file": file_id})
    assert_error(response, 400, "model", "model_not_available")


@pytest.mark.both_backends
def test_a_fine_tuned_model_name_over_the_column_is_refused(client, body, tmp_path, settings):
    deep = tmp_path / ("d" * 200) / ("e" * 200)  # under 512, but not with the rest
    deep.mkdir(parents=True)
    (deep / "config.json").write_text("{}")
    body |= {"model": str(deep), "suffix": "s" * 64}
    assert_error(create(client, body), 400, "suffix", "name_too_long")
    assert rows(settings, Job) == []


def test_a_body_that_is_not_json_is_refused_plainly(client):
    response = client.post(
        "/v1/fine_tuning/jobs", content=b"hello", headers={"Content-Type": "application/json"}
    )
    error = assert_error(response, 400, None)
    assert error["message"].startswith("the body is not valid JSON")


@pytest.mark.both_backends
@pytest.mark.parametrize("field", ["training_file", "validation_file"])
def test_a_file_an_unfinished_job_uses_cannot_be_deleted(client, body, settings, field):
    used = upload(client, jsonl({"prompt": "a", "completion": "b"})).json()["id"]
    job = create(client, {**body, field: used}).json()
    response = client.delete(f"/v1/files/{used}")
    error = assert_error(response, 409, "id", "file_in_use")
    assert job["id"] in error["message"]
    assert client.get(f"/v1/files/{used}").status_code == 200
    assert (Path(settings.storage_url) / "files" / f"{used}.jsonl").is_file()

    client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
    assert client.delete(f"/v1/files/{used}").json() == {
        "id": used,
        "object": "file",
        "deleted": True,
    }
    assert client.get(f"/v1/files/{used}").status_code == 404


def test_a_json_body_over_its_limit_is_refused_before_it_is_read(make_settings, body):
    settings = make_settings(max_json_bytes=1000)
    with TestClient(create_app(settings), base_url=LOCAL) as client:
        big = {**body, "suffix": "x" * 2000}
        response = client.post("/v1/fine_tuning/jobs", json=big)
        error = assert_error(response, 413, None, "request_too_large")
        assert "AFINA_MAX_JSON_BYTES" in error["message"]
        chunks = iter([json.dumps(big).encode()])  # no Content-Length: counted as it comes
        streamed = client.post(
            "/v1/fine_tuning/jobs", content=chunks, headers={"content-type": "application/json"}
        )
        assert_error(streamed, 413, None, "request_too_large")
        assert client.post("/v1/fine_tuning/jobs", json=body).status_code == 200
    assert len(rows(settings, Job)) == 1


def test_a_new_jobs_first_events_list_in_the_order_they_were_written(client, settings, monkeypatch):
    """They are written in one transaction; the list orders by time, then by a random id.
    With the clock stopped, only the microsecond between them keeps their order."""
    now = datetime(2026, 1, 1, tzinfo=UTC)
    monkeypatch.setattr(lifecycle, "utcnow", lambda: now)
    training = upload(client, CHAT).json()["id"]
    for _ in range(5):
        job = client.post(
            "/v1/fine_tuning/jobs", json={"model": "org/base", "training_file": training}
        ).json()["id"]
        events = client.get(f"/v1/fine_tuning/jobs/{job}/events").json()["data"]
        assert [event["message"] for event in reversed(events)] == [
            f"Validated training file {training}: 10 chat examples",
            "Could not check that the job fits a worker: the model's config.json ('org/base') "
            "is not on this server or gives no model size (a hub model's is read from this "
            "machine's Hugging Face cache)",
            "Queued on train: the default queue (no worker class was checked)",
            "Job queued",
        ]
        written = sorted(e.created_at for e in rows(settings, JobEvent) if e.job_id == job)
        assert written == [now + timedelta(microseconds=n) for n in range(4)]


PREFERENCE = jsonl(
    {
        "input": {"messages": [{"role": "user", "content": "2+2?"}]},
        "preferred_output": [{"role": "assistant", "content": "4"}],
        "non_preferred_output": [{"role": "assistant", "content": "5"}],
    }
)


@pytest.mark.parametrize("param", ["training_file", "validation_file"])
def test_preference_data_uploads_but_does_not_train_a_supervised_job(client, settings, param):
    uploaded = upload(client, PREFERENCE).json()
    assert uploaded["validation"]["format"] == "preference"
    chat = upload(client, CHAT).json()["id"]
    body = {"model": "org/base", "training_file": chat, param: uploaded["id"]}
    error = assert_error(
        client.post("/v1/fine_tuning/jobs", json=body), 400, param, "invalid_file_format"
    )
    assert "preference data" in error["message"]
    assert rows(settings, Job) == []


PAIRS = jsonl(
    *(
        {
            "input": {"messages": [{"role": "user", "content": f"{n}+{n}?"}]},
            "preferred_output": [{"role": "assistant", "content": str(2 * n)}],
            "non_preferred_output": [{"role": "assistant", "content": "no idea"}],
        }
        for n in range(6)
    )
)


def dpo_method(**hyperparameters) -> dict:
    return {"type": "dpo", "dpo": {"hyperparameters": hyperparameters}}


@pytest.mark.both_backends
def test_a_dpo_job_on_preference_data_is_queued_with_its_method_and_beta(client, settings, body):
    pairs = upload(client, PAIRS).json()["id"]
    job = create(
        client, {**body, "training_file": pairs, "method": dpo_method(beta=0.25, n_epochs=2)}
    ).json()
    assert job["status"] == "queued"
    assert job["method"] == {
        "type": "dpo",
        "supervised": None,
        "dpo": {"hyperparameters": job["hyperparameters"]},
    }
    assert job["hyperparameters"] == {
        "n_epochs": 2,
        "batch_size": 4,
        "learning_rate_multiplier": 1.0,
        "beta": 0.25,
    }
    assert job["config"]["method"] == "dpo"
    assert job["config"]["training"]["padding_free"] is False
    assert job["config"]["evaluation"] == {"samples": 16, "max_new_tokens": 256}
    assert job["result_files"] == []
    assert job["continued_from"] is None
    default = create(client, {**body, "training_file": pairs, "method": {"type": "dpo"}}).json()
    assert default["hyperparameters"]["beta"] == 0.1
    supervised = create(client, body).json()
    assert supervised["method"]["type"] == "supervised"
    assert "beta" not in supervised["hyperparameters"]


@pytest.mark.parametrize("param", ["training_file", "validation_file"])
def test_a_dpo_job_refuses_a_supervised_dataset_naming_the_field(client, settings, body, param):
    pairs = upload(client, PAIRS).json()["id"]
    chat = upload(client, CHAT).json()["id"]
    files = {"training_file": pairs, "validation_file": pairs, param: chat}
    error = assert_error(
        create(client, {**body, **files, "method": dpo_method()}), 400, param, "invalid_file_format"
    )
    assert "method 'dpo' trains on preference data" in error["message"]
    assert rows(settings, Job) == []


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"method": dpo_method(beta=0)}, "method.dpo.hyperparameters.beta"),
        ({"method": dpo_method(gamma=1)}, "method.dpo.hyperparameters.gamma"),
        ({"method": {"type": "supervised", "dpo": {}}}, "method.dpo"),
        ({"method": dpo_method(), "training": {"packing": True}}, "training.packing"),
        ({"evaluation": {"samples": 257}}, "evaluation.samples"),
        ({"evaluation": {"sample": 4}}, "evaluation.sample"),
    ],
)
def test_dpo_and_evaluation_fields_are_validated_by_name(client, settings, body, extra, param):
    body["training_file"] = upload(client, PAIRS).json()["id"]
    assert_error(create(client, {**body, **extra}), 400, param)
    assert rows(settings, Job) == []


def add_succeeded_job(settings, project: str, model: str, **config) -> Job:
    resolved = resolve_config(
        ConfigRequest.model_validate(config), num_examples=10, model_max_length=512
    )
    job = job_row(
        project=project,
        status=JobStatus.SUCCEEDED,
        model=model,
        config=resolved.model_dump(mode="json"),
    )
    job.fine_tuned_model = job.fine_tuned_model_name()
    add_rows(settings, job)
    return job


def test_a_job_may_train_the_caller_s_fine_tuned_model_further(client, settings, body):
    parent = add_succeeded_job(settings, "default", body["model"], lora={"r": 8, "alpha": 16})
    pairs = upload(client, PAIRS).json()["id"]
    job = create(
        client,
        {"model": parent.fine_tuned_model, "training_file": pairs, "method": {"type": "dpo"}},
    ).json()
    # The job trains the adapter further on its base, with the adapter's LoRA settings.
    assert job["model"] == body["model"]
    assert job["continued_from"] == parent.fine_tuned_model
    assert (job["config"]["lora"]["r"], job["config"]["lora"]["alpha"]) == (8, 16)
    [stored] = [row for row in rows(settings, Job) if row.id == job["id"]]
    assert stored.parent_job_id == parent.id
    # Asking for other LoRA settings contradicts the adapter.
    error = assert_error(
        create(
            client,
            {
                "model": parent.fine_tuned_model,
                "training_file": pairs,
                "method": {"type": "dpo"},
                "lora": {"r": 16},
            },
        ),
        400,
        "lora",
        "lora_mismatch",
    )
    assert '"r":8' in error["message"]


def test_a_job_may_train_one_of_the_caller_s_checkpoints_further(client, settings, body):
    parent = add_succeeded_job(settings, "default", body["model"], lora={"r": 4})
    add_checkpoint(settings, parent.id, 6)
    job = create(client, {**body, "model": f"{parent.id}:ckpt-step-6"}).json()
    assert (job["model"], job["continued_from"]) == (body["model"], f"{parent.id}:ckpt-step-6")
    assert job["config"]["lora"]["r"] == 4
    [stored] = [row for row in rows(settings, Job) if row.id == job["id"]]
    assert (stored.parent_job_id, stored.parent_step) == (parent.id, 6)
    error = assert_error(
        create(client, {**body, "model": f"{parent.id}:ckpt-step-7"}), 404, "model"
    )
    assert error["code"] == "model_not_found"


def add_checkpoint(settings, job_id: str, step: int) -> None:
    add_rows(settings, JobCheckpoint(id=f"ftckpt-{job_id}-{step}", job_id=job_id, step=step))


def test_another_project_s_or_an_unknown_fine_tuned_model_is_a_404(client, settings, body):
    other = add_succeeded_job(settings, "other", body["model"])
    add_checkpoint(settings, other.id, 2)
    unknown = f"ft:{body['model']}:default::12345678"
    for model in (other.fine_tuned_model, f"{other.id}:ckpt-step-2", unknown):
        error = assert_error(
            create(client, {**body, "model": model}), 404, "model", "model_not_found"
        )
        assert "No fine-tuned model" in error["message"]
    assert [row.id for row in rows(settings, Job)] == [other.id]


def test_a_job_cannot_train_on_a_result_file_which_lists_under_its_purpose(client, settings, body):
    result = File(
        id="file-results1",
        project="default",
        filename="ftjob-x-metrics.csv",
        purpose=RESULTS_PURPOSE,
        bytes=5,
        format="csv",
        num_examples=1,
        estimated_tokens=0,
    )
    add_rows(settings, result)
    listed = client.get("/v1/files", params={"purpose": RESULTS_PURPOSE}).json()["data"]
    assert [(file["id"], file["validation"]) for file in listed] == [(result.id, None)]
    for param in ("training_file", "validation_file"):
        assert_error(create(client, {**body, param: result.id}), 400, param, "invalid_file_purpose")
    assert rows(settings, Job) == []


def test_a_model_an_unfinished_job_trains_further_cannot_be_deleted(client, settings):
    parent = job_row(project="default", status=JobStatus.SUCCEEDED, model="org/base")
    parent.fine_tuned_model = parent.fine_tuned_model_name()
    child = job_row(project="default", status=JobStatus.PAUSED, parent_job_id=parent.id)
    add_rows(settings, parent, child)
    refused = client.delete(f"/v1/models/{parent.fine_tuned_model}")
    error = assert_error(refused, 409, "model", "model_in_use")
    assert child.id in error["message"]
    assert [row.model_deleted_at for row in rows(settings, Job) if row.id == parent.id] == [None]
    assert client.post(f"/v1/fine_tuning/jobs/{child.id}/cancel").status_code == 200
    deleted = client.delete(f"/v1/models/{parent.fine_tuned_model}")
    assert deleted.json() == {"id": parent.fine_tuned_model, "object": "model", "deleted": True}


def test_a_checkpoint_step_past_any_name_is_a_400_not_an_overflow(client, settings):
    job = job_row(project="default", status=JobStatus.SUCCEEDED)
    job.fine_tuned_model = job.fine_tuned_model_name()
    add_rows(settings, job)
    huge = 10**20
    downloaded = client.get(f"/v1/fine_tuning/jobs/{job.id}/adapter", params={"checkpoint": huge})
    assert_error(downloaded, 400, "checkpoint")
    exported = client.post(
        f"/v1/fine_tuning/jobs/{job.id}/exports", json={"format": "merged", "checkpoint": 1e20}
    )
    assert_error(exported, 400, "checkpoint")
    missing = client.get(f"/v1/fine_tuning/jobs/{job.id}/adapter", params={"checkpoint": 10**9 - 1})
    assert_error(missing, 404, "checkpoint", "checkpoint_not_found")
