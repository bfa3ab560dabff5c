"""One training job from the worker's side: claim it, train, and record how it ended.

Every state change is a conditional UPDATE, so the database settles races: a job cancelled
while it trains stays cancelled, and a message delivered twice starts a job only once. Any
failure inside the run ends the job `failed` with an error a user can act on. (A worker that
dies outright leaves its job `running` with a stale heartbeat: that is for a reconciler.)
"""

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

import torch
from sqlalchemy import func, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from afina.core.job_config import JobConfig
from afina.core.settings import Settings
from afina.core.storage import ArtifactStorage, adapter_key, file_key
from afina.models import Job, JobStatus, new_event
from afina.models.base import utcnow
from afina.worker.job_records import Heartbeat, JobRecorder, shutdown_requested
from afina.worker.training.errors import TrainingFailure
from afina.worker.training.sft import TrainingOutcome, TrainingRun, train

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerContext:
    settings: Settings
    session_factory: sessionmaker[Session]
    storage: ArtifactStorage


def _workdir(context: WorkerContext, job_id: str) -> Path:
    return context.settings.data_dir / "work" / job_id


def _transition(
    context: WorkerContext, job_id: str, source: JobStatus, event: str, **values: Any
) -> bool:
    """Move the job from `source` to new values, with an event, if it is still in `source`."""
    level = "error" if values.get("status") == JobStatus.FAILED else "info"
    with context.session_factory.begin() as session:
        changed = session.execute(
            update(Job).where(Job.id == job_id, Job.status == source).values(**values)
        ).rowcount
        if changed:
            session.add(new_event(job_id, event, level=level, data=values.get("error")))
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
        workdir=_workdir(context, job.id),
        max_line_bytes=context.settings.max_line_bytes,
        trust_remote_code=context.settings.trust_remote_code,
    )
    return train(run, recorder)


def _finish(
    context: WorkerContext, job: Job, recorder: JobRecorder, outcome: TrainingOutcome
) -> bool:
    """Record how the run ended; True when the job went back to the queue (the worker is
    shutting down), so that the task hands its message back."""
    if outcome.adapter_dir is None:
        if shutdown_requested.is_set():
            return _transition(
                context,
                job.id,
                JobStatus.RUNNING,
                f"Worker shut down at step {outcome.steps}: the job is queued again",
                status=JobStatus.QUEUED,
                steps_done=0,
                total_steps=None,
                epoch=None,
                estimated_finish=None,
            )
        recorder.event(f"Training stopped at step {outcome.steps}: the job was cancelled")
        return False
    key = adapter_key(job.id)
    context.storage.put_directory(outcome.adapter_dir, key)
    name = job.fine_tuned_model_name()
    succeeded = _transition(
        context,
        job.id,
        JobStatus.RUNNING,
        f"Job succeeded: {outcome.steps} steps, {outcome.trained_tokens} tokens; "
        f"the adapter is served as {name}",
        status=JobStatus.SUCCEEDED,
        fine_tuned_model=name,
        trained_tokens=outcome.trained_tokens,
        config=outcome.config.model_dump(mode="json"),
        finished_at=utcnow(),
        estimated_finish=None,
    )
    if not succeeded:  # cancelled while the adapter was saved: keep nothing of it
        context.storage.delete(key)
    return False


def _fail(context: WorkerContext, job_id: str, failure: TrainingFailure) -> None:
    _transition(
        context,
        job_id,
        JobStatus.RUNNING,
        f"Job failed: {failure.message}",
        status=JobStatus.FAILED,
        error=failure.as_error(),
        finished_at=utcnow(),
        estimated_finish=None,
    )


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
    recorder = JobRecorder(context.session_factory, context.storage, job.id)
    requeued = False
    try:
        with Heartbeat(context.session_factory, job.id):
            try:
                requeued = _finish(context, job, recorder, _train(context, job, recorder))
            except Exception as error:
                logger.exception("job %s failed", job.id)
                _fail(context, job.id, _as_failure(error))
    finally:
        shutil.rmtree(_workdir(context, job.id), ignore_errors=True)
    return requeued
