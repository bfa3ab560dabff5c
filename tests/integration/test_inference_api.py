"""The generation endpoints and /v1/models through HTTP, with no model: which names resolve,
which refusals come back (status, param, code), and what the model list shows. Nothing
here generates: the engine thread is replaced by one that fails the test if it ever runs.

Jobs are written straight into the database in the states a worker would leave them in."""

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient

from afina.api.app import create_app
from afina.core.ids import new_id
from afina.core.settings import Settings
from afina.core.storage import adapter_key, checkpoint_key
from afina.models import JobCheckpoint, JobStatus
from afina.serving.engine import InferenceEngine
from tests.support import LOCAL, add_rows, assert_error, job_row

ALLOWED = ["/models/a", "org/*"]
HELLO = [{"role": "user", "content": "hello"}]


pytestmark = pytest.mark.usefixtures("no_generation")


@pytest.fixture
def settings(make_settings) -> Settings:
    return make_settings(allowed_models=ALLOWED, max_new_tokens=100)


@dataclass
class Stored:
    id: str
    model: str
    fine_tuned_model: str | None


def add_job(
    settings: Settings,
    status: JobStatus,
    *,
    project: str = "default",
    model: str = "/models/a",
    suffix: str | None = None,
    finished_at: datetime | None = None,
    checkpoints: tuple[int, ...] = (),
) -> Stored:
    """A job row as a worker leaves it: a succeeded one has its fine-tuned model's name."""
    job = job_row(
        project=project, status=status, model=model, training_file_id=new_id("file"), suffix=suffix
    )
    if status == JobStatus.SUCCEEDED:
        job.fine_tuned_model = job.fine_tuned_model_name()
        job.finished_at = finished_at or datetime.now(UTC)
    saved = [
        JobCheckpoint(id=new_id("ftckpt"), job_id=job.id, step=step, metrics={})
        for step in checkpoints
    ]
    add_rows(settings, job, *saved)
    return Stored(job.id, job.model, job.fine_tuned_model)


def put_adapter(settings: Settings, key: str) -> None:
    """Adapter files in artifact storage, as far as the API looks."""
    directory = Path(settings.storage_url) / key
    directory.mkdir(parents=True)
    (directory / "adapter_config.json").write_text("{}")


def chat(client: TestClient, model: str, headers: dict[str, str] | None = None, **fields: Any):
    body = {"model": model, "messages": HELLO, **fields}
    return client.post("/v1/chat/completions", json=body, headers=headers)


def complete(client: TestClient, model: str, **fields: Any):
    return client.post("/v1/completions", json={"model": model, "prompt": "hello", **fields})


def generate(client: TestClient, headers: dict[str, str] | None = None, **fields: Any):
    return client.post("/generate", json=fields, headers=headers)


# --- which names resolve ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["nope", "org/anything", "/models/b", "ft:/models/a:default::abcdefgh", "ftjob-missing"],
)
def test_an_unknown_model_is_a_404_on_every_endpoint(client, name):
    for response in (chat(client, name), complete(client, name)):
        error = assert_error(response, 404, "model", "model_not_found")
        assert "GET /v1/models" in error["message"]
    assert_error(generate(client, model=name, prompt="hi"), 404, "model", "model_not_found")
    assert_error(client.get(f"/v1/models/{name}"), 404, "model", "model_not_found")


def test_an_unknown_job_id_is_a_404_naming_job_id(client):
    for job_id in ("ftjob-missing", "not-a-job", "ft:/models/a:default::abcdefgh"):
        response = generate(client, job_id=job_id, prompt="hi")
        assert_error(response, 404, "job_id", "model_not_found")


@pytest.mark.parametrize("status", [JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.FAILED])
def test_a_job_that_has_not_succeeded_is_not_ready(client, settings, status):
    job = add_job(settings, status)
    for response in (chat(client, job.id), complete(client, job.id)):
        error = assert_error(response, 409, "model", "model_not_ready")
        assert status.value in error["message"]
    assert_error(generate(client, job_id=job.id, prompt="hi"), 409, "job_id", "model_not_ready")
    assert_error(generate(client, model=job.id, prompt="hi"), 409, "model", "model_not_ready")
    assert_error(client.get(f"/v1/models/{job.id}"), 409, "model", "model_not_ready")


def test_a_succeeded_job_whose_adapter_is_missing_is_a_404(client, settings):
    job = add_job(settings, JobStatus.SUCCEEDED, suffix="gone")
    assert job.fine_tuned_model
    for name in (job.fine_tuned_model, job.id):
        error = assert_error(chat(client, name), 404, "model", "adapter_not_found")
        assert "missing from storage" in error["message"]
        assert_error(complete(client, name), 404, "model", "adapter_not_found")
    response = generate(client, job_id=job.id, prompt="hi")
    assert_error(response, 404, "job_id", "adapter_not_found")
    response = generate(client, model=job.fine_tuned_model, messages=HELLO)
    assert_error(response, 404, "model", "adapter_not_found")
    assert_error(
        client.get(f"/v1/models/{job.fine_tuned_model}"), 404, "model", "adapter_not_found"
    )


def test_a_stored_adapter_makes_the_fine_tuned_model_retrievable(client, settings):
    job = add_job(settings, JobStatus.SUCCEEDED, suffix="here")
    put_adapter(settings, adapter_key(job.id))
    for name in (job.fine_tuned_model, job.id):
        response = client.get(f"/v1/models/{name}")
        assert response.status_code == 200, response.text
        found = response.json()
        assert found["object"] == "model"
        assert found["owned_by"] == "default"
    assert client.get(f"/v1/models/{job.fine_tuned_model}").json()["parent"] == "/models/a"


def test_checkpoint_names(client, settings):
    job = add_job(settings, JobStatus.RUNNING, checkpoints=(10, 20))
    put_adapter(settings, checkpoint_key(job.id, 10))
    # A step with no checkpoint row is unknown, even with files in storage.
    put_adapter(settings, checkpoint_key(job.id, 30))
    for step in (30, 5):
        name = f"{job.id}:ckpt-step-{step}"
        assert_error(chat(client, name), 404, "model", "model_not_found")
        assert_error(generate(client, model=name, prompt="hi"), 404, "model", "model_not_found")
    # A row whose files are gone.
    name = f"{job.id}:ckpt-step-20"
    assert_error(chat(client, name), 404, "model", "adapter_not_found")
    # A saved checkpoint of a job still running can be called.
    name = f"{job.id}:ckpt-step-10"
    response = client.get(f"/v1/models/{name}")
    assert response.status_code == 200, response.text
    assert response.json()["id"] == name
    assert response.json()["owned_by"] == "default"
    # Of a job that does not exist.
    assert_error(chat(client, "ftjob-nothere:ckpt-step-10"), 404, "model", "model_not_found")


@pytest.mark.both_backends
def test_another_projects_models_are_not_found(make_settings):
    settings = make_settings(api_keys=["a:key1", "b:key2"], allowed_models=ALLOWED)
    mine = add_job(settings, JobStatus.SUCCEEDED, project="a", suffix="mine")
    theirs = add_job(settings, JobStatus.SUCCEEDED, project="b", suffix="theirs", checkpoints=(1,))
    for job in (mine, theirs):
        put_adapter(settings, adapter_key(job.id))
    put_adapter(settings, checkpoint_key(theirs.id, 1))
    key_a = {"Authorization": "Bearer key1"}
    key_b = {"Authorization": "Bearer key2"}
    with TestClient(create_app(settings), base_url=LOCAL) as client:
        assert client.get(f"/v1/models/{mine.fine_tuned_model}", headers=key_a).is_success
        assert client.get(f"/v1/models/{theirs.fine_tuned_model}", headers=key_b).is_success
        for name in (theirs.fine_tuned_model, theirs.id, f"{theirs.id}:ckpt-step-1"):
            assert_error(chat(client, name, key_a), 404, "model", "model_not_found")
            response = generate(client, key_a, model=name, prompt="hi")
            assert_error(response, 404, "model", "model_not_found")
            response = client.get(f"/v1/models/{name}", headers=key_a)
            assert_error(response, 404, "model", "model_not_found")
        response = generate(client, key_a, job_id=theirs.id, prompt="hi")
        assert_error(response, 404, "job_id", "model_not_found")
        listed = client.get("/v1/models", headers=key_a).json()["data"]
        assert [entry["id"] for entry in listed] == ["/models/a", mine.fine_tuned_model]


# --- request bodies --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"tools": []}, "tools"),
        ({"stream": "yes"}, "stream"),
        ({"max_tokens": "10"}, "max_tokens"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        ({"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
        ({"model": ""}, "model"),
    ],
    ids=lambda value: str(value)[:40],
)
def test_a_bad_chat_body_is_a_400_naming_the_field(client, fields, param):
    body = {"model": "/models/a", "messages": HELLO, **fields}
    response = client.post("/v1/chat/completions", json=body)
    assert_error(response, 400, param, "invalid_request")


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"echo": True}, "echo"),
        ({"seed": 2**64}, "seed"),
    ],
    ids=lambda value: str(value)[:40],
)
def test_a_bad_completion_body_is_a_400_naming_the_field(client, fields, param):
    assert_error(complete(client, "/models/a", **fields), 400, param, "invalid_request")


def test_a_completion_without_a_prompt_is_a_400_naming_it(client):
    response = client.post("/v1/completions", json={"model": "/models/a"})
    error = assert_error(response, 400, "prompt", "invalid_request")
    assert "field required" in error["message"]


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 1}, "n"),  # an OpenAI field, not afina's
        ({"stream": "yes"}, "stream"),
        ({"messages": []}, "messages"),
    ],
    ids=lambda value: str(value)[:40],
)
def test_a_bad_generate_body_is_a_400_naming_the_field(client, fields, param):
    response = generate(client, **{"model": "/models/a", "prompt": "hi", **fields})
    assert_error(response, 400, param, "invalid_request")


@pytest.mark.parametrize(
    ("stop", "message"),
    [(["a", "b", "c", "d", "e"], "at most 4 items"), ("", "at least 1 character")],
)
def test_a_bad_stop_is_a_400(client, stop, message):
    for response in (
        chat(client, "/models/a", stop=stop),
        complete(client, "/models/a", stop=stop),
        generate(client, model="/models/a", prompt="hi", stop=stop),
    ):
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "invalid_request"
        assert error["param"].startswith("stop")
        assert message in error["message"]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {"messages": HELLO, "stop": ["a"] * 5}, "stop"),
        ("/v1/completions", {"prompt": ["a", "b"]}, "prompt"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "image", "text": "x"}]}]},
            "messages[0].content[0].type",
        ),
    ],
    ids=["stop", "prompt", "content"],
)
def test_an_error_in_a_union_field_names_the_field(client, path, body, param):
    response = client.post(path, json={"model": "/models/a", **body})
    assert_error(response, 400, param, "invalid_request")


def test_body_validation_comes_before_the_model_lookup(client):
    assert_error(chat(client, "nope", temperature=3), 400, "temperature", "invalid_request")
    response = generate(client, model="nope", job_id="ftjob-nope", prompt="hi")
    assert_error(response, 400, "model", "invalid_request")


@pytest.mark.parametrize(
    ("path", "fields", "param"),
    [
        ("/v1/chat/completions", {"messages": HELLO, "max_tokens": 101}, "max_tokens"),
        (
            "/v1/chat/completions",
            {"messages": HELLO, "max_completion_tokens": 101},
            "max_completion_tokens",
        ),
        (
            "/v1/chat/completions",
            {"messages": HELLO, "max_tokens": 5, "max_completion_tokens": 101},
            "max_completion_tokens",
        ),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 101}, "max_tokens"),
        ("/generate", {"prompt": "hi", "max_new_tokens": 101}, "max_new_tokens"),
    ],
)
def test_max_tokens_over_the_server_ceiling_is_a_400(client, path, fields, param):
    response = client.post(path, json={"model": "/models/a", **fields})
    error = assert_error(response, 400, param, "invalid_value")
    assert "101" in error["message"]
    assert "AFINA_MAX_NEW_TOKENS" in error["message"]


def test_the_ceiling_is_checked_after_the_model_is_resolved(client):
    response = chat(client, "nope", max_tokens=101)
    assert_error(response, 404, "model", "model_not_found")


def test_a_streamed_request_is_refused_before_any_event(client):
    for response in (
        chat(client, "nope", stream=True),
        chat(client, "/models/a", stream=True, max_tokens=101),
        generate(client, model="nope", prompt="hi", stream=True),
    ):
        assert response.status_code in (400, 404), response.text
        assert response.headers["content-type"] == "application/json"
        assert response.json()["error"]["param"] in ("model", "max_tokens")


def test_the_ceiling_applies_to_a_generate_job_id_too(client, settings):
    job = add_job(settings, JobStatus.SUCCEEDED)
    put_adapter(settings, adapter_key(job.id))
    response = generate(client, job_id=job.id, prompt="hi", max_new_tokens=101)
    assert_error(response, 400, "max_new_tokens", "invalid_value")


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"model": "/models/a", "job_id": "ftjob-x", "prompt": "hi"}, "model"),
        ({"prompt": "hi"}, "model"),
        ({"model": "/models/a", "prompt": "hi", "messages": HELLO}, "prompt"),
        ({"model": "/models/a"}, "prompt"),
    ],
    ids=["model and job_id", "neither model nor job_id", "prompt and messages", "no prompt"],
)
def test_generate_needs_exactly_one_model_and_one_prompt(client, fields, param):
    error = assert_error(generate(client, **fields), 400, param, "invalid_request")
    assert "exactly one of" in error["message"]


def test_a_full_queue_is_a_429(app, client):
    engine: InferenceEngine = app.state.inference
    idle = SimpleNamespace(cancelled=False, post=lambda _event: None)
    engine._waiting = [(0.0, idle)] * app.state.settings.max_queued_generations
    try:
        response = chat(client, "/models/a")
    finally:
        engine._waiting = []
    error = assert_error(response, 429, None, "too_many_requests")
    assert error["type"] == "invalid_request_error"


def test_a_closed_engine_is_a_503(app, client):
    app.state.inference.close()
    response = generate(client, model="/models/a", prompt="hi")
    error = assert_error(response, 503, None, "shutting_down")
    assert error["type"] == "server_error"


# --- /v1/models ------------------------------------------------------------------------------


def test_models_lists_literal_bases_and_the_callers_fine_tuned_models(client, settings):
    earlier = datetime(2025, 1, 2, tzinfo=UTC)
    later = earlier + timedelta(days=1)
    trained_a = add_job(settings, JobStatus.SUCCEEDED, suffix="late", finished_at=later)
    trained_org = add_job(
        settings, JobStatus.SUCCEEDED, model="org/tiny", suffix="early", finished_at=earlier
    )
    add_job(settings, JobStatus.RUNNING, model="org/running")
    add_job(settings, JobStatus.QUEUED)
    add_job(settings, JobStatus.FAILED, model="org/failed")
    add_job(settings, JobStatus.SUCCEEDED, project="other", model="org/others", suffix="x")

    response = client.get("/v1/models")
    assert response.status_code == 200, response.text
    listing = response.json()
    assert listing["object"] == "list"
    entries = {entry["id"]: entry for entry in listing["data"]}
    assert list(entries) == [
        "/models/a",
        "org/tiny",
        trained_org.fine_tuned_model,
        trained_a.fine_tuned_model,
    ]
    for base in ("/models/a", "org/tiny"):
        assert entries[base]["owned_by"] == "system"
        assert entries[base]["parent"] is None
    assert entries[trained_a.fine_tuned_model] == {
        "id": trained_a.fine_tuned_model,
        "object": "model",
        "created": int(later.timestamp()),
        "owned_by": "default",
        "parent": "/models/a",
    }
    assert entries[trained_org.fine_tuned_model]["parent"] == "org/tiny"
    assert entries[trained_org.fine_tuned_model]["created"] == int(earlier.timestamp())


def test_models_lists_only_literal_allow_list_entries(client):
    response = client.get("/v1/models")
    assert response.status_code == 200, response.text
    assert response.json()["data"] == [
        {"id": "/models/a", "object": "model", "created": 0, "owned_by": "system", "parent": None}
    ]


def test_a_listed_base_model_is_retrievable(client):
    response = client.get("/v1/models//models/a")
    assert response.status_code == 200, response.text
    assert response.json()["id"] == "/models/a"
    assert response.json()["owned_by"] == "system"


# --- the official client ---------------------------------------------------------------------


@pytest.fixture
def openai_client(live_server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live_server}/v1", api_key="unused", max_retries=0)


def test_the_openai_client_lists_and_refuses_models(openai_client, settings):
    job = add_job(settings, JobStatus.SUCCEEDED, model="org/tiny", suffix="oa")
    put_adapter(settings, adapter_key(job.id))

    listed = openai_client.models.list()
    assert [entry.id for entry in listed] == ["/models/a", "org/tiny", job.fine_tuned_model]
    assert listed.data[-1].owned_by == "default"
    assert listed.data[-1].model_extra["parent"] == "org/tiny"
    found = openai_client.models.retrieve(job.fine_tuned_model or "")
    assert (found.id, found.owned_by) == (job.fine_tuned_model, "default")

    with pytest.raises(openai.NotFoundError) as missing:
        openai_client.chat.completions.create(model="nope", messages=HELLO)
    assert missing.value.code == "model_not_found"
    assert missing.value.param == "model"
    with pytest.raises(openai.NotFoundError):
        openai_client.models.retrieve("nope")
    with pytest.raises(openai.BadRequestError) as refused:
        openai_client.completions.create(model="/models/a", prompt="hi", temperature=2.5)
    assert refused.value.param == "temperature"


def test_a_fine_tuned_model_whose_base_left_the_allow_list_is_refused(make_settings):
    settings = make_settings(allowed_models=["/models/b"])
    job = add_job(settings, JobStatus.SUCCEEDED, checkpoints=(4,))
    put_adapter(settings, adapter_key(job.id))
    put_adapter(settings, checkpoint_key(job.id, 4))
    with TestClient(create_app(settings), base_url=LOCAL) as client:
        assert_error(chat(client, job.fine_tuned_model), 403, "model", "model_not_allowed")
        assert_error(chat(client, job.id), 403, "model", "model_not_allowed")
        assert_error(chat(client, f"{job.id}:ckpt-step-4"), 404, "model", "model_not_found")
        listed = [model["id"] for model in client.get("/v1/models").json()["data"]]
    assert listed == ["/models/b"]
