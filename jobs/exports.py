"""Every state change of a merged export, each one conditional UPDATE plus an event on its
job (as `jobs.lifecycle` does for jobs): `queued -> running -> succeeded | failed`. A run
holds its export by its `run_id`; an export whose worker stopped stamping its heartbeat fails
(`lost`), and the caller asks for another: an export is quick to start again, and keeps no
state to resume."""

import secrets
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, select, update
from sqlalchemy.orm import Session

from afina.models import ExportStatus, JobExport, new_event
from afina.models.base import utcnow


def holds(export_id: str, run_id: str) -> ColumnElement[bool]:
    return and_(
        JobExport.id == export_id,
        JobExport.status == ExportStatus.RUNNING,
        JobExport.run_id == run_id,
    )


def _change(
    session: Session, where: ColumnElement[bool], values: dict[str, Any], message: str, **data: Any
) -> list[str]:
    """Update the exports `where` holds, with an event on each one's job (`{id}` in `message`
    is the export's id); the ids of those changed."""
    changed = session.execute(
        update(JobExport).where(where).values(values).returning(JobExport.id, JobExport.job_id)
    ).all()
    for export_id, job_id in changed:
        text = message.format(id=export_id)
        session.add(new_event(job_id, text, data={"export_id": export_id, **data}))
    return [export_id for export_id, _ in changed]


def claim(session: Session, export_id: str) -> str | None:
    """Start a run of the export if it is queued: the run's id."""
    run_id = secrets.token_hex(16)
    now = utcnow()
    values = {
        "status": ExportStatus.RUNNING,
        "run_id": run_id,
        "started_at": now,
        "heartbeat_at": now,
    }
    where = (JobExport.id == export_id) & (JobExport.status == ExportStatus.QUEUED)
    claimed = _change(session, where, values, "Export {id} started: merging the adapter")
    return run_id if claimed else None


def heartbeat(session: Session, export_id: str, run_id: str) -> bool:
    stamped = session.execute(
        update(JobExport).where(holds(export_id, run_id)).values(heartbeat_at=utcnow())
    )
    return bool(stamped.rowcount)


def succeed(session: Session, export_id: str, run_id: str, size: int) -> bool:
    values = {"status": ExportStatus.SUCCEEDED, "bytes": size, "finished_at": utcnow()}
    message = f"Export {{id}} succeeded: {size} bytes"
    return bool(_change(session, holds(export_id, run_id), values, message, bytes=size))


def fail(session: Session, where: ColumnElement[bool], error: dict[str, Any]) -> list[str]:
    """Fail the exports `where` holds with `error`; the ids of those failed."""
    values = {"status": ExportStatus.FAILED, "error": error, "finished_at": utcnow()}
    return _change(session, where, values, f"Export {{id}} failed: {error['message']}")


def sent(session: Session, export_id: str) -> None:
    session.execute(update(JobExport).where(JobExport.id == export_id).values(enqueued_at=utcnow()))


def fail_lost(session: Session, silent_since: datetime) -> list[str]:
    """Fail the running exports whose heartbeat is older than `silent_since`: their worker
    is gone (killed, out of memory). The ids of those failed."""
    error = {
        "code": "worker_lost",
        "message": "the worker merging this export stopped (killed, or out of memory: merging "
        "loads the whole base model in 16-bit); create another export",
        "param": None,
    }
    silent = (JobExport.status == ExportStatus.RUNNING) & (JobExport.heartbeat_at < silent_since)
    return fail(session, silent, error)


def unsent(session: Session, stored_before: datetime) -> list[str]:
    """Queued exports stored before `stored_before` whose message was never sent (their API
    process died between the two)."""
    return _queued(session, JobExport.enqueued_at.is_(None), JobExport.created_at < stored_before)


def long_sent(session: Session, sent_before: datetime) -> list[str]:
    """Queued exports whose message went before `sent_before`: lost, when the export queue
    holds none (the worker that took it died before it could claim the export)."""
    return _queued(session, JobExport.enqueued_at < sent_before)


def _queued(session: Session, *conditions: ColumnElement[bool]) -> list[str]:
    query = select(JobExport.id).where(JobExport.status == ExportStatus.QUEUED, *conditions)
    return list(session.scalars(query.order_by(JobExport.created_at)))
