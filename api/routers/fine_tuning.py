"""`/v1/fine_tuning/jobs`: create, list, retrieve and cancel jobs, and read what their runs
recorded (events, checkpoints, and afina's whole metric series)."""

import logging
import os
import secrets
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from sqlalchemy import Connection, bindparam

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
from afina.core import base_models
from afina.core.disk import freeing_space, is_disk_full
from afina.core.ids import new_id
from afina.core.job_config import resolve_config
from afina.jobs import lifecycle
from afina.jobs.queue import enqueue
from afina.models import (
    File,
    Job,
    JobCheckpoint,
    JobEvent,
    JobMetric,
    JobStatus,
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


def _model_limit(model: str, allowed: list[str]) -> tuple[str, int | None]:
    """The model name to store and its context length when it can be read here (a local
    model); refused with a 400 naming `model`."""
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
            return name, None
        return name, base_models.max_length(base_models.read_local_config(name, shown=model))
    except base_models.ModelRefused as refused:
        raise APIError(400, str(refused), param="model", code="model_not_available") from None


def _dataset(db: DbDep, project: str, file_id: str, param: str) -> File:
    row = owned_row(db, File, file_id, "file", project)
    if row is None:
        raise APIError(
            400, f"No file with id {shown_id(file_id)}", param=param, code="file_not_found"
        )
    return row


@router.post("", response_model=JobObject, responses=error_responses(400, 413, 507))
def create_job(
    body: JobCreate,
    db: DbDep,
    project: ProjectDep,
    settings: SettingsDep,
    queue: QueueDep,
    reserve: ReserveDep,
) -> JobObject:
    model, model_limit = _model_limit(body.model, settings.allowed_models)
    training = _dataset(db, project, body.training_file, "training_file")
    if body.validation_file is not None:
        _dataset(db, project, body.validation_file, "validation_file")
    try:
        config = resolve_config(
            body, num_examples=training.num_examples, model_max_length=model_limit
        )
    except ValueError as error:
        raise APIError(
            400, str(error), param="training.max_seq_length", code="invalid_max_seq_length"
        ) from None
    job = Job(
        id=new_id("ftjob"),
        project=project,
        status=JobStatus.QUEUED,
        model=model,
        training_file_id=training.id,
        validation_file_id=body.validation_file,
        suffix=body.suffix,
        seed=body.seed if body.seed is not None else secrets.randbelow(2**31),
        user_metadata=body.metadata,
        config=config.model_dump(mode="json"),
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
        "Job queued",
    )
    db.commit()
    try:
        enqueue(queue, db, job.id)
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
    logger.info("job %s queued for project %s on %s", job.id, project, model)
    return JobObject.of(job)


def _found(row: Any, job_id: str) -> Any:
    if row is None:
        raise not_found("fine-tuning job", job_id)
    return row


def _owned_job(db: Connection, project: str, job_id: str) -> Any:
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
    return await reading(request, lambda db: JobObject.of(_owned_job(db, project, job_id)))


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
            "queued or running can be cancelled",
            param="id",
            code="job_not_cancellable",
        )
    return JobObject.of(job)


def _job_page(
    db: Connection, project: str, job_id: str, entity: Any, page: PageParams, to_object: Any
) -> ListPage[Any]:
    job = _owned_job(db, project, job_id)
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
        request, lambda db: _job_page(db, project, job_id, JobEvent, page, EventObject.of)
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
        lambda db: _job_page(db, project, job_id, JobCheckpoint, page, CheckpointObject.of),
    )


@router.get("/{job_id}/metrics", response_model=MetricSeries, responses=error_responses(404))
async def job_metrics(request: Request, project: ProjectDep, job_id: str) -> MetricSeries:
    """The whole training curve, one point per logging step, in step order."""

    def series(db: Connection) -> MetricSeries:
        job = _owned_job(db, project, job_id)
        points = db.execute(METRIC_SERIES, {"job": job.id})
        return MetricSeries(job_id=job.id, data=[MetricPoint.of(row) for row in points])

    return await reading(request, series)
