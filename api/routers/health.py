"""`/healthz`: the process answers. `/readyz`: what it depends on answers too, and the disks
it writes to have room (`AFINA_MIN_FREE_BYTES`)."""

from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import text

from afina.core.disk import MiB, is_disk_full, local_directories, nearly_full
from afina.core.settings import Settings
from afina.core.storage import ArtifactStorage

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str]


def _storage(storage: ArtifactStorage, settings: Settings) -> str:
    """Whether artifact storage takes a new object, and every local disk the service writes
    to (data dir, SQLite files, local storage) has `min_free_bytes` left: a few system calls."""
    try:
        storage.check_writable()
    except Exception as error:
        reason = "the disk is full" if is_disk_full(error) else type(error).__name__
        return f"not writable: {reason}"
    directories = local_directories(
        settings.data_dir,
        settings.database_url,
        settings.broker_url,
        settings.storage_url,
    )
    try:
        full = nearly_full(directories, settings.min_free_bytes)
    except OSError as error:
        return f"not readable: {type(error).__name__}"
    if full is not None:
        return (
            f"nearly full: {full}, under AFINA_MIN_FREE_BYTES "
            f"({settings.min_free_bytes / MiB:.0f} MiB)"
        )
    return "ok"


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:  # on the event loop: no thread, no lock, answers under load
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={
        503: {
            "model": Readiness,
            "description": "A dependency is not reachable, or a disk is (nearly) full",
        }
    },
)
def readyz(request: Request) -> JSONResponse:
    state = request.app.state
    checks: dict[str, Any] = {}
    try:
        with state.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as error:
        checks["database"] = f"unreachable: {type(error).__name__}"
    try:
        with state.celery.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, interval_start=0, timeout=2)
        checks["broker"] = "ok"
    except Exception as error:
        checks["broker"] = f"unreachable: {type(error).__name__}"
    checks["storage"] = _storage(state.storage, state.settings)
    ready = all(value == "ok" for value in checks.values())
    return JSONResponse(
        {"status": "ok" if ready else "unavailable", "checks": checks},
        status_code=200 if ready else 503,
    )
