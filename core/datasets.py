"""Streaming validation of JSONL fine-tuning datasets.

One JSON object per line, UTF-8, one format per file (DESIGN.md, "Datasets"):

| format            | a line                                                       |
| ----------------- | ------------------------------------------------------------ |
| chat              | {"messages": [{"role", "content", "weight"?}, ...]}          |
| prompt-completion | {"prompt": "...", "completion": "..."}                       |
| instruction       | {"instruction": "...", "input"?: "...", "output": "..."}     |
| text              | {"text": "..."}                                              |

The file is read line by line with a bound on the line length, so memory stays constant
however large the file is. Every line is checked; the first `MAX_REPORTED_ERRORS` problems
are reported with their line numbers, the rest are counted.
"""

import json
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Annotated, Any, BinaryIO

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

from afina.core.fields import field_path

MAX_REPORTED_ERRORS = 20
CHARS_PER_TOKEN = 4
_SKIP_CHUNK = 1024 * 1024


class DatasetFormat(StrEnum):
    CHAT = "chat"
    PROMPT_COMPLETION = "prompt-completion"
    INSTRUCTION = "instruction"
    TEXT = "text"


def _encodable(value: str) -> str:
    # JSON can escape half of a UTF-16 pair ("\ud800"): no character, and no tokenizer takes it.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise PydanticCustomError(
            "surrogate",
            "contains an unpaired surrogate escape {escape}",
            {"escape": f"\\u{ord(value[error.start]):04x}"},
        ) from None
    return value


def _not_blank(value: str) -> str:
    if not value.strip():
        raise PydanticCustomError("empty", "must not be empty")
    return value


Text = Annotated[str, AfterValidator(_encodable)]
NonEmptyText = Annotated[Text, AfterValidator(_not_blank)]
ROLES = ("system", "user", "assistant")


def _known_role(value: str) -> str:
    if value not in ROLES:
        raise PydanticCustomError(
            "unknown_role",
            "unknown role '{role}': expected one of system, user, assistant",
            {"role": value},
        )
    return value


def _zero_or_one(value: Any) -> int:
    # `type(...) is int` on purpose: JSON true/false and 1.0 are not weights.
    if type(value) is not int or value not in (0, 1):
        raise PydanticCustomError(
            "weight", "must be 0 or 1, got {value}", {"value": json.dumps(value)}
        )
    return value


class _Example(BaseModel):
    # strict: a number is not a string; extra keys (ids, metadata) are ignored.
    model_config = ConfigDict(strict=True, extra="ignore")

    def characters(self) -> int:
        raise NotImplementedError


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    role: Annotated[str, AfterValidator(_known_role)]
    content: NonEmptyText
    weight: Annotated[Any, AfterValidator(_zero_or_one)] = None

    @model_validator(mode="after")
    def weight_only_on_assistant(self) -> "ChatMessage":
        if "weight" in self.model_fields_set and self.role != "assistant":
            raise PydanticCustomError("weight_role", "weight is only allowed on assistant messages")
        return self


class ChatExample(_Example):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]

    @model_validator(mode="after")
    def has_trainable_assistant_turn(self) -> "ChatExample":
        assistant = [m for m in self.messages if m.role == "assistant"]
        if not assistant:
            raise PydanticCustomError("no_assistant", "a chat needs an assistant message")
        if all(m.weight == 0 for m in assistant):
            raise PydanticCustomError(
                "no_trainable_turn", "every assistant message has weight 0: nothing to learn"
            )
        return self

    def characters(self) -> int:
        return sum(len(m.content) for m in self.messages)


class PromptCompletionExample(_Example):
    prompt: NonEmptyText
    completion: NonEmptyText

    def characters(self) -> int:
        return len(self.prompt) + len(self.completion)


class InstructionExample(_Example):
    instruction: NonEmptyText
    input: Text = ""
    output: NonEmptyText

    def characters(self) -> int:
        return len(self.instruction) + len(self.input) + len(self.output)


class TextExample(_Example):
    text: NonEmptyText

    def characters(self) -> int:
        return len(self.text)


Example = ChatExample | PromptCompletionExample | InstructionExample | TextExample

EXAMPLE_MODELS: dict[DatasetFormat, type[_Example]] = {
    DatasetFormat.CHAT: ChatExample,
    DatasetFormat.PROMPT_COMPLETION: PromptCompletionExample,
    DatasetFormat.INSTRUCTION: InstructionExample,
    DatasetFormat.TEXT: TextExample,
}

# Which keys announce which format, tried in this order.
_FORMAT_KEYS: list[tuple[DatasetFormat, tuple[str, ...]]] = [
    (DatasetFormat.CHAT, ("messages",)),
    (DatasetFormat.PROMPT_COMPLETION, ("prompt", "completion")),
    (DatasetFormat.INSTRUCTION, ("instruction", "output")),
    (DatasetFormat.TEXT, ("text",)),
]


def detect_format(example: dict[str, Any]) -> DatasetFormat | None:
    for dataset_format, keys in _FORMAT_KEYS:
        if any(key in example for key in keys):
            return dataset_format
    return None


@dataclass(frozen=True)
class LineError:
    line: int | None  # None: the file as a whole
    message: str

    def __str__(self) -> str:
        return self.message if self.line is None else f"line {self.line}: {self.message}"


@dataclass
class DatasetReport:
    format: DatasetFormat | None = None
    num_examples: int = 0
    characters: int = 0
    errors: list[LineError] = field(default_factory=list)
    num_bad_lines: int = 0

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def estimated_tokens(self) -> int:
        """Rough count for planning: content characters / 4 (no tokenizer at upload)."""
        return math.ceil(self.characters / CHARS_PER_TOKEN)

    def add_error(self, line: int | None, message: str) -> None:
        if line is not None:
            self.num_bad_lines += 1
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append(LineError(line, message))

    def summary(self) -> str:
        shown = "; ".join(str(error) for error in self.errors)
        if not self.num_bad_lines:
            return shown
        hidden = self.num_bad_lines - len(self.errors)
        more = f"; and {hidden} more" if hidden > 0 else ""
        plural = "s" if self.num_bad_lines > 1 else ""
        return f"{self.num_bad_lines} bad line{plural}: {shown}{more}"


class _InvalidLine(Exception):
    pass


def _read_lines(stream: BinaryIO, max_line_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """Yield (line number, line without its newline); None for a line over the limit."""
    number = 0
    while line := stream.readline(max_line_bytes + 1):
        number += 1
        if len(line) > max_line_bytes and not line.endswith(b"\n"):
            while (rest := stream.readline(_SKIP_CHUNK)) and not rest.endswith(b"\n"):
                pass
            yield number, None
            continue
        yield number, line.rstrip(b"\r\n")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    # Python reads 1e999999 as infinity, which no JSON number is either.
    value = float(text)
    if math.isinf(value):
        shown = text if len(text) <= 24 else text[:24] + "..."
        raise ValueError(f"the number {shown} is out of range")
    return value


def json_limit_reason(error: BaseException) -> str | None:
    """What made Python's JSON parser give up on a text that may well be JSON: nesting past
    the recursion limit, or an integer past the digit limit. None for anything else."""
    if isinstance(error, RecursionError):
        return "nested too deeply"
    if isinstance(error, ValueError) and "integer string conversion" in str(error):
        return f"a number has more than {sys.get_int_max_str_digits()} digits"
    return None


def _decode(raw: bytes, first: bool) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise _InvalidLine(
            f"not valid UTF-8 (byte 0x{raw[error.start]:02x} at byte {error.start + 1})"
        ) from None
    return text.removeprefix("\ufeff") if first else text


def _parse_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite)
    except json.JSONDecodeError as error:
        raise _InvalidLine(f"invalid JSON: {error.msg} (column {error.colno})") from None
    except (RecursionError, ValueError) as error:
        raise _InvalidLine(f"invalid JSON: {json_limit_reason(error) or error}") from None
    if not isinstance(value, dict):
        raise _InvalidLine(f"expected a JSON object, got {_json_type(value)}")
    return value


def _json_type(value: Any) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _describe(error: ValidationError) -> str:
    problems = []
    for detail in error.errors(include_url=False):
        message = detail["msg"]
        if detail["type"] == "missing":
            message = "is missing"
        where = field_path(detail["loc"])
        problems.append(f"{where}: {message}" if where else message)
    return "; ".join(problems)


def _parse_lines(
    stream: BinaryIO, max_line_bytes: int
) -> Iterator[tuple[int, DatasetFormat, _Example] | tuple[int, None, _InvalidLine]]:
    """Yield (line number, format, example) for each line with content, or
    (line number, None, problem) for a bad one."""
    file_format: DatasetFormat | None = None
    format_line = 0
    for number, raw in _read_lines(stream, max_line_bytes):
        if raw is not None and not raw.strip():
            continue  # blank lines are allowed anywhere
        try:
            if raw is None:
                raise _InvalidLine(f"line is longer than {max_line_bytes} bytes")
            example = _parse_object(_decode(raw, first=number == 1))
            line_format = detect_format(example)
            if line_format is None:
                raise _InvalidLine(
                    "unknown format: expected a 'messages', 'prompt'/'completion', "
                    "'instruction'/'output' or 'text' field"
                )
            if file_format is None:
                file_format, format_line = line_format, number
            elif line_format != file_format:
                raise _InvalidLine(
                    f"mixed formats: this line is {line_format} "
                    f"but line {format_line} is {file_format}"
                )
            try:
                parsed = EXAMPLE_MODELS[line_format].model_validate(example)
            except ValidationError as error:
                raise _InvalidLine(_describe(error)) from None
        except _InvalidLine as problem:
            yield number, None, problem
            continue
        yield number, line_format, parsed


def validate_dataset(stream: BinaryIO, *, max_line_bytes: int) -> DatasetReport:
    """Check every line of a JSONL dataset read from a binary stream."""
    report = DatasetReport()
    lines_with_content = 0
    for number, line_format, result in _parse_lines(stream, max_line_bytes):
        lines_with_content += 1
        if line_format is None:
            report.add_error(number, str(result))
            continue
        report.format = line_format
        report.num_examples += 1
        report.characters += result.characters()
    if not lines_with_content:
        report.add_error(None, "the file is empty")
    return report


def read_examples(stream: BinaryIO, *, max_line_bytes: int) -> Iterator[Example]:
    """The examples of a dataset that passed `validate_dataset`, one at a time.

    Raises ValueError naming the line if the stream holds a bad line after all.
    """
    for number, line_format, result in _parse_lines(stream, max_line_bytes):
        if line_format is None:
            raise ValueError(f"line {number}: {result}")
        yield result
