"""One training job from the worker's side: claim it, train (from the trainer state an
earlier run kept, if there is one), and record how it ended.

Every state change goes through `jobs.lifecycle`, as a conditional UPDATE: a run whose job
was taken back (its worker was thought lost, see `jobs.reconciler`) or cancelled changes
nothing. Any failure inside the run ends the job `failed` with an error a user can act on.

A run that meets a full disk (a checkpoint or the adapter that cannot be written) does not
fail for it at once: it frees its scratch space, waits for the disk to have
`AFINA_MIN_FREE_BYTES` free again, for up to `AFINA_DISK_FULL_WAIT_SECONDS`, and goes on
from its last checkpoint (the database's own writes wait in place, see `jobs.retry`). Only a
disk that stays full fails the job, with `disk_full`.
"""

import gc
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import BinaryIO

import torch
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from afina.core.disk import MiB, is_disk_full, local_directories, nearly_full
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
    trained_key,
)
from afina.jobs import lifecycle, result_files, workers
from afina.jobs.retry import retried
from afina.jobs.run import Run
from afina.models import File, Job, JobStatus
from afina.worker.device import ranks_available
from afina.worker.heartbeat import Heartbeat
from afina.worker.process import shutdown_requested, this_worker
from afina.worker.run_recorder import JobRecorder
from afina.worker.training.errors import TrainingFailure, first_line
from afina.worker.training.run import TrainingOutcome, TrainingRun, train

logger = logging.getLogger(__name__)

# Free space under which an error that names no cause (torch.save says "file write failed")
# is taken for a full disk.
FULL_DISK_BYTES = 8 * MiB
# How often a run waiting for space looks at the disks, and at its job (cancelled?).
SPACE_POLL_SECONDS = 1.0
HELD_POLL_SECONDS = 5.0
# How many times a run may go back to its last checkpoint for a full disk without saving a
# newer one: a disk that looks free again but still refuses the run's writes fails the job.
MAX_DISK_FULL_RESTARTS = 3


@dataclass(frozen=True)
class WorkerContext:
    settings: Settings
    session_factory: sessionmaker[Session]
    storage: ArtifactStorage

    @property
    def disk_full_wait(self) -> float:
        """How long a write meeting a full disk is tried again (`jobs.retry`)."""
        return self.settings.disk_full_wait_seconds

    def directories(self) -> list[Path]:
        """The local directories a run writes to, one per disk."""
        settings = self.settings
        return local_directories(
            settings.data_dir, settings.database_url, settings.broker_url, settings.storage_url
        )


def _job_workdir(context: WorkerContext, job_id: str) -> Path:
    return context.settings.data_dir / "work" / job_id


def workdir(context: WorkerContext, run: Run) -> Path:
    """The run's scratch space. Its own, not the job's: workers may share the data dir, and a
    run whose job was taken back may still be going while the next run of the job starts."""
    return _job_workdir(context, run.job_id) / run.run_id


def claim(context: WorkerContext, job_id: str) -> tuple[Job, Run] | None:
    """Start a run of the job if it is still queued: the job as it starts, and the run."""
    with context.session_factory.begin() as session:
        run = lifecycle.claim(session, job_id, this_worker())
        return None if run is None else (session.get_one(Job, job_id), run)


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
    cache = workdir(context, recorder.run) / "resume"
    return context.storage.local_directory(resume_key(job.id, step), cache)


def _tokenized(context: WorkerContext, run: Run) -> Path | None:
    """The datasets an earlier run of this job tokenized, as a local directory."""
    if not context.storage.names(tokenized_key(run.job_id)):
        return None
    cache = workdir(context, run) / "kept"
    return context.storage.local_directory(tokenized_key(run.job_id), cache)


def fetch_adapter(
    context: WorkerContext, job_id: str, step: int | None, cache: Path, deleted: str
) -> Path:
    """The adapter of the job's fine-tuned model (`step` None) or of its checkpoint, as a local
    directory; `model_not_found` saying `deleted` when it is gone."""
    key = trained_key(job_id, step)
    if not context.storage.names(key):
        raise TrainingFailure("model_not_found", deleted, "model")
    return context.storage.local_directory(key, cache)


def _parent_adapter(context: WorkerContext, job: Job, run: Run) -> Path | None:
    """The adapter of the fine-tuned model or checkpoint the job trains further, as a local
    directory."""
    if job.parent_job_id is None:
        return None
    return fetch_adapter(
        context,
        job.parent_job_id,
        job.parent_step,
        workdir(context, run) / "parent",
        f"the fine-tuned model {job.parent_model!r} was deleted before training",
    )


@dataclass(frozen=True)
class Inputs:
    """What a run starts from, fetched once as local directories (for all its ranks)."""

    resume_from: Path | None  # the trainer state an earlier run of the job kept
    tokenized_from: Path | None  # the datasets an earlier run tokenized
    adapter_from: Path | None  # the adapter of the fine-tuned model the job continues


def fetch_inputs(context: WorkerContext, job: Job, recorder: JobRecorder) -> Inputs:
    return Inputs(
        _resume_point(context, job, recorder),
        _tokenized(context, recorder.run),
        _parent_adapter(context, job, recorder.run),
    )


def training_run(
    context: WorkerContext,
    job: Job,
    inputs: Inputs,
    workdir: Path,
    *,
    trainer_dir: Path | None = None,
    follower: bool = False,
) -> TrainingRun:
    validation = job.validation_file_id
    return TrainingRun(
        model=job.model,
        config=JobConfig.model_validate(job.config),
        seed=job.seed,
        training_data=_dataset_opener(context, job.training_file_id, "training_file"),
        validation_data=(
            _dataset_opener(context, validation, "validation_file") if validation else None
        ),
        workdir=workdir,
        max_line_bytes=context.settings.max_line_bytes,
        trust_remote_code=context.settings.trust_remote_code,
        resume_from=inputs.resume_from,
        tokenized_from=inputs.tokenized_from,
        adapter_from=inputs.adapter_from,
        trainer_dir=trainer_dir,
        follower=follower,
    )


def _train(context: WorkerContext, job: Job, recorder: JobRecorder) -> TrainingOutcome:
    ranks, available = JobConfig.model_validate(job.config).resources.gpus, ranks_available()
    if ranks > available:  # before anything is fetched
        raise TrainingFailure(
            "too_few_gpus",
            f"the job asks for {ranks} GPUs of one node and this worker has {available}: "
            "route it to a worker that has (resources.queue)",
            "resources.gpus",
        )
    inputs = fetch_inputs(context, job, recorder)
    if ranks > 1:
        from afina.worker.ranks import train_on_ranks  # it imports this module

        return train_on_ranks(context, job, recorder, inputs, ranks)
    return train(training_run(context, job, inputs, workdir(context, recorder.run)), recorder)


def stopped(context: WorkerContext, recorder: JobRecorder, steps: int) -> bool:
    """Record why a run stopped before its end; True when the job went back to the queue
    (the worker is shutting down), so that the task hands its message back. A job paused
    (the caller asked) holds no message: resuming it sends one."""
    run = recorder.run
    if recorder.pausing or shutdown_requested.is_set():
        status = _set_aside(context, run, steps)
        if status is not None:
            return status == JobStatus.QUEUED
    # The run no longer holds the job: this event is written all the same, to say why.
    with context.session_factory.begin() as session:
        lifecycle.stopped(session, run.job_id, steps)
    return False


@retried
def _set_aside(context: WorkerContext, run: Run, steps: int) -> JobStatus | None:
    resume_step = latest_resume_step(context.storage, run.job_id) or 0
    resumes = f" and resumes from step {resume_step}" if resume_step else ""
    with context.session_factory.begin() as session:
        # The task hands its message back; should the worker die before it does, the
        # reconciler sends another (a second message is harmless).
        return lifecycle.requeue(
            session,
            run.job_id,
            run.holds(),
            f"Worker shut down at step {steps}: the job is queued again{resumes}",
            resume_step=resume_step,
        )


def finish(
    context: WorkerContext, job: Job, recorder: JobRecorder, outcome: TrainingOutcome
) -> bool:
    """Record how the run ended; True when the job went back to the queue."""
    run = recorder.run
    if outcome.adapter_dir is None:
        return stopped(context, recorder, outcome.steps)
    if not recorder.held():  # cancelled, or taken back: the adapter is not this run's to save
        return stopped(context, recorder, outcome.steps)
    staged = staged_adapter_key(run.job_id, run.run_id)
    try:
        context.storage.put_directory(outcome.adapter_dir, staged)
        _succeed(context, job, run, outcome, staged)
    finally:
        context.storage.delete(staged)  # moved into place, or this run's to throw away
    return False


def _succeed(
    context: WorkerContext, job: Job, run: Run, outcome: TrainingOutcome, staged: str
) -> None:
    """Move the staged adapter into place, write the result files and mark the job
    succeeded, in one transaction that holds the job (its row, or SQLite's write lock) from
    the check to the commit: no other run can take the job meanwhile. A run that lost its job
    (while uploading) moves nothing: the job's adapter stays the one of the run that finished
    it, if any."""
    name = job.fine_tuned_model_name()
    stored: list[File] = []
    try:
        with context.session_factory.begin() as session:
            if not lifecycle.heartbeat(session, run):
                return
            stored = result_files.store(
                context.storage, session, job, outcome.config.method, outcome.generations
            )
            # Replaces only what a run whose success never committed left there.
            context.storage.move(staged, adapter_key(run.job_id))
            lifecycle.succeed(
                session,
                run,
                f"Job succeeded: {outcome.steps} steps, {outcome.trained_tokens} tokens; "
                f"the adapter is served as {name}",
                fine_tuned_model=name,
                trained_tokens=outcome.trained_tokens,
                config=outcome.config.model_dump(mode="json"),
                result_files=[row.id for row in stored],
            )
            if outcome.parameters and outcome.tokens_per_second:  # for the estimates to come
                workers.record_throughput(
                    session,
                    this_worker(),
                    outcome.parameters,
                    outcome.config.quantization.bits,
                    outcome.tokens_per_second,
                )
    except BaseException:
        result_files.discard(context.storage, stored)
        raise


def _out_of_space(context: WorkerContext, error: BaseException) -> bool:
    """Whether the run failed for a full disk: it says so, or it failed while one of the run's
    disks has next to nothing left."""
    if is_disk_full(error):
        return True
    if isinstance(error, TrainingFailure | torch.OutOfMemoryError | SQLAlchemyError):
        return False
    try:
        return nearly_full(context.directories(), FULL_DISK_BYTES) is not None
    except OSError:
        return False


def _wait_for_space(context: WorkerContext, recorder: JobRecorder) -> str:
    """Wait for every disk of the run to have `min_free_bytes` free: "space" once they have,
    "stopped" once the run must stop (cancelled, taken back, the worker stopping), "timeout"
    after `disk_full_wait_seconds`."""
    settings = context.settings
    directories = context.directories()
    step = recorder.steps_done
    message = (
        f"The disk is full at step {step}: training waits for "
        f"{settings.min_free_bytes / MiB:.0f} MiB to be free (for up to "
        f"{settings.disk_full_wait_seconds:.0f} s), then goes on from its last checkpoint"
    )
    logger.warning("job %s: %s", recorder.job_id, message)
    try:  # the database may be on that disk: one try, the wait does not hang on it
        recorder.event_once(message, level="warn", data={"step": step})
    except Exception as error:
        logger.warning("could not record that job %s waits for space (%r)", recorder.job_id, error)
    deadline = time.monotonic() + settings.disk_full_wait_seconds
    next_held_check = time.monotonic() + HELD_POLL_SECONDS
    while True:
        if shutdown_requested.is_set():
            return "stopped"
        if time.monotonic() >= next_held_check:
            next_held_check = time.monotonic() + HELD_POLL_SECONDS
            try:
                with context.session_factory.begin() as session:
                    if not lifecycle.heartbeat(session, recorder.run):
                        return "stopped"
            except SQLAlchemyError:
                pass  # the database's disk is full too: the job is still this run's
        if nearly_full(directories, settings.min_free_bytes) is None:
            return "space"
        if time.monotonic() >= deadline:
            return "timeout"
        shutdown_requested.wait(SPACE_POLL_SECONDS)


def _disk_stayed_full(context: WorkerContext) -> TrainingFailure:
    settings = context.settings
    where = ", ".join(str(directory) for directory in context.directories())
    return TrainingFailure(
        "disk_full",
        f"the disk stayed full for {settings.disk_full_wait_seconds:.0f} s "
        f"(AFINA_DISK_FULL_WAIT_SECONDS), with less than {settings.min_free_bytes / MiB:.0f} "
        f"MiB free (AFINA_MIN_FREE_BYTES) under {where}: free some space, then train again "
        "from the job's last checkpoint",
    )


def _run(context: WorkerContext, job: Job, recorder: JobRecorder) -> bool:
    """Train and record how the run ended; True when the job went back to the queue. A run
    that meets a full disk waits for space, then goes on from its last checkpoint."""
    restarts, checkpoint = 0, latest_resume_step(context.storage, job.id)
    while True:
        try:
            return finish(context, job, recorder, _train(context, job, recorder))
        except Exception as error:
            # The database's writes have waited for space already (`retried`).
            if isinstance(error, SQLAlchemyError) or not _out_of_space(context, error):
                raise
            logger.warning("job %s: a write met a full disk: %s", job.id, error)
        # Out of the `except`: the error, and the trainer its traceback holds, are let go.
        shutil.rmtree(workdir(context, recorder.run), ignore_errors=True)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        newest = latest_resume_step(context.storage, job.id)
        restarts = 1 if newest != checkpoint else restarts + 1
        checkpoint = newest
        if restarts > MAX_DISK_FULL_RESTARTS:
            raise _disk_stayed_full(context)
        waited = _wait_for_space(context, recorder)
        if waited == "stopped":
            return stopped(context, recorder, recorder.steps_done)
        if waited == "timeout":
            raise _disk_stayed_full(context)


@retried
def fail(context: WorkerContext, run: Run, failure: TrainingFailure) -> bool:
    """End the job `failed`, if the run still holds it."""
    with context.session_factory.begin() as session:
        return lifecycle.fail(
            session, run.job_id, run.holds(), failure.as_error(), f"Job failed: {failure.message}"
        )


def _clean_up_if_ended(context: WorkerContext, job_id: str) -> None:
    """Once the job has ended for good (whoever ended it): what its end cleans up, and the
    job's scratch folder (with what runs killed before their end left in it)."""
    with context.session_factory() as session:
        status = session.scalar(select(Job.status).where(Job.id == job_id))
    if status is None or status.is_final:
        lifecycle.ended(context.storage, job_id)
        shutil.rmtree(_job_workdir(context, job_id), ignore_errors=True)


def as_failure(error: BaseException, job: Job) -> TrainingFailure:
    if isinstance(error, TrainingFailure):
        return error
    if isinstance(error, torch.OutOfMemoryError):
        method = JobConfig.model_validate(job.config).method
        return TrainingFailure(
            "out_of_memory",
            "the GPU ran out of memory: lower batch_size or training.max_seq_length, or turn "
            "on training.gradient_checkpointing",
            f"method.{method}.hyperparameters.batch_size",
        )
    if is_disk_full(error):
        return TrainingFailure(
            "disk_full",
            f"the disk stayed full (AFINA_DISK_FULL_WAIT_SECONDS): {first_line(error)}; free "
            "some space, then train again from the job's last checkpoint",
        )
    if isinstance(error, SQLAlchemyError):  # its text holds SQL: for the log, not the user
        return TrainingFailure("internal_error", "the worker could not update the database")
    return TrainingFailure(
        "training_error", f"training stopped with {type(error).__name__}: {first_line(error)}"
    )


def run_job(context: WorkerContext, job_id: str) -> bool:
    """Train the job if it is still queued. True when it went back to the queue because the
    worker is shutting down: its message must go back to the broker too."""
    claimed = claim(context, job_id)
    if claimed is None:
        logger.info("job %s is not queued (cancelled, or already taken): skipped", job_id)
        return False
    job, run = claimed
    recorder = JobRecorder(context.session_factory, context.storage, run, context.disk_full_wait)
    requeued = False
    try:
        with Heartbeat.of_run(context.session_factory, run, context.settings.heartbeat_seconds):
            try:
                requeued = _run(context, job, recorder)
            except Exception as error:
                logger.exception("job %s failed", job.id)
                fail(context, run, as_failure(error, job))
    finally:
        shutil.rmtree(workdir(context, run), ignore_errors=True)
        try:
            _clean_up_if_ended(context, job.id)
        except Exception:
            logger.exception("could not remove the resume state of job %s", job.id)
    return requeued
