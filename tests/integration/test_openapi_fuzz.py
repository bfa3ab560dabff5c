"""Every operation of the OpenAPI schema, fuzzed in-process by schemathesis, with a valid API key.

For each operation schemathesis sends the schema's examples, its coverage cases (boundaries,
each constraint broken one at a time, unexpected methods, missing or wrong credentials) and
random requests, valid ones and invalid ones, and checks every answer: never a 5xx; a status
code, content type and body the schema documents for that operation; a request the schema
calls invalid refused with a 4xx; one it calls valid not refused with a 400 (see
`filter_failure` for the refusals no schema can foresee); 401 without the key or with a wrong
one; a 405 with an `Allow` header, which for OPTIONS lists exactly the documented methods.

Each test gets a fresh database holding a few objects of its project (a file, a queued job, a
succeeded job with its fine-tuned model, checkpoint and metrics), whose ids the generated path
parameters often take, and valid job bodies often name its file: the 200 answers are checked
too, not just the errors.

Nothing generates text: no model name resolves, since the allow-list is globs only (no base
is callable by name) and the succeeded job's base has left it (its model is refused with a
403); and the engine thread fails the test if it starts.

AFINA_FUZZ_EXAMPLES (default 50) and AFINA_FUZZ_SEED (default fixed) widen or vary a run.
"""

import json
import os
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from starlette.types import Receive, Scope, Send

from afina.api.app import create_app
from afina.api.asgi import all_routes
from afina.core.ids import new_id
from afina.core.settings import Settings
from afina.core.storage import adapter_key, checkpoint_key
from afina.models import Job, JobCheckpoint, JobMetric, JobStatus, new_event
from afina.models.session import make_engine, make_session_factory
from tests.support import LOCAL, jsonl, rows, upload

# schemathesis reports each operation as a pytest subtest, and in an xdist worker it runs none:
# `make test` runs this module (marked serial below) in a pytest process of its own.
if os.environ.get("PYTEST_XDIST_WORKER"):
    pytest.skip("fuzzed operations do not run in an xdist worker", allow_module_level=True)

KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
ALLOWED = ["org/*", "/models/*"]  # globs only: no base model is callable by name
BASE = "org/base-model"
GONE = "gone/base-model"  # no longer allowed: what was trained on it cannot be called
EXAMPLES = int(os.environ.get("AFINA_FUZZ_EXAMPLES", "50"))
SEED = int(os.environ.get("AFINA_FUZZ_SEED", "20250501"))
CHAT = jsonl(
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
)
# FastAPI's own pages are no part of the API.
# FastAPI's own pages, and the dashboard's HTML page shells and static files (tested in
# tests/browser and test_api_keys): they take no input but a path.
NOT_FUZZED = {
    *("/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"),
    *("/", "/new", "/files", "/playground", "/jobs/{job_id}", "/static"),
    "/metrics",  # Prometheus's text format, not JSON (tests/integration/test_metrics.py)
}


def openapi_document() -> dict[str, Any]:
    """The schema the app serves, read once at collection from an app on a throwaway data dir
    (the schema does not depend on the settings)."""
    with tempfile.TemporaryDirectory() as data_dir:
        app = create_app(Settings(_env_file=None, data_dir=Path(data_dir), api_keys=[KEY]))
        document = app.openapi()
        app.state.engine.dispose()
        app.state.celery.close()
    return document


class AppUnderTest:
    """What the schema's requests are sent to: the app of the running test (each has its own
    settings and database). The test starts and stops that app's lifespan itself."""

    app: FastAPI | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":  # refused before any message: "no lifespan here"
            raise RuntimeError("the app under test runs its own lifespan")
        assert self.app is not None, "no test has set the app under test"
        await self.app(scope, receive, send)


APP = AppUnderTest()
CONFIG = schemathesis.Config.from_dict(
    {
        "seed": SEED,
        # No example database: a run depends on the seed alone, and writes nothing here.
        "generation": {"max-examples": EXAMPLES, "mode": "all", "database": "none"},
        "auth": {"openapi": {"APIKey": {"bearer": KEY}}},
        "output": {"sanitization": {"enabled": False}},  # test values, and `max_tokens`
        # Stateful runs need links between operations, and creating a job a valid upload,
        # which random bytes never are: the objects to work on come from `seed_objects`.
        "phases": {"stateful": {"enabled": False}},
    }
)
DOCUMENT = openapi_document()
schema = schemathesis.openapi.from_dict(DOCUMENT, config=CONFIG)
schema.app = APP


pytestmark = [pytest.mark.serial, pytest.mark.usefixtures("no_generation")]


@pytest.fixture
def settings(make_settings) -> Settings:
    return make_settings(api_keys=[KEY], allowed_models=ALLOWED, max_new_tokens=64)


# --- objects for the path parameters to name ----------------------------------------------

KNOWN: dict[str, list[str]] = {}  # path parameter -> ids of the running test's objects


def seed_objects(client: TestClient, settings: Settings) -> dict[str, list[str]]:
    """A file in use by a queued job, a spare file, and a succeeded job with an adapter,
    a checkpoint, events and metric points, on a base the allow-list no longer has (an
    allowed one would make its fine-tuned model, and the base itself, callable)."""
    used = upload(client, CHAT, headers=AUTH).json()["id"]
    spare = upload(client, CHAT, name="spare.jsonl", headers=AUTH).json()["id"]
    queued = client.post(
        "/v1/fine_tuning/jobs", json={"model": BASE, "training_file": used}, headers=AUTH
    ).json()
    (stored,) = [row for row in rows(settings, Job) if row.id == queued["id"]]
    done = Job(
        id=new_id("ftjob"),
        project=stored.project,
        status=JobStatus.SUCCEEDED,
        model=GONE,
        training_file_id=spare,
        validation_file_id=None,
        suffix="fuzz",
        seed=1,
        user_metadata={"k": "v"},
        config=stored.config,
        finished_at=datetime.now(UTC),
        trained_tokens=100,
        steps_done=4,
        total_steps=4,
        epoch=1.0,
    )
    done.fine_tuned_model = done.fine_tuned_model_name()
    engine = make_engine(settings.database_url)
    with make_session_factory(engine)() as session:
        session.add(done)
        session.flush()
        session.add(new_event(done.id, "Job succeeded"))
        session.add(JobCheckpoint(id=new_id("ftckpt"), job_id=done.id, step=2, metrics={}))
        for step in (1, 2):
            session.add(
                JobMetric(job_id=done.id, step=step, epoch=step / 2, loss=1.0, learning_rate=1e-4)
            )
        session.commit()
    engine.dispose()
    storage = Path(settings.storage_url)
    for key in (adapter_key(done.id), checkpoint_key(done.id, 2)):
        (storage / key).mkdir(parents=True)
        (storage / key / "adapter_config.json").write_text("{}")
    jobs = [queued["id"], done.id]
    models = [done.fine_tuned_model, done.id, f"{done.id}:ckpt-step-2"]
    return {"file_id": [used, spare], "job_id": jobs, "model": models}


@schema.hook
def flatmap_path_parameters(context, path_parameters: dict[str, Any] | None):
    """Half the time, a path parameter names one of the test's objects instead."""
    names = [name for name in path_parameters or {} if KNOWN.get(name)]
    if not names:
        return st.just(path_parameters)
    known = st.fixed_dictionaries({name: st.sampled_from(KNOWN[name]) for name in names})
    assert path_parameters is not None
    return st.one_of(st.just(path_parameters), known.map(lambda ids: {**path_parameters, **ids}))


JOB_CREATION = "POST /v1/fine_tuning/jobs"


def with_stored_references(case: schemathesis.Case) -> schemathesis.Case:
    """A valid job body made to name the test's training file and an allowed model, so
    that it creates a job (the validation file, if any, is the spare file)."""
    positive = case.meta is not None and case.meta.generation.mode.is_positive
    if case.operation.label == JOB_CREATION and positive and isinstance(case.body, dict):
        used, spare = KNOWN["file_id"]
        case.body = {**case.body, "model": BASE, "training_file": used}
        if case.body.get("validation_file") is not None:
            case.body["validation_file"] = spare
    return case


@schema.hook
def before_generate_case(context, strategy):
    """Half the valid job bodies name the test's file and an allowed model, and create a
    job; the rest are refused for naming none."""
    return st.one_of(strategy, strategy.map(with_stored_references))


# --- refusals that no schema can foresee ----------------------------------------------------

# A 400 naming one of these says "this names nothing stored here" (an unknown file, a model
# outside the operator's allow-list, an upload whose lines are not a dataset, a queue no
# live worker takes): schema-valid data the server must still refuse.
STORED_REFERENCES = {
    "after",
    "training_file",
    "validation_file",
    "model",
    "file",
    "resources.queue",
}
# The generator's validator compares integers as doubles, so it takes 2**64 + 384 for a
# number under the maximum 2**64 - 1. The server compares exactly.
EXACT_BELOW = 2**53


def _sent_value(case: schemathesis.Case, param: str) -> Any:
    value: Any = case.body if isinstance(case.body, dict) else {}
    for part in param.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


@schema.hook
def filter_failure(context, failure, case, response) -> bool:
    """Keep every failure but a 400 for schema-valid data that is about stored objects or a
    number the generator cannot compare."""
    if failure.code != "ST202" or response.status_code != 400:  # positive data rejected
        return True
    param = response.json()["error"]["param"]
    if param in STORED_REFERENCES:
        return False
    sent = _sent_value(case, param or "")
    return not (type(sent) is int and abs(sent) > EXACT_BELOW)


# --- the tests --------------------------------------------------------------------------------


@pytest.fixture
def fuzz_app(settings: Settings) -> Iterator[FastAPI]:
    app = create_app(settings)
    with TestClient(app, base_url=LOCAL) as client:
        KNOWN.update(seed_objects(client, settings))
        APP.app = app
        try:
            yield app
        finally:
            APP.app = None
            KNOWN.clear()


@schema.parametrize()
@hypothesis_settings(suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
def test_every_operation(case: schemathesis.Case, fuzz_app: FastAPI) -> None:
    case.call_and_validate()


def test_every_route_is_fuzzed() -> None:
    """A route left out of the schema (`include_in_schema=False`) would be left out of the
    fuzzing too."""
    with tempfile.TemporaryDirectory() as data_dir:
        app = create_app(Settings(_env_file=None, data_dir=Path(data_dir)))
        served = [route for route in all_routes(app.routes) if route.path not in NOT_FUZZED]
        assert all(isinstance(getattr(r, "original_route", r), APIRoute) for r in served)
        routes = {(method, route.path) for route in served for method in route.methods}
        app.state.engine.dispose()
        app.state.celery.close()
    documented = {
        (method.upper(), path.replace("{model}", "{model:path}"))
        for path, operations in DOCUMENT["paths"].items()
        for method in operations
    }
    assert routes == documented
    assert len(list(schema.get_all_operations())) == len(documented)


def test_the_schema_documents_errors_not_fastapis_422() -> None:
    for path, operations in DOCUMENT["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            assert "422" not in responses, (method, path)
            for status, response in responses.items():
                if status.startswith(("4", "5")) and not path.startswith("/readyz"):
                    (content,) = response["content"].values()
                    assert content["schema"] == {"$ref": "#/components/schemas/ErrorBody"}
            assert ("security" in operation) == (path not in {"/healthz", "/readyz"})
    assert "HTTPValidationError" not in DOCUMENT["components"]["schemas"]
    error = DOCUMENT["components"]["schemas"]["ErrorObject"]
    assert set(error["required"]) == {"message", "type", "param", "code"}
    assert json.dumps(DOCUMENT)  # plain JSON, as /openapi.json serves it
