"""What a running job writes besides its state: events, metric points, progress, checkpoints
(with the whole trainer state, to resume from); and whether the run should stop (cancelled,
taken from it, or the worker shutting down).

Everything is written only while the run holds the job (`jobs.run`), each write tried again
while the database is briefly away (`jobs.retry`).
"""

from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import delete, update
from sqlalchemy.orm import Session, sessionmaker

from afina.core.ids import new_id
from afina.core.job_config import JobConfig
from afina.core.storage import ArtifactStorage, checkpoint_key, resume_key, tokenized_key
from afina.jobs import lifecycle
from afina.jobs.retry import retried
from afina.jobs.run import Run
from afina.models import Job, JobCheckpoint, JobMetric, new_event
from afina.models.base import utcnow
from afina.worker.process import shutdown_requested

# What a trainer checkpoint holds beside the adapter and its tokenizer: the state to resume
# from, kept apart (`resume_key`).
TRAINER_STATE = (
    "optimizer.pt",
    "scheduler.pt",
    "scaler.pt",
    "trainer_state.json",
    "training_args.bin",
)
# How long a run waits for space on a full disk, unless told otherwise.
DISK_FULL_WAIT_SECONDS = 600.0


class JobRecorder:
    """The `Reporter` of one run, writing to its job's rows."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        storage: ArtifactStorage,
        run: Run,
        disk_full_wait: float = DISK_FULL_WAIT_SECONDS,
    ) -> None:
        self.session_factory = session_factory
        self.storage = storage
        self.run = run
        self.disk_full_wait = disk_full_wait  # how long `retried` writes wait for space
        self.steps_done = 0  # the last step the run reported
        self.pausing = False  # the caller asked the job to pause: the run saves and stops

    @property
    def job_id(self) -> str:
        return self.run.job_id

    @retried
    def held(self) -> bool:
        with self.session_factory.begin() as session:
            return lifecycle.heartbeat(session, self.run)

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
            if lifecycle.heartbeat(session, self.run):
                session.add(new_event(self.job_id, message, level=level, data=data))

    @retried
    def configured(self, config: JobConfig) -> None:
        """Show on the job what its "auto" settings became on this worker."""
        with self.session_factory.begin() as session:
            session.execute(
                update(Job).where(self.run.holds()).values(config=config.model_dump(mode="json"))
            )

    @retried
    def metric(self, step: int, values: dict[str, float | None]) -> None:
        # A resumed run writes again the steps it repeats; a run whose job was taken back
        # must not overwrite those of the run that holds it now.
        with self.session_factory.begin() as session:
            if lifecycle.heartbeat(session, self.run):
                session.merge(JobMetric(job_id=self.job_id, step=step, at=utcnow(), **values))

    @retried
    def progress(
        self, steps_done: int, total_steps: int, epoch: float, estimated_finish: datetime | None
    ) -> bool:
        """Record progress; False once the run must stop. A pause asked for at the last step
        is too late: the run ends, and the job succeeds."""
        self.steps_done = steps_done
        with self.session_factory.begin() as session:
            state = lifecycle.progress(
                session, self.run, steps_done, total_steps, epoch, estimated_finish
            )
        self.pausing = state == "pause" and steps_done < total_steps
        goes_on = state == "go" or (state == "pause" and not self.pausing)
        return goes_on and not shutdown_requested.is_set()

    def save_before_stopping(self) -> bool:
        """A run stopped because its job pauses, or its worker shuts down, saves its state
        first: the job resumes from there. A cancelled run keeps nothing."""
        return self.pausing or shutdown_requested.is_set()

    def tokenized(self, name: str, directory: Path) -> None:
        """Keep a tokenized dataset, for a later run of the job to use instead of tokenizing
        again: while the run holds the job (a cancelled job keeps nothing)."""
        if self.held():
            self.storage.put_directory(directory, tokenized_key(self.job_id, name))

    def checkpoint(self, step: int, directory: str, metrics: dict[str, float | None]) -> None:
        """Keep a trainer checkpoint: its adapter with its tokenizer, for the user (to serve,
        download, export or train further), and the whole trainer state
        (optimizer, scheduler, RNG), to resume from; only the newest state is kept.

        Only while the run holds the job: a run whose job was taken back must not replace or
        delete the state the next run resumes from, nor list checkpoints in its name, and a
        cancelled job keeps nothing."""
        if not self.held():
            return
        saved = Path(directory)
        adapter = [
            path.name
            for path in sorted(saved.iterdir())
            if path.name not in TRAINER_STATE and not path.name.startswith("rng_state")
        ]
        self.storage.put_directory(saved, checkpoint_key(self.job_id, step), names=adapter)
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
            if not lifecycle.heartbeat(session, self.run):
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
