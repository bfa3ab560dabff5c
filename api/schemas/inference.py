"""Request and response bodies of `/v1/chat/completions`, `/v1/completions`, `/generate`
and `/v1/models`, in OpenAI's shapes. Requests are strict: a wrong type or an unknown field
(`logprobs`, `tools` ...) is a 400 naming it, not something silently ignored."""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

from afina.worker.inference.protocol import FinishReason, Usage

MAX_STOP_STRINGS = 4

Temperature = Annotated[float, Field(ge=0, le=2, description="0 is greedy decoding.")]
TopP = Annotated[float, Field(gt=0, le=1)]
MaxTokens = Annotated[int, Field(ge=1)]
Seed = Annotated[int, Field(ge=-(2**63), le=2**64 - 1)]
IGNORE_EOS = "afina's extension: generate up to the token limit past end-of-sequence."
ModelName = Annotated[str, Field(min_length=1, max_length=1024)]
Text = Annotated[str, Field(max_length=4 * 1024 * 1024)]


def _one_or_list(wrap: Any, item_schema: dict[str, Any]) -> tuple[Any, ...]:
    """A field that takes one item or a list of them, validated as a list: a union would
    put pydantic's type tags (`stop.constrained-str`) into the field an error names."""

    def as_list(value: Any) -> Any:
        return [wrap(value)] if isinstance(value, str) else value

    schema = {"anyOf": [{"type": "string"}, {"type": "array", "items": item_schema}]}
    return BeforeValidator(as_list), WithJsonSchema(schema)


StopString = Annotated[str, Field(min_length=1, max_length=256)]
Stop = Annotated[
    list[StopString],
    Field(max_length=MAX_STOP_STRINGS),
    *_one_or_list(str, {"type": "string", "minLength": 1, "maxLength": 256}),
]
PromptText = Annotated[
    list[Text],
    Field(min_length=1, max_length=1, description="One prompt."),
    *_one_or_list(str, {"type": "string"}),
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: Text


_TEXT_PART_SCHEMA = {
    "type": "object",
    "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
    "required": ["type", "text"],
}


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[
        list[TextPart],
        Field(min_length=1, max_length=256),
        *_one_or_list(lambda text: {"type": "text", "text": text}, _TEXT_PART_SCHEMA),
    ]
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
    n: Literal[1] | None = Field(default=None, description="Only one choice is generated.")
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


class GenerateRequest(_Sampling):
    """`POST /generate`: a fine-tuned model by name or by its job's id, and a prompt or
    chat messages."""

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


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]
