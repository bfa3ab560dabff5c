"""FastAPI dependencies: settings, a database session per request, storage, the caller."""

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from afina.api.auth import get_project
from afina.core.settings import Settings
from afina.core.storage import ArtifactStorage


def app_settings(request: Request) -> Settings:
    return request.app.state.settings


def db_session(request: Request) -> Iterator[Session]:
    with request.app.state.session_factory() as session:
        yield session


def artifact_storage(request: Request) -> ArtifactStorage:
    return request.app.state.storage


SettingsDep = Annotated[Settings, Depends(app_settings)]
DbDep = Annotated[Session, Depends(db_session)]
StorageDep = Annotated[ArtifactStorage, Depends(artifact_storage)]
ProjectDep = Annotated[str, Depends(get_project)]
