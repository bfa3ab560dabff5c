"""What a fine-tuning job may ask for, and the resolved configuration the trainer runs.

The request follows OpenAI's body (`method.supervised.hyperparameters`, or the legacy
top-level `hyperparameters`) plus afina's `lora`, `quantization` and `training` sections.
Every knob has a type and a range, and an unknown key is refused by name. `resolve_config`
turns a request into the `JobConfig` stored on the job: every "auto" and every default
replaced by the value the run will use, so the job object shows exactly what trains.
"""

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidatorFunctionWrapHandler,
    WithJsonSchema,
    WrapValidator,
    model_validator,
)

# QLoRA recipe defaults (Dettmers et al. 2023, and the peft/trl examples that follow it).
BASE_LEARNING_RATE = 2e-4
DEFAULT_EPOCHS = 3
DEFAULT_BATCH_SIZE = 4
DEFAULT_MAX_SEQ_LENGTH = 2048
SUFFIX_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"


def _or_keyword(keyword: str) -> tuple[WrapValidator, PlainSerializer]:
    """Let `keyword` through and validate anything else as the annotated type. Unlike a
    Union, an error then names the field alone, not the union member that failed."""

    def validate(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        return value if value == keyword else handler(value)

    return WrapValidator(validate), PlainSerializer(lambda value: value)


def _auto_or(kind: type, json_type: str, **limits: float) -> Any:
    bounds = {"ge": "minimum", "gt": "exclusiveMinimum", "le": "maximum"}
    schema = {"type": json_type, **{bounds[name]: value for name, value in limits.items()}}
    return Annotated[
        kind,
        Field(**limits),
        *_or_keyword("auto"),
        WithJsonSchema({"anyOf": [{"const": "auto"}, schema]}),
    ]


AutoEpochs = _auto_or(int, "integer", ge=1, le=100)
AutoBatchSize = _auto_or(int, "integer", ge=1, le=1024)
AutoMultiplier = _auto_or(float, "number", gt=0, le=100)
ModuleName = Annotated[str, Field(pattern=r"^[\w.]{1,128}$")]
TargetModules = Annotated[
    list[ModuleName],
    Field(min_length=1),
    *_or_keyword("all-linear"),
    WithJsonSchema(
        {
            "anyOf": [
                {"const": "all-linear"},
                {"type": "array", "items": {"type": "string"}, "minItems": 1},
            ]
        }
    ),
]
LrScheduler = Literal[
    "constant_with_warmup", "constant", "linear", "cosine", "cosine_with_restarts", "polynomial"
]


class _Strict(BaseModel):
    # strict: `true` is not a seed nor "3" an epoch count; JSON ints still pass as floats.
    model_config = ConfigDict(extra="forbid", strict=True)


class Hyperparameters(_Strict):
    """OpenAI's hyperparameters; "auto" lets afina pick from the dataset size."""

    n_epochs: AutoEpochs = "auto"
    batch_size: AutoBatchSize = "auto"
    learning_rate_multiplier: AutoMultiplier = "auto"


class Supervised(_Strict):
    hyperparameters: Hyperparameters = Hyperparameters()


class Method(_Strict):
    type: Literal["supervised"] = "supervised"
    supervised: Supervised = Supervised()


class LoraSettings(_Strict):
    r: Annotated[int, Field(ge=1, le=1024)] = 16
    alpha: Annotated[float, Field(gt=0, le=100_000)] = 32
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.05
    target_modules: TargetModules = "all-linear"


class QuantizationSettings(_Strict):
    """bitsandbytes quantization of the frozen base model; `bits: null` is plain LoRA."""

    bits: Literal[4, 8] | None = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto", description="auto: bfloat16 on GPUs that support it, float32 on CPU."
    )


class TrainingSettings(_Strict):
    learning_rate: Annotated[float, Field(gt=0, le=1)] | None = Field(
        default=None, description="Overrides 2e-4 x learning_rate_multiplier."
    )
    max_seq_length: Annotated[int, Field(ge=16, le=1_048_576)] | None = Field(
        default=None, description="Default: 2048, or the model's limit if lower."
    )
    packing: bool = False
    gradient_accumulation_steps: Annotated[int, Field(ge=1, le=1024)] = 1
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.03
    lr_scheduler: LrScheduler = "constant_with_warmup"
    weight_decay: Annotated[float, Field(ge=0, le=1)] = 0.0
    max_grad_norm: Annotated[float, Field(gt=0, le=1000)] = 0.3
    gradient_checkpointing: bool = True
    eval_steps: Annotated[int, Field(ge=1, le=10_000_000)] | None = Field(
        default=None, description="Default: about 10 evaluations over the run."
    )
    save_steps: Annotated[int, Field(ge=1, le=10_000_000)] | None = Field(
        default=None, description="Default: a checkpoint every quarter of the run."
    )
    loss_on: Literal["completion", "all"] = Field(
        default="completion",
        description="completion: only assistant turns / completions / outputs carry loss.",
    )
    max_steps: Annotated[int, Field(ge=1, le=10_000_000)] | None = None


class ResolvedHyperparameters(_Strict):
    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float


class ResolvedTraining(TrainingSettings):
    learning_rate: float
    max_seq_length: int | None = Field(
        description="null until the worker has read a hub model's limit."
    )


class JobConfig(_Strict):
    """Everything the trainer needs besides the model and the files: stored on the job."""

    hyperparameters: ResolvedHyperparameters
    lora: LoraSettings
    quantization: QuantizationSettings
    training: ResolvedTraining


class ConfigRequest(_Strict):
    """The tunable part of a job-creation body."""

    method: Method | None = None
    hyperparameters: Hyperparameters | None = Field(
        default=None, description="Legacy form of method.supervised.hyperparameters."
    )
    lora: LoraSettings = LoraSettings()
    quantization: QuantizationSettings = QuantizationSettings()
    training: TrainingSettings = TrainingSettings()

    @model_validator(mode="after")
    def one_place_for_hyperparameters(self) -> "ConfigRequest":
        if self.method is not None and self.hyperparameters is not None:
            raise ValueError(
                "give hyperparameters in method.supervised.hyperparameters or in the legacy "
                "top-level hyperparameters, not both"
            )
        given = self.chosen_hyperparameters()
        if self.training.learning_rate is not None and given.learning_rate_multiplier != "auto":
            raise ValueError("give training.learning_rate or learning_rate_multiplier, not both")
        return self

    def chosen_hyperparameters(self) -> Hyperparameters:
        if self.method is not None:
            return self.method.supervised.hyperparameters
        return self.hyperparameters or Hyperparameters()


def resolve_config(
    request: ConfigRequest, *, num_examples: int, model_max_length: int | None
) -> JobConfig:
    """Fill in every "auto" and default. `model_max_length` is None when the model's limit is
    not known yet (a hub id); the worker then resolves `max_seq_length` with `fit_to_model`."""
    chosen = request.chosen_hyperparameters()
    multiplier = (
        1.0 if chosen.learning_rate_multiplier == "auto" else chosen.learning_rate_multiplier
    )
    learning_rate = request.training.learning_rate or BASE_LEARNING_RATE * multiplier
    if request.training.learning_rate is not None:
        multiplier = request.training.learning_rate / BASE_LEARNING_RATE
    hyperparameters = ResolvedHyperparameters(
        n_epochs=DEFAULT_EPOCHS if chosen.n_epochs == "auto" else chosen.n_epochs,
        batch_size=(
            min(DEFAULT_BATCH_SIZE, max(1, num_examples))
            if chosen.batch_size == "auto"
            else chosen.batch_size
        ),
        learning_rate_multiplier=multiplier,
    )
    training = ResolvedTraining(
        **request.training.model_dump(exclude={"learning_rate", "max_seq_length"}),
        learning_rate=learning_rate,
        max_seq_length=request.training.max_seq_length,
    )
    config = JobConfig(
        hyperparameters=hyperparameters,
        lora=request.lora,
        quantization=request.quantization,
        training=training,
    )
    return fit_to_model(config, model_max_length) if model_max_length else config


def fit_to_model(config: JobConfig, model_max_length: int) -> JobConfig:
    """`max_seq_length` checked against, or defaulted from, the model's context length.

    Raises ValueError when the request asks for more than the model takes."""
    asked = config.training.max_seq_length
    if asked is not None and asked > model_max_length:
        raise ValueError(
            f"max_seq_length {asked} is over the model's limit of {model_max_length} tokens"
        )
    length = asked or min(DEFAULT_MAX_SEQ_LENGTH, model_max_length)
    return config.model_copy(
        update={"training": config.training.model_copy(update={"max_seq_length": length})}
    )
