"""`/v1/files`: upload, list, retrieve, download and delete datasets, as in OpenAI's API."""

import logging
import shutil
from collections.abc import Iterator
from typing import Annotated, Any, BinaryIO
from urllib.parse import quote

from fastapi import APIRouter, Depends, Form, Query, UploadFile
from fastapi.responses import StreamingResponse
from sqlalchemy import delete, or_, select

from afina.api.deps import DbDep, ProjectDep, ReserveDep, SettingsDep, StorageDep, owned_row
from afina.api.errors import KEYED, APIError, error_responses, not_found
from afina.api.pagination import ListPage, PageParams, list_page, page_params
from afina.api.schemas.files import FileDeleted, FileObject
from afina.core.datasets import validate_dataset
from afina.core.disk import freeing_space
from afina.core.ids import new_id
from afina.core.storage import file_key
from afina.models import UNFINISHED, File, Job

router = APIRouter(prefix="/v1/files", tags=["files"], responses=error_responses(*KEYED))
logger = logging.getLogger(__name__)

CHUNK_BYTES = 1024 * 1024
PURPOSE = "fine-tune"
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


def _size(stream: BinaryIO) -> int:
    stream.seek(0, 2)
    size = stream.tell()
    stream.seek(0)
    return size


@router.post("", response_model=FileObject, responses=error_responses(400, 413, 507))
def create_file(
    file: UploadFile,
    # Checked below, so that a wrong purpose gets its own code.
    purpose: Annotated[str, Form(json_schema_extra={"enum": [PURPOSE]})],
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
    if purpose != PURPOSE:
        raise APIError(
            400,
            f"Unsupported purpose {purpose!r}: afina stores fine-tuning datasets, "
            f"purpose must be {PURPOSE!r}",
            param="purpose",
            code="invalid_purpose",
        )
    filename = _display_name(file.filename)
    size = _size(file.file)
    if size > settings.max_upload_bytes:
        raise APIError(
            413,
            f"File {filename!r} is {size} bytes, over the upload limit of "
            f"{settings.max_upload_bytes} bytes (AFINA_MAX_UPLOAD_BYTES)",
            param="file",
            code="file_too_large",
        )
    report = validate_dataset(file.file, max_line_bytes=settings.max_line_bytes)
    if not report.ok:
        raise APIError(
            400,
            f"Invalid file {filename!r}: {report.summary()}",
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
    file.file.seek(0)
    # A full disk in either step is a 507 (`api.errors`): the half-written content is removed
    # by `atomic_write`, the content of a row that could not be stored here.
    with storage.atomic_write(key) as out:
        shutil.copyfileobj(file.file, out, CHUNK_BYTES)
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


def _owned_file(db: DbDep, project: ProjectDep, file_id: str) -> File:
    row = owned_row(db, File, file_id, "file", project)
    if row is None:
        raise not_found("file", file_id)
    return row


OwnedFile = Annotated[File, Depends(_owned_file)]


@router.get("", response_model=ListPage[FileObject], responses=error_responses(400))
def list_files(
    db: DbDep,
    project: ProjectDep,
    page: Annotated[PageParams, Depends(page_params(10_000, 10_000))],
    purpose: Annotated[str | None, Query(pattern=r"^[a-z_-]{1,32}$")] = None,
) -> ListPage[FileObject]:
    query = select(File).where(File.project == project)
    if purpose is not None:
        query = query.where(File.purpose == purpose)
    return list_page(db, query, File, page, FileObject.of)


@router.get("/{file_id}", response_model=FileObject, responses=error_responses(404))
def retrieve_file(row: OwnedFile) -> FileObject:
    return FileObject.of(row)


@router.get(
    "/{file_id}/content",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "The dataset as it was uploaded",
            "content": {"application/jsonl": {"schema": {"type": "string"}}},
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

    def chunks() -> Iterator[bytes]:
        with stream:
            while chunk := stream.read(CHUNK_BYTES):
                yield chunk

    return StreamingResponse(
        chunks(),
        media_type="application/jsonl",
        headers={
            "Content-Length": str(row.bytes),
            "Content-Disposition": f"attachment; filename*=UTF-8''{quote(row.filename)}",
        },
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
