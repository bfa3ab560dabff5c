"""Fine-tuning jobs and what their runs record: events, the metric series, checkpoints.

The database, not the broker, is the source of truth for a job's state.
"""

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    ForeignKey,
    Index,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from afina.core.ids import new_id
from afina.models.base import Base, CreatedAt, status_type, utcnow


class JobStatus(StrEnum):
    # OpenAI's status for a job whose files are being checked; afina checks them at upload,
    # so it never sets it (README, "Fine-tune a model").
    VALIDATING_FILES = "validating_files"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    # OpenAI's too: set aside by the caller, holding no worker, until resumed.
    PAUSED = "paused"

    @property
    def is_final(self) -> bool:
        return self in FINAL


FINAL = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)
UNFINISHED = (JobStatus.VALIDATING_FILES, JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.PAUSED)


def _job_id_fk(**kwargs: Any) -> Mapped[str]:
    return mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), **kwargs)


class Job(CreatedAt, Base):
    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_project_created_at", "project", "created_at"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    project: Mapped[str] = mapped_column(String(64))
    status: Mapped[JobStatus] = mapped_column(status_type(JobStatus, "job_status", 32), index=True)
    model: Mapped[str] = mapped_column(String(512))
    # Plain ids, not foreign keys: like OpenAI's, a job keeps naming a file deleted later.
    training_file_id: Mapped[str] = mapped_column(String(64), index=True)
    validation_file_id: Mapped[str | None] = mapped_column(String(64), index=True)
    suffix: Mapped[str | None] = mapped_column(String(64))
    # The caller's fine-tuned model or checkpoint this job trains further (`model` is then
    # its base), as the request named it; the job that made it, and the checkpoint's step.
    parent_model: Mapped[str | None] = mapped_column(String(512))
    parent_job_id: Mapped[str | None] = mapped_column(String(64))
    parent_step: Mapped[int | None]
    seed: Mapped[int]
    user_metadata: Mapped[dict[str, str] | None] = mapped_column("metadata", JSON)
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(512), unique=True)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger)
    # The ids of the files (purpose `fine-tune-results`) the job's success wrote.
    result_files: Mapped[list[str]] = mapped_column(JSON, default=list, server_default="[]")
    steps_done: Mapped[int] = mapped_column(default=0)
    total_steps: Mapped[int | None]
    epoch: Mapped[float | None]
    estimated_finish: Mapped[datetime | None]
    attempts: Mapped[int] = mapped_column(default=0)
    # Runs that ended because their worker was lost (killed, crashed, stopped answering).
    lost_workers: Mapped[int] = mapped_column(default=0, server_default="0")
    # Set by the run that holds the job: a run whose id is no longer here writes nothing.
    run_id: Mapped[str | None] = mapped_column(String(32))
    # The worker process that runs (or last ran) it, so that a worker seen to die can be
    # named: the id `afina serve` gave its child, or `{host}:{pid}`.
    worker: Mapped[str | None] = mapped_column(String(255))
    # When the caller asked a running job to pause: its run saves a checkpoint at the next
    # step and sets the job `paused`.
    pause_requested_at: Mapped[datetime | None]
    # When the caller deleted the fine-tuned model (`DELETE /v1/models/...`): its adapter,
    # checkpoints and exports are gone; the job stays, as a record.
    model_deleted_at: Mapped[datetime | None]
    # The training queue its messages go to: the worker class chosen when it was created
    # (`resources.queue`, or the smallest class that fits), `train` when none was checked.
    queue: Mapped[str] = mapped_column(String(64), default="train", server_default="train")
    # When the job's message last went to the queue; None while a queued job still needs one.
    enqueued_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    def fine_tuned_model_name(self) -> str:
        """`ft:{model}:{project}:{suffix}:{short id}`: what serving will take as `model`."""
        short_id = self.id.removeprefix("ftjob-")[:8]
        return f"ft:{self.model}:{self.project}:{self.suffix or ''}:{short_id}"


class JobEvent(CreatedAt, Base):
    __tablename__ = "job_events"
    __table_args__ = (Index("ix_job_events_job_id_created_at", "job_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    job_id: Mapped[str] = _job_id_fk()
    level: Mapped[str] = mapped_column(String(16))
    type: Mapped[str] = mapped_column(String(16), default="message")
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class JobMetric(Base):
    """One point of the training curve; a resumed run overwrites the steps it repeats."""

    __tablename__ = "job_metrics"

    job_id: Mapped[str] = _job_id_fk(primary_key=True)
    step: Mapped[int] = mapped_column(primary_key=True)
    epoch: Mapped[float | None]
    loss: Mapped[float | None]
    eval_loss: Mapped[float | None]
    learning_rate: Mapped[float | None]
    grad_norm: Mapped[float | None]
    tokens_per_second: Mapped[float | None]
    mean_token_accuracy: Mapped[float | None]
    eval_mean_token_accuracy: Mapped[float | None]
    # DPO's: the implicit rewards (beta x the log-ratio to the reference) of the preferred and
    # the other answers, the share of pairs ranked right, and the mean margin.
    rewards_chosen: Mapped[float | None]
    rewards_rejected: Mapped[float | None]
    rewards_accuracies: Mapped[float | None]
    rewards_margins: Mapped[float | None]
    eval_rewards_accuracies: Mapped[float | None]
    at: Mapped[datetime] = mapped_column(default=utcnow)


class JobCheckpoint(CreatedAt, Base):
    """An adapter saved at `step`, stored under `jobs/{job_id}/checkpoints/step-{step}/`."""

    __tablename__ = "job_checkpoints"
    __table_args__ = (UniqueConstraint("job_id", "step"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    job_id: Mapped[str] = _job_id_fk()
    step: Mapped[int]
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


def new_event(
    job_id: str,
    message: str,
    *,
    level: str = "info",
    type: str = "message",
    data: dict[str, Any] | None = None,
) -> JobEvent:
    return JobEvent(
        id=new_id("ftevent"), job_id=job_id, level=level, type=type, message=message, data=data
    )
