"""Request and response bodies of `/v1/chat/completions`, `/v1/completions`, `/generate`
and `/v1/models`, in OpenAI's shapes. Requests are strict: a wrong type or an unknown field
(`logprobs`, `tools` ...) is a 400 naming it, not something silently ignored."""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

from afina.core.job_config import integer
from afina.serving.protocol import FinishReason, Usage

MAX_STOP_STRINGS = 4
Temperature = Annotated[float, Field(ge=0, le=2, description="0 is greedy decoding.")]
TopP = Annotated[float, Field(gt=0, le=1)]
MaxTokens = integer(ge=1)
Seed = integer(ge=-(2**63), le=2**64 - 1)
IGNORE_EOS = "afina's extension: generate up to the token limit past end-of-sequence."
ModelName = Annotated[str, Field(min_length=1, max_length=1024)]
MAX_TEXT = 4 * 1024 * 1024
Text = Annotated[str, Field(max_length=MAX_TEXT)]
_TEXT_SCHEMA = {"type": "string", "maxLength": MAX_TEXT}


def _one_or_list(
    item: Any, wrap: Any, one_schema: dict[str, Any], item_schema: dict[str, Any], **field: Any
) -> Any:
    """A field that takes one item or a list of `min_length`..`max_length` of them,
    validated as a list: a union would put pydantic's type tags (`stop.constrained-str`)
    into the field an error names. The schema says both forms, with the same limits."""

    def as_list(value: Any) -> Any:
        return [wrap(value)] if isinstance(value, str) else value

    array = {"type": "array", "items": item_schema}
    array |= {"minItems": field.get("min_length", 0), "maxItems": field["max_length"]}
    return Annotated[
        list[item],
        Field(**field),
        BeforeValidator(as_list),
        WithJsonSchema({"anyOf": [one_schema, array]}),
    ]


StopString = Annotated[str, Field(min_length=1, max_length=256)]
_STOP_SCHEMA = {"type": "string", "minLength": 1, "maxLength": 256}
Stop = _one_or_list(StopString, str, _STOP_SCHEMA, _STOP_SCHEMA, max_length=MAX_STOP_STRINGS)
PromptText = _one_or_list(
    Text, str, _TEXT_SCHEMA, _TEXT_SCHEMA, min_length=1, max_length=1, description="One prompt."
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class TextPart(_Strict):
    type: Literal["text"]
    text: Text


_TEXT_PART_SCHEMA = {
    "type": "object",
    "properties": {"type": {"const": "text"}, "text": _TEXT_SCHEMA},
    "required": ["type", "text"],
    "additionalProperties": False,
}
Content = _one_or_list(
    TextPart,
    lambda text: {"type": "text", "text": text},
    _TEXT_SCHEMA,
    _TEXT_PART_SCHEMA,
    min_length=1,
    max_length=256,
)


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Content
    name: str | None = None

    def text(self) -> str:
        return "".join(part.text for part in self.content)


Messages = Annotated[list[ChatMessage], Field(min_length=1, max_length=1024)]


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """What every generation endpoint takes besides the model, prompt and token limit."""

    temperature: Temperature | None = None
    top_p: TopP | None = None
    stop: Stop | None = None
    seed: Seed | None = None
    stream: bool | None = False
    ignore_eos: bool = Field(default=False, description=IGNORE_EOS)


class _OpenAISampling(_Sampling):
    stream_options: StreamOptions | None = None
    # An integer, not Literal[1]: that would take `true` for 1.
    n: integer(ge=1, le=1) | None = Field(default=None, description="Only one choice is generated.")
    user: str | None = Field(default=None, max_length=256)


class ChatCompletionRequest(_OpenAISampling):
    model: ModelName
    messages: Messages
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None


class CompletionRequest(_OpenAISampling):
    model: ModelName
    prompt: PromptText
    max_tokens: MaxTokens | None = Field(default=None, description="16 if not given, as OpenAI.")


def _exactly_one(*names: str) -> dict[str, Any]:
    """JSON Schema for: exactly one of these fields is given and not null."""
    given = [
        {"required": [name], "properties": {name: {"not": {"type": "null"}}}} for name in names
    ]
    return {"oneOf": given}


class GenerateRequest(_Sampling):
    """`POST /generate`: a fine-tuned model by name or by its job's id, and a prompt or
    chat messages."""

    model_config = ConfigDict(
        json_schema_extra={
            "allOf": [_exactly_one("model", "job_id"), _exactly_one("prompt", "messages")]
        }
    )

    model: ModelName | None = None
    job_id: ModelName | None = None
    prompt: Text | None = None
    messages: Messages | None = None
    max_new_tokens: MaxTokens | None = None


class UsageObject(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, usage: Usage) -> "UsageObject":
        return cls(**usage.as_dict())


class GenerateResponse(BaseModel):
    model: str
    text: str
    finish_reason: FinishReason
    usage: UsageObject


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageObject


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: FinishReason
    logprobs: None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageObject


class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    parent: str | None = Field(default=None, description="A fine-tuned model's base model.")


class ModelDeleted(BaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool = True


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]
