"""One training job from the worker's side: claim it, train (from the trainer state an
earlier run kept, if there is one), and record how it ended.

Every state change is a conditional UPDATE, so the database settles races: a job cancelled
while it trains stays cancelled, a message delivered twice starts a job only once, and a run
whose job was taken back (its worker was thought lost, see `worker.reconciler`) changes
nothing. Any failure inside the run ends the job `failed` with an error a user can act on.
"""

import logging
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

import torch
from sqlalchemy import func, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from afina.core.job_config import JobConfig
from afina.core.settings import Settings
from afina.core.storage import (
    ArtifactStorage,
    adapter_key,
    file_key,
    latest_resume_step,
    resume_key,
    staged_adapter_key,
    tokenized_key,
)
from afina.models import Job, JobStatus, new_event
from afina.models.base import utcnow
from afina.worker.job_records import (
    Heartbeat,
    JobRecorder,
    held_by,
    hold,
    shutdown_requested,
    this_worker,
)
from afina.worker.training.errors import TrainingFailure
from afina.worker.training.sft import TrainingOutcome, TrainingRun, train

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerContext:
    settings: Settings
    session_factory: sessionmaker[Session]
    storage: ArtifactStorage


def _job_workdir(context: WorkerContext, job_id: str) -> Path:
    return context.settings.data_dir / "work" / job_id


def _workdir(context: WorkerContext, job: Job) -> Path:
    """The run's scratch space. Its own, not the job's: workers may share the data dir, and a
    run whose job was taken back may still be going while the next run of the job starts."""
    return _job_workdir(context, job.id) / (job.run_id or "")


def _transition(context: WorkerContext, job: Job, event: str, **values: Any) -> bool:
    """Move the job to new values, with an event, if this run still holds it."""
    level = "error" if values.get("status") == JobStatus.FAILED else "info"
    with context.session_factory.begin() as session:
        changed = session.execute(
            update(Job).where(held_by(job.id, job.run_id or "")).values(**values)
        ).rowcount
        if changed:
            session.add(new_event(job.id, event, level=level, data=values.get("error")))
    return bool(changed)


def _claim(context: WorkerContext, job_id: str, task_id: str | None) -> Job | None:
    now = utcnow()
    with context.session_factory.begin() as session:
        claimed = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.QUEUED)
            .values(
                status=JobStatus.RUNNING,
                attempts=Job.attempts + 1,
                task_id=task_id,
                run_id=secrets.token_hex(16),
                worker=this_worker(),
                heartbeat_at=now,
                started_at=func.coalesce(Job.started_at, now),
            )
        ).rowcount
        if not claimed:
            return None
        job = session.get_one(Job, job_id)
        session.add(new_event(job_id, f"Job started (attempt {job.attempts})"))
        return job


def _dataset_opener(context: WorkerContext, file_id: str, param: str) -> Callable[[], BinaryIO]:
    """How the trainer reads a dataset: straight from storage, without a local copy."""
    key = file_key(file_id)
    if not context.storage.exists(key):
        raise TrainingFailure(
            "file_not_found", f"{param} {file_id!r} was deleted before training", param
        )
    return partial(context.storage.open, key)


def _resume_point(context: WorkerContext, job: Job, recorder: JobRecorder) -> Path | None:
    """The trainer state an earlier run of this job kept, as a local directory."""
    step = latest_resume_step(context.storage, job.id)
    if step is None:
        return None
    recorder.event(f"Resuming from the checkpoint saved at step {step}", data={"step": step})
    cache = _workdir(context, job) / "resume"
    return context.storage.local_directory(resume_key(job.id, step), cache)


def _tokenized(context: WorkerContext, job: Job) -> Path | None:
    """The datasets an earlier run of this job tokenized, as a local directory."""
    if not context.storage.names(tokenized_key(job.id)):
        return None
    cache = _workdir(context, job) / "kept"
    return context.storage.local_directory(tokenized_key(job.id), cache)


def _train(context: WorkerContext, job: Job, recorder: JobRecorder) -> TrainingOutcome:
    validation = job.validation_file_id
    run = TrainingRun(
        model=job.model,
        config=JobConfig.model_validate(job.config),
        seed=job.seed,
        training_data=_dataset_opener(context, job.training_file_id, "training_file"),
        validation_data=(
            _dataset_opener(context, validation, "validation_file") if validation else None
        ),
        workdir=_workdir(context, job),
        max_line_bytes=context.settings.max_line_bytes,
        trust_remote_code=context.settings.trust_remote_code,
        resume_from=_resume_point(context, job, recorder),
        tokenized_from=_tokenized(context, job),
    )
    return train(run, recorder)


def _stopped(context: WorkerContext, job: Job, steps: int) -> bool:
    """Record why a run stopped before its end; True when the job went back to the queue
    (the worker is shutting down), so that the task hands its message back."""
    if shutdown_requested.is_set():
        resume_step = latest_resume_step(context.storage, job.id) or 0
        resumes = f" and resumes from step {resume_step}" if resume_step else ""
        if _transition(
            context,
            job,
            f"Worker shut down at step {steps}: the job is queued again{resumes}",
            status=JobStatus.QUEUED,
            run_id=None,
            # The task hands its message back; should the worker die before it does, the
            # reconciler sends another (a second message is harmless).
            enqueued_at=None,
            steps_done=resume_step,
            epoch=None,
            estimated_finish=None,
        ):
            return True
    # The run no longer holds the job: these events are written all the same, to say why.
    with context.session_factory.begin() as session:
        status = session.scalar(select(Job.status).where(Job.id == job.id))
        if status == JobStatus.CANCELLED:
            session.add(
                new_event(job.id, f"Training stopped at step {steps}: the job was cancelled")
            )
        else:
            session.add(
                new_event(
                    job.id,
                    f"Training stopped at step {steps}: the job was taken from this run, "
                    "whose worker's heartbeat was late",
                    level="warn",
                )
            )
    return False


def _finish(
    context: WorkerContext, job: Job, recorder: JobRecorder, outcome: TrainingOutcome
) -> bool:
    """Record how the run ended; True when the job went back to the queue."""
    if outcome.adapter_dir is None:
        return _stopped(context, job, outcome.steps)
    if not recorder.held():  # cancelled, or taken back: the adapter is not this run's to save
        return _stopped(context, job, outcome.steps)
    staged = staged_adapter_key(job.id, job.run_id or "")
    try:
        context.storage.put_directory(outcome.adapter_dir, staged)
        _succeed(context, job, outcome, staged)
    finally:
        context.storage.delete(staged)  # moved into place, or this run's to throw away
    return False


def _succeed(context: WorkerContext, job: Job, outcome: TrainingOutcome, staged: str) -> None:
    """Move the staged adapter into place and mark the job succeeded, in one transaction
    that holds the job (its row, or SQLite's write lock) from the check to the commit: no
    other run can take the job meanwhile. A run that lost its job (while uploading) moves
    nothing: the job's adapter stays the one of the run that finished it, if any."""
    name = job.fine_tuned_model_name()
    values: dict[str, Any] = {
        "status": JobStatus.SUCCEEDED,
        "fine_tuned_model": name,
        "trained_tokens": outcome.trained_tokens,
        "config": outcome.config.model_dump(mode="json"),
        "finished_at": utcnow(),
        "estimated_finish": None,
    }
    with context.session_factory.begin() as session:
        if not hold(session, job.id, job.run_id or ""):
            return
        # Replaces only what a run whose success never committed left there.
        context.storage.move(staged, adapter_key(job.id))
        session.execute(update(Job).where(held_by(job.id, job.run_id or "")).values(**values))
        session.add(
            new_event(
                job.id,
                f"Job succeeded: {outcome.steps} steps, {outcome.trained_tokens} tokens; "
                f"the adapter is served as {name}",
            )
        )


def _fail(context: WorkerContext, job: Job, failure: TrainingFailure) -> None:
    _transition(
        context,
        job,
        f"Job failed: {failure.message}",
        status=JobStatus.FAILED,
        error=failure.as_error(),
        finished_at=utcnow(),
        estimated_finish=None,
    )


def _clean_up_if_ended(context: WorkerContext, job_id: str) -> None:
    """Remove what was kept to resume the job once it has ended for good: the trainer state,
    the tokenized datasets, and the job's scratch folder (with what runs killed before their
    end left in it)."""
    with context.session_factory() as session:
        status = session.scalar(select(Job.status).where(Job.id == job_id))
    if status is None or status.is_final:
        context.storage.delete(resume_key(job_id))
        context.storage.delete(tokenized_key(job_id))
        shutil.rmtree(_job_workdir(context, job_id), ignore_errors=True)


def _as_failure(error: BaseException) -> TrainingFailure:
    if isinstance(error, TrainingFailure):
        return error
    if isinstance(error, torch.OutOfMemoryError):
        return TrainingFailure(
            "out_of_memory",
            "the GPU ran out of memory: lower batch_size or training.max_seq_length, or turn "
            "on training.gradient_checkpointing",
            "method.supervised.hyperparameters.batch_size",
        )
    if isinstance(error, SQLAlchemyError):  # its text holds SQL: for the log, not the user
        return TrainingFailure("internal_error", "the worker could not update the database")
    first_line = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
    return TrainingFailure(
        "training_error", f"training stopped with {type(error).__name__}: {first_line}"
    )


def run_job(context: WorkerContext, job_id: str, *, task_id: str | None = None) -> bool:
    """Train the job if it is still queued. True when it went back to the queue because the
    worker is shutting down: its message must go back to the broker too."""
    job = _claim(context, job_id, task_id)
    if job is None:
        logger.info("job %s is not queued (cancelled, or already taken): skipped", job_id)
        return False
    run_id = job.run_id or ""
    recorder = JobRecorder(context.session_factory, context.storage, job.id, run_id)
    requeued = False
    try:
        with Heartbeat(context.session_factory, job.id, run_id, context.settings.heartbeat_seconds):
            try:
                requeued = _finish(context, job, recorder, _train(context, job, recorder))
            except Exception as error:
                logger.exception("job %s failed", job.id)
                _fail(context, job, _as_failure(error))
    finally:
        shutil.rmtree(_workdir(context, job), ignore_errors=True)
        try:
            _clean_up_if_ended(context, job.id)
        except Exception:
            logger.exception("could not remove the resume state of job %s", job.id)
    return requeued
