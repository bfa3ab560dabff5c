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
from typing import Any, Literal

from sqlalchemy import ColumnElement, delete, func, select, update
from sqlalchemy.orm import Session

from afina.core.storage import (
    ArtifactStorage,
    adapter_key,
    checkpoint_key,
    export_key,
    resume_key,
    tokenized_key,
)
from afina.jobs import exports
from afina.jobs.run import Run
from afina.models import UNFINISHED, ExportStatus, Job, JobExport, JobStatus, new_event
from afina.models.base import utcnow

# What a run learns from recording its progress (`progress`).
RunState = Literal["go", "pause", "stop"]


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
) -> RunState:
    """Record the run's progress, and find out in the same UPDATE whether it goes on, pauses
    (the caller asked) or stops (it no longer holds the job: cancelled, taken back)."""
    pausing = session.execute(
        update(Job)
        .where(run.holds())
        .values(
            steps_done=steps_done,
            total_steps=total_steps,
            epoch=epoch,
            estimated_finish=estimated_finish,
        )
        .returning(Job.pause_requested_at)
    ).first()
    if pausing is None:
        return "stop"
    return "go" if pausing.pause_requested_at is None else "pause"


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
) -> JobStatus | None:
    """Set aside a running job, to resume from `resume_step`: `paused` if the caller asked for
    a pause, else `queued` again, without a message (whoever requeues it sends one, or hands
    its own back, and should that fail the reconciler does). The new status, or None when
    `where` no longer holds."""
    values: dict[str, Any] = {
        "run_id": None,
        "steps_done": resume_step,
        "epoch": None,
        "estimated_finish": None,
    }
    if lost_workers is not None:
        values["lost_workers"] = lost_workers
    pause = {"status": JobStatus.PAUSED, "pause_requested_at": None}
    paused = _change(
        session,
        job_id,
        where & Job.pause_requested_at.is_not(None),
        values | pause,
        f"Job paused: it resumes from step {resume_step}",
        data={"step": resume_step},
    )
    if paused:
        return JobStatus.PAUSED
    queued = {"status": JobStatus.QUEUED, "enqueued_at": None}
    if _change(session, job_id, where, values | queued, message, level=level, data=data):
        return JobStatus.QUEUED
    return None


def pause(session: Session, job_id: str) -> str | None:
    """Pause the job: a queued one at once (its message, when a worker takes it, starts
    nothing), a running one at its next step, once its run has saved a checkpoint (`requeue`).
    What was done ("paused", "pausing"), or None for a job in no state to pause."""
    queued = (Job.id == job_id) & (Job.status == JobStatus.QUEUED)
    values = {"status": JobStatus.PAUSED, "enqueued_at": None, "estimated_finish": None}
    if _change(session, job_id, queued, values, "Job paused while queued"):
        return "paused"
    running = (Job.id == job_id) & (Job.status == JobStatus.RUNNING)
    if _change(
        session,
        job_id,
        running & Job.pause_requested_at.is_(None),
        {"pause_requested_at": utcnow()},
        "Pause requested: the job saves a checkpoint at its next step, then pauses",
    ):
        return "pausing"
    pending = session.scalar(select(Job.id).where(running))  # asked before: nothing to add
    return "pausing" if pending else None


def resume(session: Session, job_id: str) -> bool:
    """Queue a paused job again, without a message (the caller sends it): its next run goes
    on from the checkpoint its last run kept."""
    where = (Job.id == job_id) & (Job.status == JobStatus.PAUSED)
    values = {"status": JobStatus.QUEUED, "enqueued_at": None}
    return _change(session, job_id, where, values, "Job resumed: queued again")


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
    values = {
        "status": JobStatus.CANCELLED,
        "finished_at": utcnow(),
        "estimated_finish": None,
        "pause_requested_at": None,
    }
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


def delete_model(session: Session, job_id: str, name: str) -> bool:
    """Mark the job's fine-tuned model deleted (the job stays, as a record), and fail its
    exports still to come; False when it was deleted already. The caller then removes its
    files (`model_deleted`)."""
    where = (Job.id == job_id) & Job.model_deleted_at.is_(None)
    deleted = _change(
        session, job_id, where, {"model_deleted_at": utcnow()}, f"Model {name} deleted"
    )
    if deleted:
        pending = JobExport.status.in_((ExportStatus.QUEUED, ExportStatus.RUNNING))
        error = {"code": "model_deleted", "message": f"the model {name} was deleted", "param": None}
        exports.fail(session, (JobExport.job_id == job_id) & pending, error)
    return deleted


def model_deleted(storage: ArtifactStorage, job_id: str) -> None:
    """Remove what a deleted model leaves in storage: its adapter, checkpoints and exports."""
    for key in (adapter_key(job_id), checkpoint_key(job_id), export_key(job_id)):
        storage.delete(key)
