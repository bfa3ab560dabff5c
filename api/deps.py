"""FastAPI dependencies: settings, a database session per request, storage, the caller."""

import hmac
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, Request
from sqlalchemy.orm import Session

from afina.api.errors import APIError
from afina.core.settings import Settings
from afina.core.storage import ArtifactStorage

DEFAULT_PROJECT = "default"


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_db(request: Request) -> Iterator[Session]:
    with request.app.state.session_factory() as session:
        yield session


def get_storage(request: Request) -> ArtifactStorage:
    return request.app.state.storage


def parse_api_keys(entries: list[str]) -> dict[str, str]:
    """`project:key` entries (a bare `key` belongs to `default`) -> {key: project}."""
    keys = {}
    for entry in entries:
        project, separator, key = entry.partition(":")
        if not separator:
            project, key = DEFAULT_PROJECT, entry
        keys[key] = project
    return keys


def get_project(request: Request, authorization: Annotated[str | None, Header()] = None) -> str:
    """The project of the caller's API key; with no keys configured, `default`."""
    keys: dict[str, str] = request.app.state.api_keys
    if not keys:
        return DEFAULT_PROJECT
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise APIError(
            401,
            "Missing API key: send it as `Authorization: Bearer <key>`.",
            code="missing_api_key",
        )
    token = token.strip()
    project = None
    for key, key_project in keys.items():  # compare with every key: constant time
        if hmac.compare_digest(key.encode(), token.encode()):
            project = key_project
    if project is None:
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
    return project


SettingsDep = Annotated[Settings, Depends(get_settings)]
DbDep = Annotated[Session, Depends(get_db)]
StorageDep = Annotated[ArtifactStorage, Depends(get_storage)]
ProjectDep = Annotated[str, Depends(get_project)]
