"""What a fine-tuning job may ask for, and the resolved configuration the trainer runs.

The request follows OpenAI's body (`method.supervised.hyperparameters` or
`method.dpo.hyperparameters`, or the legacy top-level `hyperparameters`) plus afina's `lora`,
`quantization`, `training`, `evaluation` and `resources` sections.
Every knob has a type and a range, and an unknown key is refused by name. `resolve_config`
turns a request into the `JobConfig` stored on the job: every "auto" and every default
replaced by the value the run will use, so the job object shows exactly what trains.
"""

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WithJsonSchema,
    WrapValidator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

# QLoRA recipe defaults (Dettmers et al. 2023, and the peft/trl examples that follow it).
BASE_LEARNING_RATE = 2e-4
DEFAULT_EPOCHS = 3
DEFAULT_BATCH_SIZE = 4
DEFAULT_MAX_SEQ_LENGTH = 2048
DEFAULT_BETA = 0.1  # DPO's (Rafailov et al. 2023), and trl's and OpenAI's
SUFFIX_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
# A Celery queue's name: what workers take (AFINA_WORKER_QUEUES) and `resources.queue` names.
QUEUE_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"


def _whole_number(value: Any) -> Any:
    # JSON has one number type, and JSON Schema's `integer` takes 3.0: so does afina. A
    # fraction, a boolean or a string is still not an integer.
    return int(value) if type(value) is float and value.is_integer() else value


def integer(**limits: int) -> Any:
    """What a request takes for an integer: a JSON number with no fraction, within `limits`
    (`ge`, `le`). The limits come first so that the JSON Schema says them too."""
    return Annotated[int, Field(**limits), BeforeValidator(_whole_number)]


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
        integer(**limits) if kind is int else Annotated[kind, Field(**limits)],
        *_or_keyword("auto"),
        WithJsonSchema({"anyOf": [{"const": "auto"}, schema]}),
    ]


AutoEpochs = _auto_or(int, "integer", ge=1, le=100)
AutoBatchSize = _auto_or(int, "integer", ge=1, le=1024)
AutoMultiplier = _auto_or(float, "number", gt=0, le=100)
AutoBeta = _auto_or(float, "number", gt=0, le=100)
Steps = integer(ge=1, le=10_000_000)
# ASCII on purpose: Python's `\w` takes any letter, JSON Schema's (ECMA's) only ASCII ones.
MODULE_PATTERN = r"^[A-Za-z0-9_.]{1,128}$"
MAX_TARGET_MODULES = 256
TargetModules = Annotated[
    list[Annotated[str, Field(pattern=MODULE_PATTERN)]],
    Field(min_length=1, max_length=MAX_TARGET_MODULES),
    *_or_keyword("all-linear"),
    WithJsonSchema(
        {
            "anyOf": [
                {"const": "all-linear"},
                {
                    "type": "array",
                    "items": {"type": "string", "pattern": MODULE_PATTERN},
                    "minItems": 1,
                    "maxItems": MAX_TARGET_MODULES,
                },
            ]
        }
    ),
]
AutoBool = Annotated[
    bool,
    *_or_keyword("auto"),
    WithJsonSchema({"anyOf": [{"const": "auto"}, {"type": "boolean"}]}),
]
LrScheduler = Literal[
    "constant_with_warmup", "constant", "linear", "cosine", "cosine_with_restarts", "polynomial"
]


class _Strict(BaseModel):
    # strict: `true` is not a seed nor "3" an epoch count; JSON ints still pass as floats,
    # and NaN or Infinity (which Python's JSON parser takes) is no number at all.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class Hyperparameters(_Strict):
    """OpenAI's hyperparameters; "auto" lets afina pick from the dataset size."""

    n_epochs: AutoEpochs = "auto"
    batch_size: AutoBatchSize = "auto"
    learning_rate_multiplier: AutoMultiplier = "auto"


class Supervised(_Strict):
    hyperparameters: Hyperparameters = Hyperparameters()


class DpoHyperparameters(Hyperparameters):
    beta: AutoBeta = Field(
        default="auto",
        description="How far the policy may move from the reference: lower lets it move "
        "further. auto: 0.1.",
    )


class Dpo(_Strict):
    hyperparameters: DpoHyperparameters = DpoHyperparameters()


MethodType = Literal["supervised", "dpo"]


def _section_goes_with_its_type(section: str, default: bool) -> dict[str, Any]:
    """JSON Schema for: `section` is absent, or `type` names it (or is absent, for the
    default method)."""
    named = {"properties": {"type": {"const": section}}}
    return {
        "anyOf": [
            {"not": {"required": [section]}},
            named if default else {**named, "required": ["type"]},
        ]
    }


class Method(_Strict):
    """OpenAI's `method`: the section named by `type` holds the hyperparameters; the other
    section may not be given."""

    model_config = ConfigDict(
        json_schema_extra={
            "allOf": [
                _section_goes_with_its_type("supervised", default=True),
                _section_goes_with_its_type("dpo", default=False),
            ]
        }
    )

    type: MethodType = "supervised"
    supervised: Supervised = Supervised()
    dpo: Dpo = Dpo()

    @model_validator(mode="after")
    def only_the_chosen_section(self) -> "Method":
        for section in ("supervised", "dpo"):
            if section in self.model_fields_set and section != self.type:
                raise field_error(
                    (section,),
                    f"method.{section} goes with method.type {section!r}, not {self.type!r}",
                    getattr(self, section).model_dump(),
                )
        return self

    @property
    def hyperparameters(self) -> Hyperparameters:
        return self.dpo.hyperparameters if self.type == "dpo" else self.supervised.hyperparameters


class LoraSettings(_Strict):
    r: integer(ge=1, le=1024) = 16
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
    max_seq_length: integer(ge=16, le=1_048_576) | None = Field(
        default=None, description="Default: 2048, or the model's limit if lower."
    )
    packing: bool = False
    gradient_accumulation_steps: integer(ge=1, le=1024) = 1
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.03
    lr_scheduler: LrScheduler = "constant_with_warmup"
    weight_decay: Annotated[float, Field(ge=0, le=1)] = 0.0
    max_grad_norm: Annotated[float, Field(gt=0, le=1000)] = 0.3
    gradient_checkpointing: AutoBool = Field(
        default="auto",
        description="auto: on only when the run's activations would not fit in the device's "
        "memory without it; the worker decides when the run starts.",
    )
    padding_free: bool = Field(
        default=True,
        description="Put each batch's examples end to end in one row: no padding is computed, "
        "and attention stays inside each example.",
    )
    attention: Literal["auto", "flash_attention_2", "sdpa", "eager"] = Field(
        default="auto",
        description="auto: flash-attention 2 where an installed build supports the GPU, else "
        "SDPA (split per example when padding_free).",
    )
    liger_kernels: AutoBool = Field(
        default="auto",
        description="auto: Liger's fused kernels (linear cross-entropy, RMSNorm, RoPE, SwiGLU) "
        "on a GPU, for the architectures the installed liger-kernel supports.",
    )
    eval_steps: Steps | None = Field(
        default=None, description="Default: about 10 evaluations over the run."
    )
    save_steps: Steps | None = Field(
        default=None, description="Default: a checkpoint every quarter of the run."
    )
    loss_on: Literal["completion", "all"] = Field(
        default="completion",
        description="completion: only assistant turns / completions / outputs carry loss.",
    )
    max_steps: Steps | None = None


class EvaluationSettings(_Strict):
    """What a job with a validation file does at its end, besides its last evaluation."""

    samples: integer(ge=0, le=256) = Field(
        default=16,
        description="Validation prompts answered by the fine-tuned and the base model, "
        "greedily, for the generations result file; 0: none.",
    )
    max_new_tokens: integer(ge=1, le=4096) = Field(
        default=256, description="The longest answer generated for each prompt."
    )


MAX_GPUS = 64


class ResourceSettings(_Strict):
    """What the job runs on: which workers may take it, and how many GPUs of its node. The
    queue chosen is stored on the job (`Job.queue`), not in the resolved config."""

    gpus: integer(ge=1, le=MAX_GPUS) = Field(  # type: ignore[valid-type]
        default=1,
        description="GPUs of one node the job trains on, with distributed data parallel "
        "(one rank a GPU, each with `batch_size` examples a step); a live worker must have "
        "that many.",
    )

    queue: Annotated[str, Field(pattern=QUEUE_PATTERN)] | None = Field(
        default=None,
        description="The training queue (a worker class, e.g. train-80g) to send the job "
        "to; a live worker must take it (with none registered, only the default queue, "
        "train). Default: the queue of the smallest worker class that fits the job, or "
        "train when that cannot be checked.",
    )


class ResolvedHyperparameters(_Strict):
    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float
    beta: float | None = Field(
        default=None, description="dpo only.", exclude_if=lambda beta: beta is None
    )


class ResolvedTraining(TrainingSettings):
    learning_rate: float
    max_seq_length: int | None = Field(
        description="null until the worker has read a hub model's limit."
    )


class ResolvedResources(_Strict):
    """What the run takes of its worker's node."""

    gpus: int = Field(
        default=1,
        description="Processes the run trains on (distributed data parallel), one a GPU: "
        "the node's GPUs, or CPU processes on a node without any.",
    )


class JobConfig(_Strict):
    """Everything the trainer needs besides the model and the files: stored on the job."""

    method: MethodType = "supervised"
    hyperparameters: ResolvedHyperparameters
    lora: LoraSettings
    quantization: QuantizationSettings
    training: ResolvedTraining
    evaluation: EvaluationSettings = EvaluationSettings()
    resources: ResolvedResources = ResolvedResources()


DPO_REFUSED = {
    "packing": "trains on pairs of answers to one prompt, which packing would run together",
    "padding_free": "runs padded batches (trl's DPOTrainer has no padding-free path)",
    "liger_kernels": "runs without Liger's kernels (afina uses them for SFT only)",
}


def _given(*path: str, json_type: str = "object") -> dict[str, Any]:
    """JSON Schema for: the value at `path` is given, not null, and of this JSON type."""
    schema: dict[str, Any] = {"type": json_type}
    for key in reversed(path):
        schema = {"type": "object", "required": [key], "properties": {key: schema}}
    return schema


def field_error(
    location: tuple[str | int, ...], message: str, value: Any, kind: str = "conflict"
) -> ValidationError:
    """A validation error naming the field at `location`, for a rule a field's own type
    cannot check (one across fields, say)."""
    error = PydanticCustomError(kind, message)
    return ValidationError.from_exception_data(
        "ConfigRequest", [InitErrorDetails(type=error, loc=location, input=value)]
    )


# The two rules `one_place_for_hyperparameters` checks, for the schema to say too.
_MULTIPLIER = "learning_rate_multiplier"
_CONFLICTS = {
    "allOf": [
        {
            "not": {
                "allOf": [
                    _given("method", "type", json_type="string"),
                    {"properties": {"method": {"properties": {"type": {"const": "dpo"}}}}},
                    {
                        "anyOf": [
                            {
                                "required": ["training"],
                                "properties": {
                                    "training": {
                                        "required": [name],
                                        "properties": {name: {"const": True}},
                                    }
                                },
                            }
                            for name in DPO_REFUSED
                        ]
                    },
                ]
            }
        },
        {"not": {"allOf": [_given("method"), _given("hyperparameters")]}},
        {
            "not": {
                "allOf": [
                    _given("training", "learning_rate", json_type="number"),
                    {
                        "anyOf": [
                            *(
                                _given(
                                    "method",
                                    section,
                                    "hyperparameters",
                                    _MULTIPLIER,
                                    json_type="number",
                                )
                                for section in ("supervised", "dpo")
                            ),
                            _given("hyperparameters", _MULTIPLIER, json_type="number"),
                        ]
                    },
                ]
            }
        },
    ]
}


class ConfigRequest(_Strict):
    """The tunable part of a job-creation body."""

    model_config = ConfigDict(json_schema_extra=_CONFLICTS)

    method: Method | None = None
    hyperparameters: Hyperparameters | None = Field(
        default=None, description="Legacy form of method.supervised.hyperparameters."
    )
    lora: LoraSettings = LoraSettings()
    quantization: QuantizationSettings = QuantizationSettings()
    training: TrainingSettings = TrainingSettings()
    evaluation: EvaluationSettings = EvaluationSettings()
    resources: ResourceSettings = ResourceSettings()

    @model_validator(mode="after")
    def one_place_for_hyperparameters(self) -> "ConfigRequest":
        if self.method is not None and self.hyperparameters is not None:
            raise field_error(
                ("hyperparameters",),
                "give hyperparameters in method (method.supervised.hyperparameters or "
                "method.dpo.hyperparameters) or in the legacy top-level hyperparameters, not "
                "both",
                self.hyperparameters.model_dump(),
            )
        given = self.chosen_hyperparameters()
        learning_rate = self.training.learning_rate
        if learning_rate is not None and given.learning_rate_multiplier != "auto":
            raise field_error(
                ("training", "learning_rate"),
                "give training.learning_rate or learning_rate_multiplier, not both",
                learning_rate,
            )
        if self.method_type == "dpo":
            self._check_dpo_training()
        return self

    def _check_dpo_training(self) -> None:
        """What trl's DPOTrainer does not do, refused by name when asked for."""
        asked = self.training.model_fields_set
        for name, why in DPO_REFUSED.items():
            if name in asked and getattr(self.training, name) is True:
                raise field_error(("training", name), f"method 'dpo' {why}: leave it off", True)

    @property
    def method_type(self) -> MethodType:
        return "supervised" if self.method is None else self.method.type

    def chosen_hyperparameters(self) -> Hyperparameters:
        if self.method is not None:
            return self.method.hyperparameters
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
        beta=_beta(chosen) if request.method_type == "dpo" else None,
    )
    training = ResolvedTraining(
        **request.training.model_dump(exclude={"learning_rate", "max_seq_length"}),
        learning_rate=learning_rate,
        max_seq_length=request.training.max_seq_length,
    )
    if request.method_type == "dpo":
        training = training.model_copy(update=dict.fromkeys(DPO_REFUSED, False))
    config = JobConfig(
        method=request.method_type,
        hyperparameters=hyperparameters,
        lora=request.lora,
        quantization=request.quantization,
        training=training,
        evaluation=request.evaluation,
        resources=ResolvedResources(gpus=request.resources.gpus),
    )
    return fit_to_model(config, model_max_length) if model_max_length else config


def _beta(chosen: Hyperparameters) -> float:
    if isinstance(chosen, DpoHyperparameters) and chosen.beta != "auto":
        return chosen.beta
    return DEFAULT_BETA


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
