from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from afina.core.datasets import DatasetFormat
from afina.models import DATASET_PURPOSE, File


def unix_seconds(moment: datetime) -> int:
    return int(moment.timestamp())


class FileValidation(BaseModel):
    """What upload validation found; afina's extension of OpenAI's file object."""

    format: DatasetFormat
    num_examples: int
    estimated_tokens: int = Field(description="Content characters / 4: a rough planning figure.")


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["processed"] = "processed"
    status_details: None = None
    expires_at: None = None
    validation: FileValidation | None = Field(
        description="null for a job's result file (purpose fine-tune-results)."
    )

    @classmethod
    def of(cls, row: File) -> "FileObject":
        return cls(
            id=row.id,
            bytes=row.bytes,
            created_at=unix_seconds(row.created_at),
            filename=row.filename,
            purpose=row.purpose,
            validation=(
                FileValidation(
                    format=DatasetFormat(row.format),
                    num_examples=row.num_examples,
                    estimated_tokens=row.estimated_tokens,
                )
                if row.purpose == DATASET_PURPOSE
                else None
            ),
        )


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True
