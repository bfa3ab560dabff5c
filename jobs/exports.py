"""Every state change of a merged export, each one conditional UPDATE (as `jobs.lifecycle`
does for jobs): `queued -> running -> succeeded | failed`. A run holds its export by its
`run_id`; an export whose worker stopped stamping its heartbeat fails (`lost`), and the
caller asks for another: an export is quick to start again, and keeps no state to resume."""

import secrets
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, select, update
from sqlalchemy.orm import Session

from afina.models import ExportStatus, JobExport
from afina.models.base import utcnow


def holds(export_id: str, run_id: str) -> ColumnElement[bool]:
    return and_(
        JobExport.id == export_id,
        JobExport.status == ExportStatus.RUNNING,
        JobExport.run_id == run_id,
    )


def claim(session: Session, export_id: str) -> str | None:
    """Start a run of the export if it is queued: the run's id."""
    run_id = secrets.token_hex(16)
    now = utcnow()
    claimed = session.execute(
        update(JobExport)
        .where(JobExport.id == export_id, JobExport.status == ExportStatus.QUEUED)
        .values(status=ExportStatus.RUNNING, run_id=run_id, started_at=now, heartbeat_at=now)
    ).rowcount
    return run_id if claimed else None


def heartbeat(session: Session, export_id: str, run_id: str) -> bool:
    stamped = session.execute(
        update(JobExport).where(holds(export_id, run_id)).values(heartbeat_at=utcnow())
    )
    return bool(stamped.rowcount)


def succeed(session: Session, export_id: str, run_id: str, size: int) -> bool:
    values = {"status": ExportStatus.SUCCEEDED, "bytes": size, "finished_at": utcnow()}
    return bool(
        session.execute(update(JobExport).where(holds(export_id, run_id)).values(values)).rowcount
    )


def fail(session: Session, where: ColumnElement[bool], error: dict[str, Any]) -> bool:
    values = {"status": ExportStatus.FAILED, "error": error, "finished_at": utcnow()}
    return bool(session.execute(update(JobExport).where(where).values(values)).rowcount)


def sent(session: Session, export_id: str) -> None:
    session.execute(update(JobExport).where(JobExport.id == export_id).values(enqueued_at=utcnow()))


def fail_lost(session: Session, silent_since: datetime) -> list[str]:
    """Fail the running exports whose heartbeat is older than `silent_since`: their worker
    is gone (killed, out of memory). The ids of those failed."""
    lost = session.scalars(
        select(JobExport.id).where(
            JobExport.status == ExportStatus.RUNNING, JobExport.heartbeat_at < silent_since
        )
    ).all()
    error = {
        "code": "worker_lost",
        "message": "the worker merging this export stopped (killed, or out of memory: merging "
        "loads the whole base model in 16-bit); create another export",
        "param": None,
    }
    where = JobExport.status == ExportStatus.RUNNING
    return [
        export_id
        for export_id in lost
        if fail(
            session,
            where & (JobExport.id == export_id) & (JobExport.heartbeat_at < silent_since),
            error,
        )
    ]


def unsent(session: Session, stored_before: datetime) -> list[str]:
    """Queued exports stored before `stored_before` whose message was never sent (their API
    process died between the two)."""
    return list(
        session.scalars(
            select(JobExport.id).where(
                JobExport.status == ExportStatus.QUEUED,
                JobExport.enqueued_at.is_(None),
                JobExport.created_at < stored_before,
            )
        )
    )
