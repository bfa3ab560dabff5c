"""Every state change of a job, each one conditional UPDATE plus its event: the database
settles races (a job cancelled while it trains stays cancelled, a message delivered twice
starts a job only once, a run whose job was taken back changes nothing).

The functions write on the session given and do not commit: the caller's transaction
commits the change and its event together, or neither. `where` is the condition the job
must still meet: `Run.holds()` for the run that holds it, the reconciler's "still looks
lost" for a job it takes back. `ended` is what a job's end must clean up.
"""

import secrets
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, delete, func, select, update
from sqlalchemy.orm import Session

from afina.core.storage import ArtifactStorage, resume_key, tokenized_key
from afina.jobs.run import Run
from afina.models import UNFINISHED, Job, JobStatus, new_event
from afina.models.base import utcnow


def _change(
    session: Session,
    job_id: str,
    where: ColumnElement[bool],
    values: dict[str, Any],
    message: str,
    *,
    level: str = "info",
    data: dict[str, Any] | None = None,
) -> bool:
    changed = session.execute(update(Job).where(where).values(**values)).rowcount
    if changed:
        session.add(new_event(job_id, message, level=level, data=data))
    return bool(changed)


def create(session: Session, job: Job, *messages: str) -> None:
    """Store a new job with its first events (the API checked everything before)."""
    session.add(job)
    session.flush()  # the job row first: events point at it
    # A microsecond apart: rows inserted in one batch may share a timestamp, and events are
    # listed by (created_at, id), ids being random.
    now = utcnow()
    for order, message in enumerate(messages):
        event = new_event(job.id, message)
        event.created_at = now + timedelta(microseconds=order)
        session.add(event)


def discard(session: Session, job_id: str) -> None:
    """Remove a job just created whose message could not be sent: nothing was queued."""
    session.execute(delete(Job).where(Job.id == job_id))


def claim(session: Session, job_id: str, worker: str) -> Run | None:
    """Start a run of the job if it is queued: the run's id fences off every earlier run."""
    now = utcnow()
    run = Run(job_id, secrets.token_hex(16))
    claimed = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.QUEUED)
        .values(
            status=JobStatus.RUNNING,
            attempts=Job.attempts + 1,
            run_id=run.run_id,
            worker=worker,
            heartbeat_at=now,
            started_at=func.coalesce(Job.started_at, now),
        )
    ).rowcount
    if not claimed:
        return None
    attempts = session.scalar(select(Job.attempts).where(Job.id == job_id))
    session.add(new_event(job_id, f"Job started (attempt {attempts})"))
    return run


def heartbeat(session: Session, run: Run) -> bool:
    """Whether the run still holds the job, found by an UPDATE that stamps its heartbeat: what
    the caller writes in the same transaction lands only while it does. The reconciler takes
    a job back with a conditional UPDATE too, so one of the two waits for the other: either
    the job is taken back first and this finds it gone, or the fresh stamp keeps it here."""
    stamped = session.execute(update(Job).where(run.holds()).values(heartbeat_at=utcnow()))
    return bool(stamped.rowcount)


def progress(
    session: Session,
    run: Run,
    steps_done: int,
    total_steps: int,
    epoch: float,
    estimated_finish: datetime | None,
) -> bool:
    """Record the run's progress; False once it no longer holds the job (cancelled, taken
    back): one UPDATE per step both writes and finds out."""
    running = session.execute(
        update(Job)
        .where(run.holds())
        .values(
            steps_done=steps_done,
            total_steps=total_steps,
            epoch=epoch,
            estimated_finish=estimated_finish,
        )
    ).rowcount
    return bool(running)


def requeue(
    session: Session,
    job_id: str,
    where: ColumnElement[bool],
    message: str,
    *,
    resume_step: int,
    level: str = "info",
    lost_workers: int | None = None,
    data: dict[str, Any] | None = None,
) -> bool:
    """Queue a running job again, to resume from `resume_step`, without a message: whoever
    requeues it sends one (or hands its own back), and should that fail the reconciler does."""
    values: dict[str, Any] = {
        "status": JobStatus.QUEUED,
        "run_id": None,
        "enqueued_at": None,
        "steps_done": resume_step,
        "epoch": None,
        "estimated_finish": None,
    }
    if lost_workers is not None:
        values["lost_workers"] = lost_workers
    return _change(session, job_id, where, values, message, level=level, data=data)


def fail(
    session: Session,
    job_id: str,
    where: ColumnElement[bool],
    error: dict[str, Any],
    message: str,
    *,
    lost_workers: int | None = None,
    data: dict[str, Any] | None = None,
) -> bool:
    """End the job `failed` with `error` (code, message, param); the event's data is the
    error unless `data` is given."""
    values: dict[str, Any] = {
        "status": JobStatus.FAILED,
        "error": error,
        "finished_at": utcnow(),
        "estimated_finish": None,
    }
    if lost_workers is not None:
        values["lost_workers"] = lost_workers
    return _change(
        session, job_id, where, values, message, level="error", data=error if data is None else data
    )


def succeed(
    session: Session,
    run: Run,
    message: str,
    *,
    fine_tuned_model: str,
    trained_tokens: int,
    config: dict[str, Any],
    result_files: list[str],
) -> bool:
    values = {
        "status": JobStatus.SUCCEEDED,
        "fine_tuned_model": fine_tuned_model,
        "trained_tokens": trained_tokens,
        "config": config,
        "result_files": result_files,
        "finished_at": utcnow(),
        "estimated_finish": None,
    }
    return _change(session, run.job_id, run.holds(), values, message)


def cancel(session: Session, job_id: str) -> bool:
    """Cancel the job unless it has ended; one conditional UPDATE decides against a worker
    finishing it at the same time."""
    where = (Job.id == job_id) & Job.status.in_(UNFINISHED)
    values = {"status": JobStatus.CANCELLED, "finished_at": utcnow(), "estimated_finish": None}
    return _change(session, job_id, where, values, "Job cancelled")


def stopped(session: Session, job_id: str, steps: int) -> None:
    """Say why a run that no longer holds its job stopped: cancelled, or taken from it."""
    status = session.scalar(select(Job.status).where(Job.id == job_id))
    if status == JobStatus.CANCELLED:
        session.add(new_event(job_id, f"Training stopped at step {steps}: the job was cancelled"))
    else:
        message = (
            f"Training stopped at step {steps}: the job was taken from this run, whose "
            "worker's heartbeat was late"
        )
        session.add(new_event(job_id, message, level="warn"))


def ended(storage: ArtifactStorage, job_id: str) -> None:
    """What a job's end (cancelled, failed, succeeded) must clean up: the state kept to resume
    it, trainer state and tokenized datasets."""
    storage.delete(resume_key(job_id))
    storage.delete(tokenized_key(job_id))
