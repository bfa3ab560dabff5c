"""FastAPI dependencies: settings, a database session per request, storage, the caller,
the job queue, the space kept aside for a full disk."""

from collections.abc import Callable, Iterator
from functools import cache
from typing import Annotated, Any, TypeVar

from celery import Celery
from fastapi import Depends, Request
from sqlalchemy import Connection, Select, bindparam, inspect, select
from sqlalchemy.orm import Session

from afina.api.auth import get_project
from afina.core.disk import SpaceReserve
from afina.core.ids import looks_like_id
from afina.core.settings import Settings
from afina.core.storage import ArtifactStorage


# The dependencies that only read app state are coroutines: FastAPI would run a plain
# function on a worker thread, a costly hop for an attribute read.
async def app_settings(request: Request) -> Settings:
    return request.app.state.settings


def db_session(request: Request) -> Iterator[Session]:
    with request.app.state.session_factory() as session:
        yield session


async def artifact_storage(request: Request) -> ArtifactStorage:
    return request.app.state.storage


async def space_reserve(request: Request) -> SpaceReserve | None:
    return request.app.state.space_reserve


async def job_queue(request: Request) -> Celery:
    return request.app.state.celery


T = TypeVar("T")


async def reading(request: Request, work: Callable[[Connection], T]) -> T:
    """`work(connection)` on a database thread (`api.database`): the read routes use this
    instead of `DbDep`, one thread hop for the whole request."""
    return await request.app.state.database.reading(work)


Row = TypeVar("Row")


@cache
def records(entity: Any) -> Select[Any]:
    """A query of `entity`'s columns, each labelled with its attribute's name: its rows read
    like the ORM's objects (`row.user_metadata`) for a fraction of the cost (no session, no
    instances), which is what the polled read routes want."""
    return select(*(column.label(name) for name, column in inspect(entity).columns.items()))


@cache
def _owned_records(entity: Any) -> Select[Any]:
    # Built once: building a statement costs more than running it.
    return records(entity).where(entity.id == bindparam("id"), entity.project == bindparam("p"))


def owned_record(db: Connection, entity: Any, object_id: str, prefix: str, project: str) -> Any:
    """`owned_row` for a read route: the row as a record (`records`), or None."""
    if not looks_like_id(object_id, prefix):
        return None
    return db.execute(_owned_records(entity), {"id": object_id, "p": project}).first()


def owned_row(
    db: Session, entity: type[Row], object_id: str, prefix: str, project: str
) -> Row | None:
    """The caller's object with this id, or None. One query by id and project: another
    project's object takes the same path, and the same time, as one that does not exist."""
    if not looks_like_id(object_id, prefix):
        return None
    query = select(entity).where(entity.id == object_id, entity.project == project)  # type: ignore[attr-defined]
    return db.scalars(query).first()


SettingsDep = Annotated[Settings, Depends(app_settings)]
# Closed as soon as the route function returns, before the answer is serialized: a request
# never holds a pooled connection while it waits for a thread.
DbDep = Annotated[Session, Depends(db_session, scope="function")]
StorageDep = Annotated[ArtifactStorage, Depends(artifact_storage)]
ProjectDep = Annotated[str, Depends(get_project)]
QueueDep = Annotated[Celery, Depends(job_queue)]
ReserveDep = Annotated[SpaceReserve | None, Depends(space_reserve)]
