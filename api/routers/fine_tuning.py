"""`/v1/fine_tuning/jobs`: create, list, retrieve and cancel jobs, and read what their runs
recorded (events, checkpoints, and afina's whole metric series)."""

import logging
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from sqlalchemy import Connection, bindparam
from sqlalchemy.orm import Session

from afina.api.deps import (
    DbDep,
    ProjectDep,
    QueueDep,
    ReserveDep,
    SettingsDep,
    StorageDep,
    owned_record,
    owned_row,
    reading,
    records,
)
from afina.api.errors import (
    KEYED,
    STORAGE_FULL_MESSAGE,
    APIError,
    error_responses,
    not_found,
    shown_id,
)
from afina.api.pagination import ListPage, PageParams, list_page, page_params
from afina.api.schemas.jobs import (
    CheckpointObject,
    EventObject,
    JobCreate,
    JobObject,
    MetricPoint,
    MetricSeries,
)
from afina.api.served_models import CHECKPOINT_NAME, find_trained
from afina.core import base_models
from afina.core.datasets import DatasetFormat
from afina.core.disk import freeing_space, is_disk_full
from afina.core.estimate import ModelShape, size
from afina.core.fields import shown
from afina.core.ids import new_id
from afina.core.job_config import JobConfig, LoraSettings, MethodType, resolve_config
from afina.core.records import RecordError
from afina.core.settings import Settings
from afina.core.storage import ArtifactStorage, file_key
from afina.jobs import lifecycle, planning, workers
from afina.jobs.dataset_tokens import dataset_tokens
from afina.jobs.queue import EXPORT_QUEUE, TRAIN_QUEUE, enqueue
from afina.models import (
    DATASET_PURPOSE,
    File,
    Job,
    JobCheckpoint,
    JobEvent,
    JobMetric,
    JobStatus,
    Worker,
)

router = APIRouter(
    prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"], responses=error_responses(*KEYED)
)
logger = logging.getLogger(__name__)

PageDep = Annotated[PageParams, Depends(page_params(20, 100))]
METRIC_SERIES = (
    records(JobMetric).where(JobMetric.job_id == bindparam("job")).order_by(JobMetric.step)
)
MAX_MODEL_NAME = Job.fine_tuned_model.type.length


def _model(model: str, allowed: list[str]) -> tuple[str, dict[str, object] | None]:
    """The model name to store and its config.json when it can be read here (a local model,
    or a hub model in this machine's cache); refused with a 400 naming `model`."""
    try:
        name = base_models.normalise(model)
        if not base_models.is_local(name) and not base_models.is_hub_id(name):
            raise base_models.ModelRefused(
                f"model {model!r} is neither a Hugging Face id (org/name) nor an absolute path"
            )
        if base_models.is_local(name):
            # The path as written first: a path outside the allow-list is refused before the
            # file system is looked at, so whether it exists does not show.
            written = "/" + os.path.normpath(model).lstrip("/")  # `//x` is `/x`
            base_models.check_allowed(written, allowed, shown=model)
        base_models.check_allowed(name, allowed, shown=model)
        if not base_models.is_local(name):
            return name, base_models.cached_hub_config(name)
        return name, base_models.read_local_config(name, shown=model)
    except base_models.ModelRefused as refused:
        raise APIError(400, str(refused), param="model", code="model_not_available") from None


def _dataset(db: Session, project: str, file_id: str, param: str, method: MethodType) -> File:
    """The caller's dataset for `param`, in a format `method` trains on."""
    row = owned_row(db, File, file_id, "file", project)
    if row is None:
        raise APIError(
            400, f"No file with id {shown_id(file_id)}", param=param, code="file_not_found"
        )
    if row.purpose != DATASET_PURPOSE:
        raise APIError(
            400,
            f"File {row.id} is a job's result file: a job trains on a file uploaded with "
            f"purpose {DATASET_PURPOSE!r}",
            param=param,
            code="invalid_file_purpose",
        )
    preference = row.format == DatasetFormat.PREFERENCE
    if method == "dpo" and not preference:
        raise APIError(
            400,
            f"File {row.id} holds {row.format} examples: method 'dpo' trains on preference "
            "data (input, preferred_output, non_preferred_output); give it a preference "
            "file, or train this one with method 'supervised'",
            param=param,
            code="invalid_file_format",
        )
    if method == "supervised" and preference:
        raise APIError(
            400,
            f"File {row.id} holds preference data (preferred and non-preferred answers): it "
            'trains with method \'dpo\' ({"method": {"type": "dpo"}}); supervised '
            "fine-tuning takes a chat, prompt-completion, instruction or text file",
            param=param,
            code="invalid_file_format",
        )
    return row


@dataclass(frozen=True)
class _Parent:
    """The caller's fine-tuned model or checkpoint a job trains further."""

    job: Job
    step: int | None  # a checkpoint's; None: the job's final adapter
    lora: LoraSettings


def _parent(db: Session, project: str, body: JobCreate) -> _Parent | None:
    """The caller's fine-tuned model (`ft:...`) or checkpoint (`ftjob-...:ckpt-step-N`) that
    `body.model` names, if it names one: the new job trains that adapter further, on its
    base and with its LoRA settings."""
    if not (body.model.startswith("ft:") or CHECKPOINT_NAME.fullmatch(body.model)):
        return None
    job, step = find_trained(db, project, body.model)
    if job is None:
        raise APIError(
            404,
            f"No fine-tuned model or checkpoint {shown(body.model)} in this project",
            param="model",
            code="model_not_found",
        )
    lora = JobConfig.model_validate(job.config).lora
    if "lora" in body.model_fields_set and body.lora != lora:
        raise APIError(
            400,
            f"The LoRA settings of {body.model} are {lora.model_dump_json()}: a job that "
            "trains it further keeps them; leave lora out or give those",
            param="lora",
            code="lora_mismatch",
        )
    return _Parent(job, step, lora)


@dataclass(frozen=True)
class _Checked:
    """A job body that passed every check that needs no worker: what to store and run."""

    model: str
    training: File
    config: JobConfig
    model_config: dict[str, object] | None  # None: not readable here (a hub model not cached)
    parent: _Parent | None  # what this job trains further


def _checked(body: JobCreate, db: Session, project: str, settings: Settings) -> _Checked:
    parent = _parent(db, project, body)
    if parent is not None:
        body = body.model_copy(update={"model": parent.job.model, "lora": parent.lora})
    model, model_config = _model(body.model, settings.allowed_models)
    model_limit = base_models.max_length(model_config) if model_config else None
    method = body.method_type
    training = _dataset(db, project, body.training_file, "training_file", method)
    if body.validation_file is not None:
        _dataset(db, project, body.validation_file, "validation_file", method)
    try:
        config = resolve_config(
            body, num_examples=training.num_examples, model_max_length=model_limit
        )
    except ValueError as error:
        raise APIError(
            400, str(error), param="training.max_seq_length", code="invalid_max_seq_length"
        ) from None
    return _Checked(model, training, config, model_config, parent)


def _named_queue(body: JobCreate, live: Sequence[Worker]) -> str | None:
    """The training queue the request names (`resources.queue`), if it names one: a live
    worker must take it (with no worker registered, only the default queue is taken), or it
    is refused with a 400 naming `resources.queue`."""
    named = body.resources.queue
    if named is None:
        return None
    if named == EXPORT_QUEUE:
        message = (
            f"Queue {named!r} is the merged exports' queue: name a training queue, one a "
            "live worker takes (GET /v1/workers), or leave resources.queue out"
        )
    elif not live:
        if named == TRAIN_QUEUE:
            return named
        message = (
            f"No worker is registered yet, so none takes queue {named!r}: until one does, a "
            f"job may name only the default queue {TRAIN_QUEUE!r} (or leave resources.queue "
            "out)"
        )
    elif not workers.taking(live, named):
        taken = ", ".join(sorted({name for worker in live for name in workers.queues_of(worker)}))
        message = (
            f"No live worker takes queue {named!r}: the live workers take {taken} "
            "(GET /v1/workers); or leave resources.queue out"
        )
    else:
        return named
    raise APIError(400, message, param="resources.queue", code="unknown_queue")


def _inputs(
    body: JobCreate, checked: _Checked, settings: Settings, storage: ArtifactStorage
) -> tuple[ModelShape, planning.Dataset]:
    """What a plan is made from; ValueError when it cannot be made (the model's shape or
    the dataset's tokens are not known here, or a template fails)."""
    shape = ModelShape.of(checked.model_config) if checked.model_config else None
    if shape is None or checked.config.training.max_seq_length is None:
        raise ValueError(
            f"the model's config.json ({body.model!r}) is not on this server or gives no "
            "model size (a hub model's is read from this machine's Hugging Face cache)"
        )
    data = dataset_tokens(
        checked.training,
        lambda: storage.open(file_key(checked.training.id)),
        checked.model,
        checked.config,
        max_line_bytes=settings.max_line_bytes,
        trust_remote_code=settings.trust_remote_code,
    )
    return shape, data


def _plan_on(
    body: JobCreate,
    checked: _Checked,
    inputs: tuple[ModelShape, planning.Dataset],
    live: Sequence[Worker],
    queue: str | None,
) -> planning.Plan:
    """The plan on the `live` workers (those of `queue`, when the request named one)."""
    shape, data = inputs
    return planning.plan(
        shape,
        checked.config,
        data,
        live,
        auto_batch=body.chosen_hyperparameters().batch_size == "auto",
        queue=queue,
    )


@router.post("/estimate", response_model=planning.Plan, responses=error_responses(400, 413))
def estimate_job(
    body: JobCreate,
    db: DbDep,
    project: ProjectDep,
    settings: SettingsDep,
    storage: StorageDep,
) -> planning.Plan:
    """The plan afina would run for this job body (the body of `POST /v1/fine_tuning/jobs`,
    checked the same way): its memory, time, settings, the workers that can run it and the
    queue it goes to. Nothing is stored."""
    checked = _checked(body, db, project, settings)
    live = workers.live(db, settings.worker_timeout_seconds)
    named = _named_queue(body, live)
    try:
        return _plan_on(body, checked, _inputs(body, checked, settings, storage), live, named)
    except RecordError as error:
        raise APIError(
            400, str(error), param="training_file", code="invalid_training_example"
        ) from None
    except ValueError as error:
        raise APIError(400, str(error), param="model", code="model_config_unavailable") from None


@router.post("", response_model=JobObject, responses=error_responses(400, 413, 507))
def create_job(
    body: JobCreate,
    db: DbDep,
    project: ProjectDep,
    settings: SettingsDep,
    storage: StorageDep,
    queue: QueueDep,
    reserve: ReserveDep,
) -> JobObject:
    checked = _checked(body, db, project, settings)
    model, training, config = checked.model, checked.training, checked.config
    live = workers.live(db, settings.worker_timeout_seconds)
    named = _named_queue(body, live)
    admission = _admit(body, checked, settings, storage, live, named)
    if isinstance(admission, planning.Plan):
        config = planning.applied(
            config,
            admission.settings,
            batch_size=body.chosen_hyperparameters().batch_size == "auto",
            checkpointing=config.training.gradient_checkpointing == "auto",
        )
    queue_name, routed = _routed(admission, named)
    job = Job(
        id=new_id("ftjob"),
        project=project,
        status=JobStatus.QUEUED,
        model=model,
        training_file_id=training.id,
        validation_file_id=body.validation_file,
        suffix=body.suffix,
        parent_model=body.model if checked.parent else None,
        parent_job_id=checked.parent.job.id if checked.parent else None,
        parent_step=checked.parent.step if checked.parent else None,
        seed=body.seed if body.seed is not None else secrets.randbelow(2**31),
        user_metadata=body.metadata,
        config=config.model_dump(mode="json"),
        queue=queue_name,
    )
    if len(job.fine_tuned_model_name()) > MAX_MODEL_NAME:
        raise APIError(
            400,
            f"The fine-tuned model's name, ft:{{model}}:{{project}}:{{suffix}}:{{id}}, would be "
            f"over {MAX_MODEL_NAME} characters: use a shorter model path or suffix",
            param="suffix" if body.suffix else "model",
            code="name_too_long",
        )
    lifecycle.create(
        db,
        job,
        f"Validated training file {training.id}: {training.num_examples} "
        f"{training.format} examples",
        admission if isinstance(admission, str) else _admitted(admission),
        routed,
        "Job queued",
    )
    db.commit()
    try:
        enqueue(queue, db, job.id, job.queue)
    except Exception as error:
        logger.error("could not queue job %s: %s", job.id, error)
        db.rollback()

        def forget() -> None:
            lifecycle.discard(db, job.id)
            db.commit()

        freeing_space(forget, reserve, db.rollback)
        if is_disk_full(error):  # the embedded broker, on the data dir's disk
            raise APIError(507, STORAGE_FULL_MESSAGE, code="insufficient_storage") from None
        raise APIError(
            503,
            "The job queue (AFINA_BROKER_URL) is not reachable; nothing was stored. Try again.",
            code="queue_unavailable",
        ) from None
    logger.info("job %s queued for project %s on %s (queue %s)", job.id, project, model, job.queue)
    return JobObject.of(job)


def _admit(
    body: JobCreate,
    checked: _Checked,
    settings: Settings,
    storage: ArtifactStorage,
    live: Sequence[Worker],
    named: str | None,
) -> planning.Plan | str:
    """The plan of a job that fits a live worker (one that takes the queue the request
    named); a 400 for one that fits none, naming the setting to change (`resources.queue`
    when workers on other queues fit it); what could not be checked (no worker yet, the
    model's config or tokens not here), for the job's first event: the job is then queued
    unchecked."""
    try:
        inputs = _inputs(body, checked, settings, storage)
        plan = _plan_on(body, checked, inputs, live, named)
    except ValueError as error:  # RecordError too: the run will say which example
        return f"Could not check that the job fits a worker: {error}"
    if not plan.fits.checked:
        return "Could not check that the job fits a worker: none is registered yet"
    if not plan.fits.workers and named is not None:
        elsewhere = _plan_on(body, checked, inputs, live, None)
        if elsewhere.fits.workers:
            raise APIError(
                400,
                f"The job fits no worker on queue {named!r}: it {plan.fits.reason}. It fits "
                f"a worker on queue {elsewhere.queue!r}: name that one, or leave "
                "resources.queue out",
                param="resources.queue",
                code="does_not_fit",
            )
    if not plan.fits.workers:
        raise APIError(
            400,
            f"The job fits no worker: it {plan.fits.reason}. Change {plan.fits.param} "
            "(POST /v1/fine_tuning/jobs/estimate shows the plan)",
            param=plan.fits.param,
            code="does_not_fit",
        )
    return plan


def _routed(admission: planning.Plan | str, named: str | None) -> tuple[str, str]:
    """The training queue the job is sent to, and the event that says why."""
    if named is not None:
        return named, f"Queued on {named}: the queue resources.queue names"
    if isinstance(admission, planning.Plan) and admission.queue is not None:
        return admission.queue, f"Queued on {admission.queue}: the smallest worker class that fits"
    return TRAIN_QUEUE, f"Queued on {TRAIN_QUEUE}: the default queue (no worker class was checked)"


def _admitted(plan: planning.Plan) -> str:
    return (
        f"Checked: needs {size(plan.memory.total)} (batch size "
        f"{plan.settings.batch_size}, gradient checkpointing "
        f"{'on' if plan.settings.gradient_checkpointing else 'off'}); fits "
        f"{len(plan.fits.workers)} of the registered workers"
    )


def _found(row: Any, job_id: str) -> Any:
    if row is None:
        raise not_found("fine-tuning job", job_id)
    return row


def owned_job(db: Connection, project: str, job_id: str) -> Any:
    """The caller's job as a record (`records`), for the read routes."""
    return _found(owned_record(db, Job, job_id, "ftjob", project), job_id)


def _owned_job_dependency(db: DbDep, project: ProjectDep, job_id: str) -> Job:
    return _found(owned_row(db, Job, job_id, "ftjob", project), job_id)


OwnedJob = Annotated[Job, Depends(_owned_job_dependency)]

# The read routes below are polled hard (a client watching its job): each is a coroutine
# that does all its database work in one `reading` call.


@router.get("", response_model=ListPage[JobObject], responses=error_responses(400))
async def list_jobs(request: Request, project: ProjectDep, page: PageDep) -> ListPage[JobObject]:
    query = records(Job).where(Job.project == project)
    return await reading(request, lambda db: list_page(db, query, Job, page, JobObject.of))


@router.get("/{job_id}", response_model=JobObject, responses=error_responses(404))
async def retrieve_job(request: Request, project: ProjectDep, job_id: str) -> JobObject:
    return await reading(request, lambda db: JobObject.of(owned_job(db, project, job_id)))


@router.post("/{job_id}/cancel", response_model=JobObject, responses=error_responses(404, 409, 507))
def cancel_job(job: OwnedJob, db: DbDep, storage: StorageDep, reserve: ReserveDep) -> JobObject:
    # It works on a full disk, and frees the state kept to resume the job: should the
    # database not take the change, the space kept aside for that is released, and it is
    # tried again.
    def cancel() -> bool:
        cancelled = lifecycle.cancel(db, job.id)
        db.commit()
        return cancelled

    cancelled = freeing_space(cancel, reserve, db.rollback)
    if cancelled:  # a job waiting to resume keeps nothing of its runs
        lifecycle.ended(storage, job.id)
    db.refresh(job)
    if not cancelled:
        raise APIError(
            409,
            f"Job {job.id} has already {job.status}: only a job that is validating files, "
            "queued, running or paused can be cancelled",
            param="id",
            code="job_not_cancellable",
        )
    return JobObject.of(job)


@router.post("/{job_id}/pause", response_model=JobObject, responses=error_responses(404, 409))
def pause_job(job: OwnedJob, db: DbDep) -> JobObject:
    """A queued job pauses at once; a running one saves a checkpoint at its next step, frees
    its worker and pauses (`pause_requested` meanwhile)."""
    paused = lifecycle.pause(db, job.id)
    db.commit()
    db.refresh(job)
    if paused is None:
        why = "is already paused" if job.status == JobStatus.PAUSED else f"has {job.status}"
        raise APIError(
            409,
            f"Job {job.id} {why}: only a queued or running job can be paused",
            param="id",
            code="job_not_pausable",
        )
    return JobObject.of(job)


@router.post("/{job_id}/resume", response_model=JobObject, responses=error_responses(404, 409))
def resume_job(job: OwnedJob, db: DbDep, queue: QueueDep) -> JobObject:
    """Queue a paused job again: it goes on from the checkpoint its last run saved."""
    resumed = lifecycle.resume(db, job.id)
    db.commit()
    db.refresh(job)
    if not resumed:
        pausing = (
            " (its pause is pending: it pauses at its next step)" if job.pause_requested_at else ""
        )
        raise APIError(
            409,
            f"Job {job.id} is {job.status}{pausing}: only a paused job can be resumed",
            param="id",
            code="job_not_paused",
        )
    try:
        enqueue(queue, db, job.id, job.queue)
    except Exception as error:  # it is queued without a message: the reconciler sends one
        logger.warning("could not queue resumed job %s (%r)", job.id, error)
        db.rollback()
    return JobObject.of(job)


def job_page(
    db: Connection, project: str, job_id: str, entity: Any, page: PageParams, to_object: Any
) -> ListPage[Any]:
    job = owned_job(db, project, job_id)
    return list_page(db, records(entity).where(entity.job_id == job.id), entity, page, to_object)


@router.get(
    "/{job_id}/events",
    response_model=ListPage[EventObject],
    responses=error_responses(400, 404),
)
async def list_events(
    request: Request, project: ProjectDep, job_id: str, page: PageDep
) -> ListPage[EventObject]:
    return await reading(
        request, lambda db: job_page(db, project, job_id, JobEvent, page, EventObject.of)
    )


@router.get(
    "/{job_id}/checkpoints",
    response_model=ListPage[CheckpointObject],
    responses=error_responses(400, 404),
)
async def list_checkpoints(
    request: Request, project: ProjectDep, job_id: str, page: PageDep
) -> ListPage[CheckpointObject]:
    return await reading(
        request,
        lambda db: job_page(db, project, job_id, JobCheckpoint, page, CheckpointObject.of),
    )


@router.get("/{job_id}/metrics", response_model=MetricSeries, responses=error_responses(404))
async def job_metrics(request: Request, project: ProjectDep, job_id: str) -> MetricSeries:
    """The whole training curve, one point per logging step, in step order."""

    def series(db: Connection) -> MetricSeries:
        job = owned_job(db, project, job_id)
        points = db.execute(METRIC_SERIES, {"job": job.id})
        return MetricSeries(job_id=job.id, data=[MetricPoint.of(row) for row in points])

    return await reading(request, series)
