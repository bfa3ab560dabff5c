"""What a running job writes to the database: events, metric points, progress, checkpoints
(with the whole trainer state, to resume from), and the heartbeat; and whether the job should
stop (cancelled, taken from this run, or the worker shutting down).

A run holds its job by its `run_id`: everything it writes (progress, heartbeats, events,
metric points, checkpoints) is written only while the job is `running` under that id, so a
run whose job was taken back (its worker was thought lost, then came back: a frozen process,
a lost database connection) or cancelled writes nothing more and stops at its next step.

A write that fails because the database is briefly away (restarting, a dropped connection,
SQLite's lock held too long) is tried again, with backoff, for up to `RETRY_SECONDS`: a
running job does not fail for it; only a longer outage fails the run. One that fails because
the database's disk is full is tried again for as long as the run waits for space
(`AFINA_DISK_FULL_WAIT_SECONDS`), if that is longer.
"""

import functools
import logging
import os
import socket
import threading
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

from sqlalchemy import ColumnElement, and_, delete, update
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from tenacity import (
    RetryCallState,
    Retrying,
    before_sleep_log,
    retry_if_exception,
    wait_exponential,
)

from afina.core.disk import is_disk_full
from afina.core.ids import new_id
from afina.core.job_config import JobConfig
from afina.core.storage import ArtifactStorage, checkpoint_key, resume_key, tokenized_key
from afina.models import Job, JobCheckpoint, JobMetric, JobStatus, new_event
from afina.models.base import utcnow

logger = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")

# Set when the worker is asked to shut down: the run stops at its next step.
shutdown_requested = threading.Event()
# Set by `afina serve` for the worker child it starts: a name of its own for that process.
WORKER_ID_VARIABLE = "AFINA_WORKER_ID"

# How long a run's write is tried again while the database is away, in all, and the first
# and longest waits between tries.
RETRY_SECONDS = 180.0
RETRY_FIRST_WAIT_SECONDS = 0.5
RETRY_LONGEST_WAIT_SECONDS = 15.0
# How long a run waits for space on a full disk, unless told otherwise.
DISK_FULL_WAIT_SECONDS = 600.0

P = ParamSpec("P")
R = TypeVar("R")


def _transient(error: BaseException) -> bool:
    """A database error that a later try may not meet: the database was away, not the SQL."""
    return isinstance(error, OperationalError) or (
        isinstance(error, DBAPIError) and error.connection_invalidated
    )


def _stop_after(disk_full_wait: float) -> Callable[[RetryCallState], bool]:
    """Stop trying after `RETRY_SECONDS`, or, while the database's disk is full, after as long
    as the run waits for space, if that is longer."""

    def given_up(state: RetryCallState) -> bool:
        limit = RETRY_SECONDS
        error = state.outcome.exception() if state.outcome is not None else None
        if error is not None and is_disk_full(error):
            limit = max(limit, disk_full_wait)
        return (state.seconds_since_start or 0.0) >= limit

    return given_up


def retried(write: Callable[P, R]) -> Callable[P, R]:
    """Try `write` again while it fails for a transient database error, then re-raise. A full
    disk is waited for as long as the first argument's `disk_full_wait` says, if it has one."""

    @functools.wraps(write)
    def retrying(*args: P.args, **kwargs: P.kwargs) -> R:
        disk_full_wait = getattr(args[0], "disk_full_wait", 0.0) if args else 0.0
        for attempt in Retrying(
            retry=retry_if_exception(_transient),
            stop=_stop_after(disk_full_wait),
            wait=wait_exponential(
                multiplier=RETRY_FIRST_WAIT_SECONDS,
                min=RETRY_FIRST_WAIT_SECONDS,
                max=RETRY_LONGEST_WAIT_SECONDS,
            ),
            before_sleep=before_sleep_log(logger, logging.WARNING),
            reraise=True,
        ):
            with attempt:
                return write(*args, **kwargs)
        raise AssertionError("unreachable")  # pragma: no cover - Retrying re-raises

    return retrying


def this_worker() -> str:
    """The name this worker process gives the jobs it runs (`Job.worker`)."""
    return os.environ.get(WORKER_ID_VARIABLE) or f"{socket.gethostname()}:{os.getpid()}"


def held_by(job_id: str, run_id: str) -> ColumnElement[bool]:
    """The job is running, under this run."""
    return and_(Job.id == job_id, Job.status == JobStatus.RUNNING, Job.run_id == run_id)


def hold(session: Session, job_id: str, run_id: str) -> bool:
    """Whether the run still holds the job, found by an UPDATE that stamps its heartbeat: what
    the caller writes in the same transaction lands only while it does. The reconciler takes
    a job back with a conditional UPDATE too, so one of the two waits for the other: either
    the job is taken back first and this finds it gone, or the fresh stamp keeps it here."""
    stamped = session.execute(
        update(Job).where(held_by(job_id, run_id)).values(heartbeat_at=utcnow())
    ).rowcount
    return bool(stamped)


class JobRecorder:
    """The `Reporter` of one job's run, writing to its rows."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        storage: ArtifactStorage,
        job_id: str,
        run_id: str,
        disk_full_wait: float = DISK_FULL_WAIT_SECONDS,
    ) -> None:
        self.session_factory = session_factory
        self.storage = storage
        self.job_id = job_id
        self.run_id = run_id
        self.disk_full_wait = disk_full_wait  # how long `retried` writes wait for space
        self.steps_done = 0  # the last step the run reported

    @retried
    def held(self) -> bool:
        with self.session_factory.begin() as session:
            return hold(session, self.job_id, self.run_id)

    @retried
    def event(
        self, message: str, *, level: str = "info", data: dict[str, Any] | None = None
    ) -> None:
        self.event_once(message, level=level, data=data)

    def event_once(
        self, message: str, *, level: str = "info", data: dict[str, Any] | None = None
    ) -> None:
        """Write an event with one try (raising if it fails)."""
        with self.session_factory.begin() as session:
            if hold(session, self.job_id, self.run_id):
                session.add(new_event(self.job_id, message, level=level, data=data))

    @retried
    def configured(self, config: JobConfig) -> None:
        """Show on the job what its "auto" settings became on this worker."""
        with self.session_factory.begin() as session:
            session.execute(
                update(Job)
                .where(held_by(self.job_id, self.run_id))
                .values(config=config.model_dump(mode="json"))
            )

    @retried
    def metric(self, step: int, values: dict[str, float | None]) -> None:
        # A resumed run writes again the steps it repeats; a run whose job was taken back
        # must not overwrite those of the run that holds it now.
        with self.session_factory.begin() as session:
            if hold(session, self.job_id, self.run_id):
                session.merge(JobMetric(job_id=self.job_id, step=step, at=utcnow(), **values))

    @retried
    def progress(
        self, steps_done: int, total_steps: int, epoch: float, estimated_finish: datetime | None
    ) -> bool:
        """Record progress; False once the run must stop. The one UPDATE per step both writes
        the progress and finds out whether the job is still this run's (not cancelled)."""
        self.steps_done = steps_done
        with self.session_factory.begin() as session:
            running = session.execute(
                update(Job)
                .where(held_by(self.job_id, self.run_id))
                .values(
                    steps_done=steps_done,
                    total_steps=total_steps,
                    epoch=epoch,
                    estimated_finish=estimated_finish,
                )
            ).rowcount
        return bool(running) and not shutdown_requested.is_set()

    def save_before_stopping(self) -> bool:
        """A run stopped because its worker shuts down saves its state first: the job goes
        back to the queue and resumes from there. A cancelled run keeps nothing."""
        return shutdown_requested.is_set()

    def tokenized(self, name: str, directory: Path) -> None:
        """Keep a tokenized dataset, for a later run of the job to use instead of tokenizing
        again: while the run holds the job (a cancelled job keeps nothing)."""
        if self.held():
            self.storage.put_directory(directory, tokenized_key(self.job_id, name))

    def checkpoint(self, step: int, directory: str, metrics: dict[str, float | None]) -> None:
        """Keep a trainer checkpoint: its adapter, for the user, and the whole trainer state
        (optimizer, scheduler, RNG), to resume from; only the newest state is kept.

        Only while the run holds the job: a run whose job was taken back must not replace or
        delete the state the next run resumes from, nor list checkpoints in its name, and a
        cancelled job keeps nothing."""
        if not self.held():
            return
        self.storage.put_directory(
            Path(directory), checkpoint_key(self.job_id, step), names=ADAPTER_FILES
        )
        self.storage.put_directory(Path(directory), resume_key(self.job_id, step))
        if not self._record_checkpoint(step, metrics):
            return  # lost while uploading: the run's end removes it if the job is over
        for name in self.storage.names(resume_key(self.job_id)):
            if name != f"step-{step}":
                self.storage.delete(f"{resume_key(self.job_id)}/{name}")

    @retried
    def _record_checkpoint(self, step: int, metrics: dict[str, float | None]) -> bool:
        """List the checkpoint, if the run still holds the job."""
        with self.session_factory.begin() as session:
            if not hold(session, self.job_id, self.run_id):
                return False
            session.execute(
                delete(JobCheckpoint).where(
                    JobCheckpoint.job_id == self.job_id, JobCheckpoint.step == step
                )
            )
            session.add(
                JobCheckpoint(id=new_id("ftckpt"), job_id=self.job_id, step=step, metrics=metrics)
            )
            session.add(
                new_event(self.job_id, f"Checkpoint saved at step {step}", data={"step": step})
            )
        return True


class Heartbeat:
    """A thread that stamps the job's `heartbeat_at` every `interval` seconds while its run
    holds it: a `running` job with an old stamp has lost its worker (`worker.reconciler`)."""

    def __init__(
        self, session_factory: sessionmaker[Session], job_id: str, run_id: str, interval: float
    ) -> None:
        self.session_factory = session_factory
        self.job_id = job_id
        self.run_id = run_id
        self.interval = interval
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._beat, name=f"heartbeat-{job_id}", daemon=True)

    def beat(self) -> bool:
        """Stamp the heartbeat; False when the run no longer holds the job."""
        with self.session_factory.begin() as session:
            return hold(session, self.job_id, self.run_id)

    def _beat(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                self.beat()
            except Exception as error:
                if is_disk_full(error):  # one line a beat, not a traceback
                    logger.warning("heartbeat of %s failed: the disk is full", self.job_id)
                else:
                    logger.exception("heartbeat of %s failed; trying again", self.job_id)

    def __enter__(self) -> "Heartbeat":
        self.thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stopped.set()
        self.thread.join()
