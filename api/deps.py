"""FastAPI dependencies: settings, a database session per request, storage, the caller,
the job queue, the space kept aside for a full disk."""

from collections.abc import Iterator
from typing import Annotated, TypeVar

from celery import Celery
from fastapi import Depends, Request
from sqlalchemy.orm import Session

from afina.api.auth import get_project
from afina.core.disk import SpaceReserve
from afina.core.ids import looks_like_id
from afina.core.settings import Settings
from afina.core.storage import ArtifactStorage


def app_settings(request: Request) -> Settings:
    return request.app.state.settings


def db_session(request: Request) -> Iterator[Session]:
    with request.app.state.session_factory() as session:
        yield session


def artifact_storage(request: Request) -> ArtifactStorage:
    return request.app.state.storage


def space_reserve(request: Request) -> SpaceReserve | None:
    return request.app.state.space_reserve


def job_queue(request: Request) -> Celery:
    return request.app.state.celery


Row = TypeVar("Row")


def owned_row(
    db: Session, entity: type[Row], object_id: str, prefix: str, project: str
) -> Row | None:
    """The caller's object with this id, or None: another project's object is as absent as
    one that does not exist."""
    row = db.get(entity, object_id) if looks_like_id(object_id, prefix) else None
    return row if row is not None and getattr(row, "project", None) == project else None


SettingsDep = Annotated[Settings, Depends(app_settings)]
DbDep = Annotated[Session, Depends(db_session)]
StorageDep = Annotated[ArtifactStorage, Depends(artifact_storage)]
ProjectDep = Annotated[str, Depends(get_project)]
QueueDep = Annotated[Celery, Depends(job_queue)]
ReserveDep = Annotated[SpaceReserve | None, Depends(space_reserve)]
