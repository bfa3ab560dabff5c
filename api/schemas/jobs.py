"""Fine-tuning job objects in OpenAI's shapes, with afina's `progress` and `config`."""

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, model_validator

from afina.api.schemas.files import unix_seconds
from afina.core.ids import checkpoint_name
from afina.core.job_config import (
    SUFFIX_PATTERN,
    ConfigRequest,
    JobConfig,
    MethodType,
    ResolvedHyperparameters,
    field_error,
    integer,
)
from afina.models import Job, JobCheckpoint, JobEvent, JobMetric, JobStatus

MetadataKey = Annotated[str, Field(min_length=1, max_length=64)]
MetadataValue = Annotated[str, Field(max_length=512)]
TRUST_REMOTE_CODE = "trust_remote_code"


def _location_of(key: str, body: Any) -> tuple[str | int, ...] | None:
    """Where `key` is a key anywhere in a JSON body but in `metadata` (free-form labels),
    looked for without recursion: the body may be nested as deep as the parser allowed."""
    stack: list[tuple[tuple[str | int, ...], Any]] = [((), body)]
    while stack:
        location, value = stack.pop()
        if isinstance(value, dict):
            if key in value:
                return (*location, key)
            items = [(name, item) for name, item in value.items() if location or name != "metadata"]
            stack.extend(((*location, name), item) for name, item in items)
        elif isinstance(value, list):
            stack.extend(((*location, index), item) for index, item in enumerate(value))
    return None


class JobCreate(ConfigRequest):
    """The body of `POST /v1/fine_tuning/jobs`: OpenAI's fields plus afina's `lora`,
    `quantization`, `training`, `evaluation` and `resources` sections (sent by the openai
    client as `extra_body`)."""

    model: str = Field(min_length=1, max_length=512, description="Hub id or absolute path.")
    training_file: str = Field(min_length=1, max_length=64)
    validation_file: str | None = Field(default=None, min_length=1, max_length=64)
    suffix: str | None = Field(default=None, pattern=SUFFIX_PATTERN)
    seed: integer(ge=0, le=2**31 - 1) | None = None
    metadata: dict[MetadataKey, MetadataValue] | None = Field(default=None, max_length=16)
    integrations: list[Any] | None = Field(
        default=None, max_length=0, description="Not supported; only an empty list is taken."
    )

    @model_validator(mode="before")
    @classmethod
    def no_trust_remote_code(cls, body: Any) -> Any:
        """A model's own code runs only if the operator allows it: a request cannot, however
        deep it puts the flag (it would be an unknown field anyway; this says why)."""
        location = _location_of(TRUST_REMOTE_CODE, body)
        if location is not None:
            raise field_error(
                location,
                "cannot be set in a request: only the operator lets models run their own "
                "code (AFINA_TRUST_REMOTE_CODE)",
                None,
                kind="forbidden",
            )
        return body


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class Progress(BaseModel):
    steps_done: int
    total_steps: int | None
    epoch: float | None
    estimated_finish: int | None


class MethodHyperparameters(BaseModel):
    hyperparameters: ResolvedHyperparameters


class MethodObject(BaseModel):
    """OpenAI's `method`: the section its type names holds the hyperparameters."""

    type: MethodType
    supervised: MethodHyperparameters | None = None
    dpo: MethodHyperparameters | None = None

    @classmethod
    def of(cls, config: JobConfig) -> "MethodObject":
        section = MethodHyperparameters(hyperparameters=config.hyperparameters)
        return cls.model_validate({"type": config.method, config.method: section})


def _seconds(moment: datetime | None) -> int | None:
    return None if moment is None else unix_seconds(moment)


class JobObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    finished_at: int | None
    estimated_finish: int | None
    status: JobStatus = Field(
        description="Never `validating_files` (OpenAI's): afina checks files at upload."
    )
    model: str = Field(description="The base model (of the fine-tuned model it continues).")
    fine_tuned_model: str | None
    continued_from: str | None = Field(
        description="The fine-tuned model or checkpoint this job trains further, as the "
        "request named it."
    )
    organization_id: str = Field(description="The project that owns the job.")
    training_file: str
    validation_file: str | None
    hyperparameters: ResolvedHyperparameters
    method: MethodObject
    seed: int
    suffix: str | None
    user_provided_suffix: str | None
    metadata: dict[str, str] | None
    trained_tokens: int | None
    error: JobError | None
    result_files: list[str] = Field(
        description="Files (purpose fine-tune-results) written when the job succeeded: the "
        "step metrics as CSV and, after an evaluation, the generations as JSON lines."
    )
    integrations: list[Any] | None = None
    pause_requested: bool = Field(
        description="A pause was asked for: the running job pauses at its next step."
    )
    model_deleted_at: int | None = Field(
        description="When the fine-tuned model was deleted (DELETE /v1/models/{model}): its "
        "adapter, checkpoints and exports are gone."
    )
    progress: Progress
    config: JobConfig
    queue: str = Field(
        description="The training queue (worker class) the job was sent to: resources.queue, "
        "or the smallest worker class that fits it, or train."
    )

    @classmethod
    def of(cls, row: Job) -> "JobObject":
        config = JobConfig.model_validate(row.config)
        return cls(
            id=row.id,
            created_at=unix_seconds(row.created_at),
            finished_at=_seconds(row.finished_at),
            estimated_finish=_seconds(row.estimated_finish),
            status=row.status,
            model=row.model,
            fine_tuned_model=row.fine_tuned_model,
            continued_from=row.parent_model,
            organization_id=row.project,
            training_file=row.training_file_id,
            validation_file=row.validation_file_id,
            hyperparameters=config.hyperparameters,
            method=MethodObject.of(config),
            seed=row.seed,
            suffix=row.suffix,
            user_provided_suffix=row.suffix,
            metadata=row.user_metadata,
            trained_tokens=row.trained_tokens,
            result_files=row.result_files or [],
            error=JobError.model_validate(row.error) if row.error else None,
            pause_requested=row.status == JobStatus.RUNNING and row.pause_requested_at is not None,
            model_deleted_at=_seconds(row.model_deleted_at),
            progress=Progress(
                steps_done=row.steps_done,
                total_steps=row.total_steps,
                epoch=row.epoch,
                estimated_finish=_seconds(row.estimated_finish),
            ),
            config=config,
            queue=row.queue,
        )


class EventObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: str
    message: str
    type: str
    data: dict[str, Any] | None

    @classmethod
    def of(cls, row: JobEvent) -> "EventObject":
        return cls(
            id=row.id,
            created_at=unix_seconds(row.created_at),
            level=row.level,
            message=row.message,
            type=row.type,
            data=row.data,
        )


class CheckpointObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuning_job_id: str
    fine_tuned_model_checkpoint: str
    step_number: int
    metrics: dict[str, float | None]

    @classmethod
    def of(cls, row: JobCheckpoint) -> "CheckpointObject":
        return cls(
            id=row.id,
            created_at=unix_seconds(row.created_at),
            fine_tuning_job_id=row.job_id,
            fine_tuned_model_checkpoint=checkpoint_name(row.job_id, row.step),
            step_number=row.step,
            metrics=row.metrics,
        )


class MetricPoint(BaseModel):
    """One logging step. A point written by an evaluation has the `eval_` values; DPO's
    `rewards_*` are trl's `rewards/*` (chosen, rejected, accuracies, margins)."""

    step: int
    epoch: float | None
    loss: float | None
    eval_loss: float | None
    learning_rate: float | None
    grad_norm: float | None
    tokens_per_second: float | None
    mean_token_accuracy: float | None = Field(
        description="The share of the answer tokens the model predicted right."
    )
    eval_mean_token_accuracy: float | None
    rewards_chosen: float | None = Field(
        description="dpo: the mean implicit reward (beta x log-ratio to the reference) of the "
        "preferred answers."
    )
    rewards_rejected: float | None = Field(description="dpo: the same for the other answers.")
    rewards_accuracies: float | None = Field(
        description="dpo: the share of pairs whose preferred answer has the higher reward."
    )
    rewards_margins: float | None = Field(description="dpo: the mean reward margin.")
    eval_rewards_accuracies: float | None
    at: float = Field(description="Unix time in seconds, with fractions.")

    @classmethod
    def of(cls, row: JobMetric) -> "MetricPoint":
        values = {name: getattr(row, name) for name in cls.model_fields if name != "at"}
        return cls(**values, at=row.at.timestamp())


class MetricSeries(BaseModel):
    object: Literal["list"] = "list"
    job_id: str
    data: list[MetricPoint]
    has_more: Literal[False] = False
