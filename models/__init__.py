"""The shared data layer: SQLAlchemy 2.0 tables and the session factory."""

from afina.models.api_keys import ApiKey
from afina.models.base import Base
from afina.models.exports import ExportStatus, JobExport
from afina.models.files import DATASET_PURPOSE, RESULTS_PURPOSE, File
from afina.models.jobs import (
    FINAL,
    UNFINISHED,
    Job,
    JobCheckpoint,
    JobEvent,
    JobMetric,
    JobStatus,
    new_event,
)
from afina.models.workers import Worker

__all__ = [
    "DATASET_PURPOSE",
    "FINAL",
    "RESULTS_PURPOSE",
    "UNFINISHED",
    "ApiKey",
    "Base",
    "ExportStatus",
    "File",
    "Job",
    "JobCheckpoint",
    "JobEvent",
    "JobExport",
    "JobMetric",
    "JobStatus",
    "Worker",
    "new_event",
]
