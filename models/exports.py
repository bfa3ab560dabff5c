"""Exports of a fine-tuned model: the adapter merged into its base, run by a worker on the
export queue and stored under `jobs/{job_id}/exports/{id}.tar.gz`."""

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, BigInteger, ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from afina.models.base import Base, CreatedAt, status_type


class ExportStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class JobExport(CreatedAt, Base):
    __tablename__ = "job_exports"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    status: Mapped[ExportStatus] = mapped_column(status_type(ExportStatus, "export_status", 16))
    format: Mapped[str] = mapped_column(String(16))
    dtype: Mapped[str] = mapped_column(String(16))
    # The checkpoint exported; None: the job's final adapter.
    checkpoint_step: Mapped[int | None]
    bytes: Mapped[int | None] = mapped_column(BigInteger)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # The run that holds it, fencing off a run whose export was taken from it (as for jobs).
    run_id: Mapped[str | None] = mapped_column(String(32))
    enqueued_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
