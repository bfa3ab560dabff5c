"""`/v1/files`: upload, list, retrieve, download and delete datasets, as in OpenAI's API."""

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Query, Request, UploadFile
from fastapi.responses import StreamingResponse
from sqlalchemy import delete, or_, select

from afina.api.deps import (
    DbDep,
    ProjectDep,
    ReserveDep,
    SettingsDep,
    StorageDep,
    owned_record,
    owned_row,
    reading,
    records,
)
from afina.api.downloads import stream_download
from afina.api.errors import KEYED, APIError, error_responses, not_found
from afina.api.pagination import ListPage, PageParams, list_page, page_params
from afina.api.schemas.files import FileDeleted, FileObject
from afina.api.uploads import StagedUpload, UploadRoute
from afina.core.disk import freeing_space
from afina.core.fields import shown
from afina.core.ids import new_id
from afina.core.storage import file_key
from afina.models import DATASET_PURPOSE, UNFINISHED, File, Job

router = APIRouter(prefix="/v1/files", tags=["files"], responses=error_responses(*KEYED))
logger = logging.getLogger(__name__)

NEVER_VALID: dict[str, Any] = {
    "not": {},
    "description": "Not supported: afina keeps a file until it is deleted.",
}


def _display_name(name: str | None) -> str:
    """The client's name for the file, kept as metadata only: no directories, no control
    characters, not just dots, at most 255 characters."""
    base = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(c for c in base if c.isprintable()).strip()[:255].rstrip()
    return base if base.strip(".") else "upload.jsonl"


def create_file(
    file: UploadFile,
    # Checked below, so that a wrong purpose gets its own code.
    purpose: Annotated[str, Form(json_schema_extra={"enum": [DATASET_PURPOSE]})],
    project: ProjectDep,
    db: DbDep,
    storage: StorageDep,
    settings: SettingsDep,
    # OpenAI's, refused by name rather than ignored: documented as never valid.
    expires_after: Annotated[
        str | None, Form(alias="expires_after[anchor]", json_schema_extra=NEVER_VALID)
    ] = None,
) -> FileObject:
    if expires_after is not None:
        raise APIError(
            400,
            "expires_after is not supported: afina keeps a file until it is deleted",
            param="expires_after",
            code="unsupported_parameter",
        )
    if purpose != DATASET_PURPOSE:
        raise APIError(
            400,
            f"Unsupported purpose {shown(purpose)}: afina stores fine-tuning datasets, "
            f"purpose must be {DATASET_PURPOSE!r}",
            param="purpose",
            code="invalid_purpose",
        )
    # The route's form is read by `UploadRoute`: the file is already on its way through
    # validation (api/uploads.py).
    assert isinstance(file, StagedUpload)
    filename = _display_name(file.filename)
    size = file.size or 0
    if size > settings.max_upload_bytes:
        raise APIError(
            413,
            f"File {shown(filename)} is {size} bytes, over the upload limit of "
            f"{settings.max_upload_bytes} bytes (AFINA_MAX_UPLOAD_BYTES)",
            param="file",
            code="file_too_large",
        )
    report = file.report()
    if not report.ok:
        raise APIError(
            400,
            f"Invalid file {shown(filename)}: {report.summary()}",
            param="file",
            code="invalid_file_format",
            errors=[{"line": e.line, "message": e.message} for e in report.errors],
        )
    assert report.format is not None  # a valid report has seen at least one example
    row = File(
        id=new_id("file"),
        project=project,
        filename=filename,
        purpose=purpose,
        bytes=size,
        format=report.format.value,
        num_examples=report.num_examples,
        estimated_tokens=report.estimated_tokens,
    )
    key = file_key(row.id)
    file.publish(key)
    try:
        db.add(row)
        db.commit()
    except BaseException:
        db.rollback()
        storage.delete(key)
        raise
    logger.info(
        "stored %s (%s, %d examples) for project %s", row.id, row.format, row.num_examples, project
    )
    return FileObject.of(row)


router.add_api_route(
    "",
    create_file,
    methods=["POST"],
    response_model=FileObject,
    responses=error_responses(400, 413, 507),
    route_class_override=UploadRoute,
)


def _found(row: Any, file_id: str) -> Any:
    if row is None:
        raise not_found("file", file_id)
    return row


def _owned_file_dependency(db: DbDep, project: ProjectDep, file_id: str) -> File:
    return _found(owned_row(db, File, file_id, "file", project), file_id)


OwnedFile = Annotated[File, Depends(_owned_file_dependency)]


@router.get("", response_model=ListPage[FileObject], responses=error_responses(400))
async def list_files(
    request: Request,
    project: ProjectDep,
    page: Annotated[PageParams, Depends(page_params(10_000, 10_000))],
    purpose: Annotated[str | None, Query(pattern=r"^[a-z_-]{1,32}$")] = None,
) -> ListPage[FileObject]:
    query = records(File).where(File.project == project)
    if purpose is not None:
        query = query.where(File.purpose == purpose)
    return await reading(request, lambda db: list_page(db, query, File, page, FileObject.of))


@router.get("/{file_id}", response_model=FileObject, responses=error_responses(404))
async def retrieve_file(request: Request, project: ProjectDep, file_id: str) -> FileObject:
    return await reading(
        request,
        lambda db: FileObject.of(_found(owned_record(db, File, file_id, "file", project), file_id)),
    )


@router.get(
    "/{file_id}/content",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "The dataset as it was uploaded, or a job's result file",
            "content": {
                "application/jsonl": {"schema": {"type": "string"}},
                "text/csv": {"schema": {"type": "string"}},
            },
        },
        **error_responses(404),
    },
)
def download_file(row: OwnedFile, storage: StorageDep) -> StreamingResponse:
    key = file_key(row.id)
    try:
        stream = storage.open(key)
    except FileNotFoundError:
        logger.error("file %s has a row but no content at %s", row.id, storage.path(key))
        raise APIError(
            404,
            f"The content of file {row.id!r} is missing from storage",
            param="id",
            code="file_content_missing",
        ) from None

    return stream_download(
        stream,
        size=row.bytes,
        media_type="text/csv" if row.format == "csv" else "application/jsonl",
        filename=row.filename,
    )


@router.delete("/{file_id}", response_model=FileDeleted, responses=error_responses(404, 409, 507))
def delete_file(row: OwnedFile, db: DbDep, storage: StorageDep, reserve: ReserveDep) -> FileDeleted:
    """Refused (409) while a job that has not ended trains on the file. One statement
    decides between concurrent deletes: the one that removed the row wins. It works on a
    full disk, and frees the file's bytes."""
    users = (
        select(Job.id)
        .where(
            Job.status.in_(UNFINISHED),
            or_(Job.training_file_id == File.id, Job.validation_file_id == File.id),
        )
        .order_by(Job.created_at)
    )

    # Should the database not take it for a full disk, the space kept aside for that is
    # released, and it is tried again.
    def remove() -> int:
        removed = db.execute(
            delete(File).where(File.id == row.id, File.project == row.project, ~users.exists())
        ).rowcount
        db.commit()
        return removed

    if freeing_space(remove, reserve, db.rollback) == 0:
        job_id = db.scalars(users.where(File.id == row.id)).first()
        if job_id is not None:
            raise APIError(
                409,
                f"File {row.id} is in use by job {job_id}, which has not ended: cancel it or "
                "wait for it to finish first",
                param="id",
                code="file_in_use",
            )
        raise not_found("file", row.id)
    # After the commit: a failure here leaves an unreferenced blob, never a row without one.
    storage.delete(file_key(row.id))
    return FileDeleted(id=row.id)
