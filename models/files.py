from sqlalchemy import BigInteger, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from afina.models.base import Base, CreatedAt

DATASET_PURPOSE = "fine-tune"  # an uploaded dataset
RESULTS_PURPOSE = "fine-tune-results"  # what a succeeded job wrote (`jobs.result_files`)


class File(CreatedAt, Base):
    """An uploaded dataset that passed validation, or a job's result file; its bytes live at
    `files/{id}.jsonl`. A result file's `format` is "csv" or "jsonl", and `num_examples`
    counts its rows."""

    __tablename__ = "files"
    __table_args__ = (Index("ix_files_project_created_at", "project", "created_at"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    project: Mapped[str] = mapped_column(String(64))
    filename: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger)
    format: Mapped[str] = mapped_column(String(32))
    num_examples: Mapped[int]
    estimated_tokens: Mapped[int] = mapped_column(BigInteger)
