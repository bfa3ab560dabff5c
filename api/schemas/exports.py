"""Merged exports of a fine-tuned model (afina's extension of the fine-tuning API)."""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from afina.api.schemas.files import unix_seconds
from afina.api.schemas.jobs import JobError
from afina.core.job_config import integer
from afina.models import ExportStatus, JobExport

# The largest step a checkpoint name can carry (`ftjob-...:ckpt-step-N`, nine digits).
MAX_STEP = 999_999_999
GGUF_REFUSED = (
    "format 'gguf' is not offered: no maintained converter from Hugging Face weights to GGUF "
    "installs from the package registries; export 'merged' and convert that folder with "
    "llama.cpp's convert_hf_to_gguf.py"
)


class ExportCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    format: Literal["merged"] = Field(
        description="`merged`: the adapter merged into its base model, as safetensors."
    )
    dtype: Literal["bfloat16", "float16", "float32"] = Field(
        default="bfloat16", description="The dtype the base is loaded, merged and saved in."
    )
    checkpoint: integer(ge=1, le=MAX_STEP) | None = Field(  # type: ignore[valid-type]
        default=None,
        description="The step of a checkpoint to export; the final model when left out.",
    )

    @field_validator("format", mode="before")
    @classmethod
    def gguf_says_why(cls, value: Any) -> Any:
        if value == "gguf":
            raise ValueError(GGUF_REFUSED)
        return value


class ExportObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job.export"] = "fine_tuning.job.export"
    job_id: str
    created_at: int
    finished_at: int | None
    status: ExportStatus
    format: str
    dtype: str
    checkpoint: int | None = Field(description="The checkpoint's step; null: the final model.")
    bytes: int | None = Field(description="The size of the archive, once it is written.")
    error: JobError | None

    @classmethod
    def of(cls, row: JobExport) -> "ExportObject":
        return cls(
            id=row.id,
            job_id=row.job_id,
            created_at=unix_seconds(row.created_at),
            finished_at=unix_seconds(row.finished_at) if row.finished_at else None,
            status=row.status,
            format=row.format,
            dtype=row.dtype,
            checkpoint=row.checkpoint_step,
            bytes=row.bytes,
            error=JobError.model_validate(row.error) if row.error else None,
        )
