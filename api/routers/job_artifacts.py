"""What a job leaves to take away: `GET /v1/fine_tuning/jobs/{id}/adapter` (the peft adapter
of the fine-tuned model or of a checkpoint, as a `.tar.gz` with its tokenizer and a README)
and merged exports (`.../exports`: the adapter merged into its base by a worker, then
downloaded as a `.tar.gz`)."""

import logging
import os
import tempfile
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, StreamingResponse
from sqlalchemy import Connection
from sqlalchemy.orm import Session
from starlette.background import BackgroundTask

from afina.api.deps import DbDep, ProjectDep, QueueDep, StorageDep, reading, records
from afina.api.downloads import stream_download
from afina.api.errors import KEYED, APIError, error_responses, not_found
from afina.api.pagination import ListPage
from afina.api.routers.fine_tuning import OwnedJob, PageDep, job_page, owned_job
from afina.api.schemas.exports import MAX_STEP, ExportCreate, ExportObject
from afina.api.served_models import checkpoint_saved
from afina.core.archive import stored_members, text_member, write_archive
from afina.core.ids import checkpoint_name, new_id
from afina.core.model_card import model_card
from afina.core.storage import ArtifactStorage, export_key, trained_key
from afina.jobs.queue import enqueue_export
from afina.models import ExportStatus, Job, JobExport, JobStatus

router = APIRouter(
    prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"], responses=error_responses(*KEYED)
)
logger = logging.getLogger(__name__)

GZIP = "application/gzip"


def _trained(db: Session, job: Job, checkpoint: int | None) -> tuple[str, str]:
    """The storage key and the name of the job's fine-tuned model (`checkpoint` None) or of
    one of its checkpoints: 404 for one deleted or never saved, 409 for a job that has not
    succeeded yet."""
    if job.model_deleted_at is not None:
        raise APIError(
            404,
            f"The fine-tuned model of job {job.id} was deleted, with its checkpoints",
            param="id",
            code="model_deleted",
        )
    if checkpoint is None:
        if job.status != JobStatus.SUCCEEDED or job.fine_tuned_model is None:
            raise APIError(
                409,
                f"Job {job.id} is {job.status}: its fine-tuned model is saved once it succeeds; "
                "a checkpoint it saved (GET .../checkpoints) can be taken with checkpoint=N",
                param="id",
                code="job_not_succeeded",
            )
        return trained_key(job.id, None), job.fine_tuned_model
    if not checkpoint_saved(db, job.id, checkpoint):
        raise APIError(
            404,
            f"Job {job.id} saved no checkpoint at step {checkpoint} (GET .../checkpoints "
            "lists them)",
            param="checkpoint",
            code="checkpoint_not_found",
        )
    return trained_key(job.id, checkpoint), checkpoint_name(job.id, checkpoint)


def _archive(storage: ArtifactStorage, job: Job, key: str, name: str, folder: str) -> str:
    """The adapter under `key` with its tokenizer and a README, as a temporary `.tar.gz`."""
    members = stored_members(storage, key, skip=("README.md",))  # peft's generic model card
    if not any(member.name == "adapter_config.json" for member in members):
        raise APIError(
            404,
            f"The adapter files of {name} are missing from storage",
            param="id",
            code="adapter_not_found",
        )
    card = model_card(
        name=name, job_id=job.id, base_model=job.model, config=job.config, merged_dtype=None
    )
    descriptor, path = tempfile.mkstemp(prefix="afina-adapter-", suffix=".tar.gz")
    try:
        with os.fdopen(descriptor, "wb") as out:
            write_archive(out, folder, [*members, text_member("README.md", card)])
    except BaseException:
        os.unlink(path)
        raise
    return path


@router.get(
    "/{job_id}/adapter",
    response_class=FileResponse,
    responses={
        200: {
            "description": "The peft adapter, its tokenizer and a README, as a .tar.gz",
            "content": {GZIP: {"schema": {"type": "string", "format": "binary"}}},
        },
        **error_responses(400, 404, 409),
    },
)
def download_adapter(
    job: OwnedJob,
    db: DbDep,
    storage: StorageDep,
    checkpoint: Annotated[
        int | None, Query(ge=1, le=MAX_STEP, description="A checkpoint's step.")
    ] = None,
) -> FileResponse:
    """Unpacked, `PeftModel.from_pretrained(base, folder)` loads it."""
    key, name = _trained(db, job, checkpoint)
    folder = job.id if checkpoint is None else f"{job.id}-ckpt-step-{checkpoint}"
    path = _archive(storage, job, key, name, folder)
    return FileResponse(
        path,
        media_type=GZIP,
        filename=f"{folder}.tar.gz",
        background=BackgroundTask(os.unlink, path),
    )


@router.post(
    "/{job_id}/exports", response_model=ExportObject, responses=error_responses(400, 404, 409)
)
def create_export(body: ExportCreate, job: OwnedJob, db: DbDep, queue: QueueDep) -> ExportObject:
    """A worker (of the export queue) merges the adapter into its base loaded in `dtype`
    and stores the result; poll the export, then download its content."""
    _trained(db, job, body.checkpoint)
    export = JobExport(
        id=new_id("ftexport"),
        job_id=job.id,
        status=ExportStatus.QUEUED,
        format=body.format,
        dtype=body.dtype,
        checkpoint_step=body.checkpoint,
    )
    db.add(export)
    db.commit()
    try:
        enqueue_export(queue, db, export.id)
    except Exception as error:
        logger.error("could not queue export %s: %s", export.id, error)
        db.rollback()
        db.delete(export)
        db.commit()
        raise APIError(
            503,
            "The job queue (AFINA_BROKER_URL) is not reachable; nothing was stored. Try again.",
            code="queue_unavailable",
        ) from None
    db.refresh(export)
    return ExportObject.of(export)


@router.get(
    "/{job_id}/exports",
    response_model=ListPage[ExportObject],
    responses=error_responses(400, 404),
)
async def list_exports(
    request: Request, project: ProjectDep, job_id: str, page: PageDep
) -> ListPage[ExportObject]:
    return await reading(
        request, lambda db: job_page(db, project, job_id, JobExport, page, ExportObject.of)
    )


def _owned_export(db: Connection, project: str, job_id: str, export_id: str) -> Any:
    job = owned_job(db, project, job_id)
    found = db.execute(
        records(JobExport).where(JobExport.id == export_id, JobExport.job_id == job.id)
    ).first()
    if found is None:
        raise not_found("export", export_id)
    return found


@router.get(
    "/{job_id}/exports/{export_id}",
    response_model=ExportObject,
    responses=error_responses(404),
)
async def retrieve_export(
    request: Request, project: ProjectDep, job_id: str, export_id: str
) -> ExportObject:
    return await reading(
        request, lambda db: ExportObject.of(_owned_export(db, project, job_id, export_id))
    )


@router.get(
    "/{job_id}/exports/{export_id}/content",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "The merged model (safetensors, tokenizer, README), as a .tar.gz",
            "content": {GZIP: {"schema": {"type": "string", "format": "binary"}}},
        },
        **error_responses(404, 409),
    },
)
def download_export(
    project: ProjectDep, job_id: str, export_id: str, db: DbDep, storage: StorageDep
) -> StreamingResponse:
    export = _owned_export(db.connection(), project, job_id, export_id)
    if export.status != ExportStatus.SUCCEEDED:
        raise APIError(
            409,
            f"Export {export.id} is {export.status}: its content can be downloaded once it "
            "has succeeded",
            param="export_id",
            code="export_not_ready",
        )
    try:
        stream = storage.open(export_key(export.job_id, export.id))
    except FileNotFoundError:
        raise APIError(
            404,
            f"The content of export {export.id} is missing from storage (its model was deleted?)",
            param="export_id",
            code="export_content_missing",
        ) from None

    return stream_download(
        stream, size=export.bytes, media_type=GZIP, filename=f"{export.id}.tar.gz"
    )
