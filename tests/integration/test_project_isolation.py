"""Project isolation: every route, tried by project beta on project alpha's objects.

Alpha owns two uploaded files, a queued job and a succeeded one (its fine-tuned model, its
adapter and checkpoint files on disk, events, metric points, checkpoints). For each row of
the matrix beta sends one request that names one of them, and must learn nothing:
- an id in the path is a 404 with OpenAI's error body;
- a reference in a body or a query gets the very answer (status, param, code, message) that
  a made-up reference of the same shape gets;
- a list shows beta's own objects only, and nothing of alpha's, base model path included.
Then alpha's rows and files must be as they were, and alpha, sending the same request with
its own key, must get what the owner gets: proof that the row named a live object.

`test_every_route_has_a_row` fails when a route is added without a row here. No worker runs,
and nothing generates: every generation request asks for one token over the server's ceiling,
which is checked right after the model is resolved, so a name that resolves is a 400 and a
name that does not is a 404; the engine thread fails the test if it ever starts.
"""

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from sqlalchemy import select
from starlette.routing import compile_path

from afina.api.asgi import all_routes
from afina.core.ids import new_id
from afina.core.settings import Settings
from afina.core.storage import adapter_key, checkpoint_key, export_key
from afina.models import (
    ExportStatus,
    File,
    Job,
    JobCheckpoint,
    JobEvent,
    JobExport,
    JobMetric,
    JobStatus,
    new_event,
)
from tests.support import assert_error, job_row, jsonl, register_worker, rows, upload

pytestmark = pytest.mark.both_backends

ALPHA = {"Authorization": "Bearer key-a"}
BETA = {"Authorization": "Bearer key-b"}
WRONG_KEY = {"Authorization": "Bearer key-c"}

# Only a glob lets alpha's base model in: the path is alpha's information, not the operator's.
BASE = "/srv/models/alpha-base"
ALLOWED = ["/srv/models/*", "org/*"]
HUB_MODEL = "org/base-model"  # a new job's model: a hub id needs nothing on disk
CEILING = 64  # AFINA_MAX_NEW_TOKENS; the generation rows ask for one token more
SUFFIX = "alpha-only"
WORKER = "gpu-host:4242"  # the registered worker, running alpha's job
STEPS = (2, 4)  # alpha's checkpoints
SECRET_TEXT = "alpha-only-answer"  # in alpha's datasets, events and file names
CHAT = jsonl(
    {
        "messages": [
            {"role": "user", "content": "What is the password?"},
            {"role": "assistant", "content": SECRET_TEXT},
        ]
    }
)
# FastAPI's own pages, the health probes and the dashboard's page shells (their script reads
# everything through the routes of the matrix) name no project's objects.
OUT_OF_MATRIX = {
    *("/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc", "/healthz", "/readyz"),
    *("/", "/new", "/files", "/playground", "/jobs/{job_id}"),
    "/metrics",  # aggregates only, no project's object (tests/integration/test_metrics.py)
}


pytestmark = pytest.mark.usefixtures("no_generation")


@pytest.fixture
def settings(make_settings) -> Settings:
    return make_settings(
        api_keys=["alpha:key-a", "beta:key-b"], allowed_models=ALLOWED, max_new_tokens=CEILING
    )


# --- what a request names ---------------------------------------------------------------------


@dataclass(frozen=True)
class Refs:
    """The objects a request can name: alpha's, or made-up ones of the same shapes. `own_file`
    and `own_job` are the caller's own (a job body needs a training file of the caller's to
    reach its validation file; an event page needs a job of the caller's)."""

    file: str  # alpha's training file; its queued job still uses it
    spare_file: str  # alpha's second file, which no unfinished job uses
    queued_job: str
    running_job: str  # run by the worker `WORKER`
    job: str  # succeeded
    model: str  # the succeeded job's fine_tuned_model
    checkpoint: str  # its model name, `{job}:ckpt-step-{n}`
    checkpoint_id: str  # its object id, `ftckpt-...`
    event: str  # one of the succeeded job's events
    export: str  # a merged export of the succeeded job's model
    base: str  # the base model of alpha's succeeded job
    own_file: str
    own_job: str

    def values(self) -> list[tuple[str, str]]:
        """(field, value), longest value first: a model name holds its base's path."""
        pairs = [(item.name, getattr(self, item.name)) for item in fields(self)]
        return sorted(pairs, key=lambda pair: -len(pair[1]))


def made_up(own_file: str, own_job: str) -> Refs:
    """References of the same shapes as alpha's that name nothing at all."""
    job = new_id("ftjob")
    return Refs(
        file=new_id("file"),
        spare_file=new_id("file"),
        queued_job=new_id("ftjob"),
        running_job=new_id("ftjob"),
        job=job,
        model=f"ft:{BASE}:alpha:{SUFFIX}:{job.removeprefix('ftjob-')[:8]}",
        checkpoint=f"{new_id('ftjob')}:ckpt-step-{STEPS[0]}",
        checkpoint_id=new_id("ftckpt"),
        event=new_id("ftevent"),
        export=new_id("ftexport"),
        base=f"/srv/models/{secrets.token_hex(5)}",
        own_file=own_file,
        own_job=own_job,
    )


@dataclass(frozen=True)
class Call:
    method: str
    url: str
    params: dict[str, Any] | None = None
    json: dict[str, Any] | None = None
    data: dict[str, str] | None = None
    files: dict[str, Any] | None = None

    def send(self, client: TestClient, headers: dict[str, str] | None):
        return client.request(
            self.method,
            self.url,
            params=self.params,
            json=self.json,
            data=self.data,
            files=self.files,
            headers=headers,
        )


def get(url: str, **params: Any) -> Call:
    return Call("GET", url, params=params or None)


def post(url: str, body: dict[str, Any] | None = None) -> Call:
    return Call("POST", url, json=body)


def chat(model: str) -> Call:
    messages = [{"role": "user", "content": "hello"}]
    return post(
        "/v1/chat/completions", {"model": model, "messages": messages, "max_tokens": CEILING + 1}
    )


def complete(model: str) -> Call:
    return post("/v1/completions", {"model": model, "prompt": "hello", "max_tokens": CEILING + 1})


def generate(**name: str) -> Call:
    return post("/generate", {**name, "prompt": "hello", "max_new_tokens": CEILING + 1})


def new_job(
    training_file: str, validation_file: str | None = None, route: str = "/v1/fine_tuning/jobs"
) -> Call:
    body = {"model": HUB_MODEL, "training_file": training_file, "validation_file": validation_file}
    return post(route, body)


ESTIMATE = "/v1/fine_tuning/jobs/estimate"

# --- the matrix -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Refused:
    """Beta's answer, the same as for a made-up reference of the same shape."""

    status: int
    param: str | None
    code: str | None


@dataclass(frozen=True)
class Lists:
    """A list: each project sees its own `kind` of objects, exactly."""

    kind: str


CREATES = "creates an object of the caller's own"

NOT_FOUND = Refused(404, "id", "not_found")
NO_MODEL = Refused(404, "model", "model_not_found")
NO_JOB = Refused(404, "job_id", "model_not_found")
NO_ANCHOR = Refused(400, "after", None)


@dataclass(frozen=True)
class Row:
    method: str
    path: str  # the route, as the app declares it
    case: str
    call: Callable[[Refs], Call]
    beta_gets: Refused | Lists | str
    alpha_gets: int  # the status alpha gets for the same request, naming its own objects

    @property
    def route(self) -> tuple[str, str]:
        return self.method, self.path

    def __str__(self) -> str:
        return f"{self.method} {self.path} [{self.case}]"


FILE = "/v1/files/{file_id}"
JOB = "/v1/fine_tuning/jobs/{job_id}"
MODEL = "/v1/models/{model:path}"
UPLOAD = {"file": ("beta.jsonl", jsonl({"text": "beta's own"}), "application/jsonl")}

ROWS = [
    # files
    Row(
        "POST",
        "/v1/files",
        "an upload is the caller's",
        lambda r: Call("POST", "/v1/files", data={"purpose": "fine-tune"}, files=UPLOAD),
        CREATES,
        200,
    ),
    Row("GET", "/v1/files", "list", lambda r: get("/v1/files", limit=10_000), Lists("files"), 200),
    Row(
        "GET",
        "/v1/files",
        "list by purpose, oldest first",
        lambda r: get("/v1/files", purpose="fine-tune", order="asc"),
        Lists("files"),
        200,
    ),
    Row(
        "GET",
        "/v1/files",
        "after alpha's file",
        lambda r: get("/v1/files", after=r.file),
        NO_ANCHOR,
        200,
    ),
    Row("GET", FILE, "retrieve", lambda r: get(f"/v1/files/{r.file}"), NOT_FOUND, 200),
    Row(
        "GET",
        f"{FILE}/content",
        "download",
        lambda r: get(f"/v1/files/{r.file}/content"),
        NOT_FOUND,
        200,
    ),
    Row(
        "DELETE",
        FILE,
        "delete a file a queued job uses",
        lambda r: Call("DELETE", f"/v1/files/{r.file}"),
        NOT_FOUND,
        409,
    ),
    Row(
        "DELETE",
        FILE,
        "delete an unused file",
        lambda r: Call("DELETE", f"/v1/files/{r.spare_file}"),
        NOT_FOUND,
        200,
    ),
    # fine-tuning jobs
    Row(
        "POST",
        "/v1/fine_tuning/jobs",
        "training_file",
        lambda r: new_job(r.file),
        Refused(400, "training_file", "file_not_found"),
        200,
    ),
    Row(
        "POST",
        "/v1/fine_tuning/jobs",
        "validation_file",
        lambda r: new_job(r.own_file, validation_file=r.spare_file),
        Refused(400, "validation_file", "file_not_found"),
        200,
    ),
    # Nothing to estimate for alpha either: the hub model's config is not on this server.
    Row(
        "POST",
        ESTIMATE,
        "training_file",
        lambda r: new_job(r.file, route=ESTIMATE),
        Refused(400, "training_file", "file_not_found"),
        400,
    ),
    Row(
        "POST",
        ESTIMATE,
        "validation_file",
        lambda r: new_job(r.own_file, validation_file=r.spare_file, route=ESTIMATE),
        Refused(400, "validation_file", "file_not_found"),
        400,
    ),
    Row("GET", "/v1/workers", "list", lambda r: get("/v1/workers"), Lists("workers"), 200),
    Row(
        "GET",
        "/v1/fine_tuning/jobs",
        "list",
        lambda r: get("/v1/fine_tuning/jobs", limit=100),
        Lists("jobs"),
        200,
    ),
    Row(
        "GET",
        "/v1/fine_tuning/jobs",
        "after alpha's job",
        lambda r: get("/v1/fine_tuning/jobs", after=r.queued_job),
        NO_ANCHOR,
        200,
    ),
    Row(
        "GET",
        JOB,
        "retrieve a queued job",
        lambda r: get(f"/v1/fine_tuning/jobs/{r.queued_job}"),
        NOT_FOUND,
        200,
    ),
    Row(
        "GET",
        JOB,
        "retrieve a succeeded job",
        lambda r: get(f"/v1/fine_tuning/jobs/{r.job}"),
        NOT_FOUND,
        200,
    ),
    Row(
        "POST",
        f"{JOB}/cancel",
        "cancel a queued job",
        lambda r: post(f"/v1/fine_tuning/jobs/{r.queued_job}/cancel"),
        NOT_FOUND,
        200,
    ),
    Row(
        "POST",
        f"{JOB}/cancel",
        "cancel a succeeded job",
        lambda r: post(f"/v1/fine_tuning/jobs/{r.job}/cancel"),
        NOT_FOUND,
        409,
    ),
    Row(
        "GET",
        f"{JOB}/events",
        "events",
        lambda r: get(f"/v1/fine_tuning/jobs/{r.job}/events"),
        NOT_FOUND,
        200,
    ),
    Row(
        "GET",
        f"{JOB}/events",
        "own job's events after alpha's event",
        lambda r: get(f"/v1/fine_tuning/jobs/{r.own_job}/events", after=r.event),
        NO_ANCHOR,
        200,
    ),
    Row(
        "GET",
        f"{JOB}/checkpoints",
        "checkpoints",
        lambda r: get(f"/v1/fine_tuning/jobs/{r.job}/checkpoints"),
        NOT_FOUND,
        200,
    ),
    Row(
        "GET",
        f"{JOB}/checkpoints",
        "own job's checkpoints after alpha's checkpoint",
        lambda r: get(f"/v1/fine_tuning/jobs/{r.own_job}/checkpoints", after=r.checkpoint_id),
        NO_ANCHOR,
        200,
    ),
    Row(
        "GET",
        f"{JOB}/metrics",
        "metrics",
        lambda r: get(f"/v1/fine_tuning/jobs/{r.job}/metrics"),
        NOT_FOUND,
        200,
    ),
    Row(
        "POST",
        f"{JOB}/pause",
        "pause a queued job",
        lambda r: post(f"/v1/fine_tuning/jobs/{r.queued_job}/pause"),
        NOT_FOUND,
        200,
    ),
    Row(
        "POST",
        f"{JOB}/pause",
        "pause a succeeded job",
        lambda r: post(f"/v1/fine_tuning/jobs/{r.job}/pause"),
        NOT_FOUND,
        409,
    ),
    Row(
        "POST",
        f"{JOB}/resume",
        "resume a queued job",
        lambda r: post(f"/v1/fine_tuning/jobs/{r.queued_job}/resume"),
        NOT_FOUND,
        409,
    ),
    Row(
        "GET",
        f"{JOB}/adapter",
        "download the adapter",
        lambda r: get(f"/v1/fine_tuning/jobs/{r.job}/adapter"),
        NOT_FOUND,
        200,
    ),
    Row(
        "GET",
        f"{JOB}/adapter",
        "download a checkpoint",
        lambda r: get(f"/v1/fine_tuning/jobs/{r.job}/adapter", checkpoint=STEPS[0]),
        NOT_FOUND,
        200,
    ),
    Row(
        "POST",
        f"{JOB}/exports",
        "export the model",
        lambda r: post(f"/v1/fine_tuning/jobs/{r.job}/exports", {"format": "merged"}),
        NOT_FOUND,
        200,
    ),
    Row(
        "GET",
        f"{JOB}/exports",
        "exports",
        lambda r: get(f"/v1/fine_tuning/jobs/{r.job}/exports"),
        NOT_FOUND,
        200,
    ),
    Row(
        "GET",
        f"{JOB}/exports/{{export_id}}",
        "retrieve an export",
        lambda r: get(f"/v1/fine_tuning/jobs/{r.job}/exports/{r.export}"),
        NOT_FOUND,
        200,
    ),
    Row(
        "GET",
        f"{JOB}/exports/{{export_id}}",
        "own job's export, alpha's export id",
        lambda r: get(f"/v1/fine_tuning/jobs/{r.own_job}/exports/{r.export}"),
        NOT_FOUND,
        200,
    ),
    Row(
        "GET",
        f"{JOB}/exports/{{export_id}}/content",
        "download an export",
        lambda r: get(f"/v1/fine_tuning/jobs/{r.job}/exports/{r.export}/content"),
        NOT_FOUND,
        200,
    ),
    # models
    Row("GET", "/v1/models", "list", lambda r: get("/v1/models"), Lists("models"), 200),
    Row("GET", MODEL, "fine-tuned model", lambda r: get(f"/v1/models/{r.model}"), NO_MODEL, 200),
    Row("GET", MODEL, "job id", lambda r: get(f"/v1/models/{r.job}"), NO_MODEL, 200),
    Row("GET", MODEL, "queued job id", lambda r: get(f"/v1/models/{r.queued_job}"), NO_MODEL, 409),
    Row("GET", MODEL, "checkpoint", lambda r: get(f"/v1/models/{r.checkpoint}"), NO_MODEL, 200),
    Row("GET", MODEL, "base model path", lambda r: get(f"/v1/models/{r.base}"), NO_MODEL, 200),
    Row(
        "DELETE",
        MODEL,
        "delete a fine-tuned model",
        lambda r: Call("DELETE", f"/v1/models/{r.model}"),
        NO_MODEL,
        200,
    ),
    Row(
        "DELETE",
        MODEL,
        "delete a checkpoint",
        lambda r: Call("DELETE", f"/v1/models/{r.checkpoint}"),
        Refused(400, "model", "model_not_deletable"),
        400,
    ),
    # generation: alpha's names resolve, then the token ceiling refuses them (400)
    *(
        Row(
            "POST",
            path,
            case,
            lambda r, send=send, name=name: send(getattr(r, name)),
            NO_MODEL,
            status,
        )
        for path, send in (("/v1/chat/completions", chat), ("/v1/completions", complete))
        for case, name, status in (
            ("fine-tuned model", "model", 400),
            ("job id", "job", 400),
            ("queued job id", "queued_job", 409),
            ("checkpoint", "checkpoint", 400),
            ("base model path", "base", 400),
        )
    ),
    Row("POST", "/generate", "fine-tuned model", lambda r: generate(model=r.model), NO_MODEL, 400),
    Row("POST", "/generate", "job id as model", lambda r: generate(model=r.job), NO_MODEL, 400),
    Row(
        "POST",
        "/generate",
        "queued job id as model",
        lambda r: generate(model=r.queued_job),
        NO_MODEL,
        409,
    ),
    Row("POST", "/generate", "checkpoint", lambda r: generate(model=r.checkpoint), NO_MODEL, 400),
    Row("POST", "/generate", "base model path", lambda r: generate(model=r.base), NO_MODEL, 400),
    Row("POST", "/generate", "job_id", lambda r: generate(job_id=r.job), NO_JOB, 400),
    Row("POST", "/generate", "queued job_id", lambda r: generate(job_id=r.queued_job), NO_JOB, 409),
]
FIRST_ROW_OF_ROUTE = list({row.route: row for row in reversed(ROWS)}.values())[::-1]


# --- alpha's world ----------------------------------------------------------------------------


@dataclass(frozen=True)
class World:
    alpha: Refs  # alpha's objects, with alpha's own spare file and succeeded job as "own"
    beta: Refs  # alpha's objects, with beta's own file and job
    missing: Refs  # made-up objects, with beta's own file and job
    listed: dict[str, dict[str, set[str]]] = field(default_factory=dict)  # project -> kind -> ids

    @property
    def alpha_ids(self) -> set[str]:
        alpha = self.alpha
        return {alpha.file, alpha.spare_file, alpha.queued_job, alpha.running_job, alpha.job}


def add_job(db, project: str, status: JobStatus, training_file: str, **values: Any) -> Job:
    job = job_row(project=project, status=status, training_file_id=training_file, **values)
    db.add(job)
    db.flush()
    db.add(new_event(job.id, f"Validated training file {training_file}: {SECRET_TEXT}"))
    db.add(new_event(job.id, "Job queued"))
    return job


@pytest.fixture
def world(client: TestClient, app: FastAPI) -> World:
    """Alpha's objects as the API and a worker leave them, and beta's own file and job."""
    file, spare_file = (
        upload(client, CHAT, f"{SECRET_TEXT}-{n}.jsonl", headers=ALPHA).json()["id"] for n in (1, 2)
    )
    own_file = upload(client, jsonl({"text": "beta"}), "beta.jsonl", headers=BETA).json()["id"]
    with app.state.session_factory() as db:
        queued = add_job(db, "alpha", JobStatus.QUEUED, file, model=BASE)
        running = add_job(db, "alpha", JobStatus.RUNNING, file, model=BASE, worker=WORKER)
        register_worker(db, WORKER)
        job = add_job(
            db,
            "alpha",
            JobStatus.SUCCEEDED,
            file,
            model=BASE,
            validation_file_id=spare_file,
            suffix=SUFFIX,
            trained_tokens=100,
            steps_done=STEPS[-1],
            total_steps=STEPS[-1],
            finished_at=datetime.now(UTC),
        )
        job.fine_tuned_model = job.fine_tuned_model_name()
        event = new_event(job.id, f"Job succeeded: {SECRET_TEXT}")
        db.add(event)
        # A microsecond apart: the list is ordered by (created_at, id), ids being random.
        saved_at = datetime.now(UTC)
        checkpoints = [
            JobCheckpoint(
                id=new_id("ftckpt"),
                job_id=job.id,
                step=step,
                metrics={"loss": 1.0},
                created_at=saved_at + timedelta(microseconds=step),
            )
            for step in STEPS
        ]
        db.add_all(checkpoints)
        db.add_all(
            JobMetric(job_id=job.id, step=step, epoch=step / 4, loss=2.0) for step in range(1, 5)
        )
        export = JobExport(
            id=new_id("ftexport"),
            job_id=job.id,
            status=ExportStatus.SUCCEEDED,
            format="merged",
            dtype="bfloat16",
            bytes=len(SECRET_TEXT),
        )
        db.add(export)
        own_job = add_job(db, "beta", JobStatus.QUEUED, own_file, model=HUB_MODEL)
        db.commit()
        alpha = Refs(
            file=file,
            spare_file=spare_file,
            queued_job=queued.id,
            running_job=running.id,
            job=job.id,
            model=job.fine_tuned_model,
            checkpoint=f"{job.id}:ckpt-step-{STEPS[0]}",
            checkpoint_id=checkpoints[0].id,
            event=event.id,
            export=export.id,
            base=BASE,
            own_file=spare_file,
            own_job=job.id,
        )
    storage = app.state.storage
    for key in (adapter_key(job.id), *(checkpoint_key(job.id, step) for step in STEPS)):
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            with storage.atomic_write(f"{key}/{name}") as out:
                out.write(SECRET_TEXT.encode())
    with storage.atomic_write(export_key(job.id, export.id)) as out:
        out.write(SECRET_TEXT.encode())
    return World(
        alpha=alpha,
        beta=replace(alpha, own_file=own_file, own_job=own_job.id),
        missing=made_up(own_file, own_job.id),
        listed={
            "alpha": {
                "files": {file, spare_file},
                "jobs": {queued.id, running.id, job.id},
                "models": {BASE, alpha.model},
                "workers": {WORKER},
            },
            "beta": {
                "files": {own_file},
                "jobs": {own_job.id},
                "models": set(),
                "workers": {WORKER},
            },
        },
    )


def alpha_state(app: FastAPI, world: World) -> dict[str, Any]:
    """Every row and stored object that names one of alpha's files or jobs, as it is now."""
    ids = world.alpha_ids
    state: dict[str, Any] = {}
    with app.state.session_factory() as db:
        for entity in (File, Job, JobEvent, JobMetric, JobCheckpoint, JobExport):
            table = entity.__table__
            found = db.execute(select(table).order_by(*table.primary_key.columns))
            state[table.name] = [
                tuple(row) for row in found if any(isinstance(v, str) and v in ids for v in row)
            ]
    state["storage"] = {
        str(path): path.read_bytes()
        for path in sorted(Path(app.state.storage.root).rglob("*"))
        if path.is_file() and any(i in str(path) for i in ids)
    }
    return state


def leaked(response, call: Call, world: World) -> list[str]:
    """Alpha's ids, names and text found in an answer to beta, other than what beta sent."""
    sent = repr(call)
    answer = response.text + " ".join(response.headers.values())
    alpha_only = [SECRET_TEXT, *(value for _, value in world.alpha.values())]
    return [value for value in alpha_only if value in answer and value not in sent]


def error_answer(response, refs: Refs) -> dict[str, Any]:
    """Status and error body, with the references the request named put back as their names."""
    assert response.headers["content-type"] == "application/json", response.text
    error = response.json()["error"]
    message = error["message"]
    for name, value in refs.values():
        message = message.replace(value, f"<{name}>")
    return {"status": response.status_code, **error, "message": message}


def listed_ids(response) -> set[str]:
    assert response.status_code == 200, response.text
    return {entry["id"] for entry in response.json()["data"]}


# --- the tests --------------------------------------------------------------------------------


def served_routes(app: FastAPI) -> set[tuple[str, str]]:
    """(method, path) of every API route the app serves, however its routers are nested:
    `all_routes` opens the routers the app includes."""
    served = set()
    for route in all_routes(app.routes):
        api_route = isinstance(getattr(route, "original_route", route), APIRoute)
        if api_route and route.path not in OUT_OF_MATRIX:
            served |= {(method, route.path) for method in route.methods}
    return served


def test_every_route_has_a_row(app):
    served = served_routes(app)
    matrix = {row.route for row in ROWS}
    assert sorted(served - matrix) == [], "routes with no isolation row in ROWS"
    assert sorted(matrix - served) == [], "rows for routes the app does not serve"
    refs = made_up(new_id("file"), new_id("ftjob"))
    for row in ROWS:  # and each row's request goes to the route it is the row of
        call = row.call(refs)
        assert call.method == row.method, row
        assert compile_path(row.path)[0].match(call.url), f"{row} sends {call.url}"


@pytest.mark.parametrize("row", ROWS, ids=str)
def test_beta_learns_nothing_of_alphas_objects(row, client, app, settings, world):
    before = alpha_state(app, world)
    call = row.call(world.beta)
    response = call.send(client, BETA)
    assert leaked(response, call, world) == [], response.text
    expected = row.beta_gets
    if isinstance(expected, Refused):
        assert_error(response, expected.status, expected.param, expected.code)
        missing = row.call(world.missing).send(client, BETA)
        assert error_answer(response, world.beta) == error_answer(missing, world.missing)
    elif isinstance(expected, Lists):
        assert listed_ids(response) == world.listed["beta"][expected.kind]
    else:
        assert response.status_code == 200, response.text
        (created,) = (row for row in rows(settings, File) if row.id == response.json()["id"])
        assert created.project == "beta"
    assert alpha_state(app, world) == before, "beta's request changed alpha's objects"

    mine = row.call(world.alpha).send(client, ALPHA)
    assert mine.status_code == row.alpha_gets, mine.text
    if isinstance(expected, Lists):
        assert listed_ids(mine) == world.listed["alpha"][expected.kind]


@pytest.mark.parametrize("row", FIRST_ROW_OF_ROUTE, ids=lambda row: f"{row.method} {row.path}")
def test_every_route_needs_a_valid_key(row, client, app, world):
    before = alpha_state(app, world)
    call = row.call(world.alpha)
    for headers, code in [
        (None, "missing_api_key"),
        (WRONG_KEY, "invalid_api_key"),
        ({"Authorization": "key-a"}, "missing_api_key"),  # alpha's key, without the scheme
    ]:
        response = call.send(client, headers)
        error = assert_error(response, 401, None, code)
        assert error["type"] == "authentication_error"
        assert response.headers["www-authenticate"] == "Bearer"
        assert leaked(response, call, world) == [], response.text
    assert alpha_state(app, world) == before


def test_the_health_probes_need_no_key(client):
    for path in ("/healthz", "/readyz"):
        assert client.get(path).status_code == 200, path


def alpha_view(client: TestClient, refs: Refs) -> dict[str, tuple[int, str]]:
    """Everything alpha can read of its objects, as alpha reads it."""
    urls = ["/v1/files", "/v1/fine_tuning/jobs", "/v1/models"]
    for file_id in (refs.file, refs.spare_file):
        urls += [f"/v1/files/{file_id}", f"/v1/files/{file_id}/content"]
    for job_id in (refs.queued_job, refs.job):
        job = f"/v1/fine_tuning/jobs/{job_id}"
        urls += [job, f"{job}/events", f"{job}/checkpoints", f"{job}/metrics"]
    urls += [f"/v1/models/{name}" for name in (refs.model, refs.job, refs.checkpoint, refs.base)]
    view = {url: client.get(url, headers=ALPHA) for url in urls}
    return {url: (response.status_code, response.text) for url, response in view.items()}


def test_alpha_sees_everything_after_beta_tried_every_row(client, world):
    before = alpha_view(client, world.alpha)
    assert {status for status, _ in before.values()} == {200}
    for row in ROWS:
        row.call(world.beta).send(client, BETA)
    assert alpha_view(client, world.alpha) == before
    for kind, url in [
        ("files", "/v1/files"),
        ("jobs", "/v1/fine_tuning/jobs"),
        ("models", "/v1/models"),
    ]:
        assert listed_ids(client.get(url, headers=ALPHA)) == world.listed["alpha"][kind]
    job = f"/v1/fine_tuning/jobs/{world.alpha.job}"
    assert world.alpha.event in listed_ids(client.get(f"{job}/events", headers=ALPHA))
    checkpoints = client.get(f"{job}/checkpoints", headers=ALPHA).json()["data"]
    assert [checkpoint["step_number"] for checkpoint in checkpoints] == sorted(STEPS, reverse=True)
    assert len(client.get(f"{job}/metrics", headers=ALPHA).json()["data"]) == 4


def test_a_worker_shows_the_job_it_runs_to_its_project_alone(client, world):
    (mine,) = client.get("/v1/workers", headers=ALPHA).json()["data"]
    (theirs,) = client.get("/v1/workers", headers=BETA).json()["data"]
    assert (mine["busy"], mine["job"]) == (True, world.alpha.running_job)
    assert (theirs["busy"], theirs["job"]) == (True, None)
    assert {k: v for k, v in mine.items() if k != "job"} == {
        k: v for k, v in theirs.items() if k != "job"
    }
