"""Streaming validation of JSONL fine-tuning datasets.

One JSON object per line, UTF-8, one format per file (DESIGN.md, "Datasets"):

| format            | a line                                                       |
| ----------------- | ------------------------------------------------------------ |
| chat              | {"messages": [{"role", "content", "weight"?}, ...]}          |
| prompt-completion | {"prompt": "...", "completion": "..."}                       |
| instruction       | {"instruction": "...", "input"?: "...", "output": "..."}     |
| text              | {"text": "..."}                                              |
| preference        | {"input": {"messages": [...]}, "preferred_output": [...],    |
|                   |  "non_preferred_output": [...]} (OpenAI's, for DPO)          |

The file is read a block at a time with a bound on the line length, so memory stays constant
however large the file is. Every line is checked; the first `MAX_REPORTED_ERRORS` problems
are reported with their line numbers, the rest are counted.

Two checkers give the same verdict on every line of the four SFT formats (a preference file
has the detailed one alone). The fast one is pydantic-core's JSON
validator with one schema per format (no Python object but the fields it keeps, no Python
call but for chat's rules on assistant turns); it only ever accepts. A line it does not
accept goes to the detailed one (Python's JSON parser, then the pydantic models below), which
decides and words the error. tests/unit/test_datasets.py holds them to the same verdicts.
"""

import json
import math
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Annotated, Any, BinaryIO, Literal, NotRequired

from annotated_types import Ge, Le
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    model_validator,
    with_config,
)
from pydantic_core import PydanticCustomError
from typing_extensions import TypedDict  # pydantic takes typing's only from Python 3.12

from afina.core.fields import SHOWN_CHARS, field_path, shown

MAX_REPORTED_ERRORS = 20
CHARS_PER_TOKEN = 4
BLOCK_BYTES = 1024 * 1024
# A character that is neither whitespace nor a control character: text without one is empty.
# The same pattern for Python's `re` and for pydantic-core's Rust regex (the fast checker).
VISIBLE = r"[^\s\x00-\x1f\x7f-\x9f]"
_VISIBLE = re.compile(VISIBLE)


class DatasetFormat(StrEnum):
    CHAT = "chat"
    PROMPT_COMPLETION = "prompt-completion"
    INSTRUCTION = "instruction"
    TEXT = "text"
    PREFERENCE = "preference"


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
    if _VISIBLE.search(value) is None:
        if value.strip():  # NUL, escape sequences...: nothing a model could learn or show
            raise PydanticCustomError(
                "empty", "must not be empty: it has only control characters and whitespace"
            )
        raise PydanticCustomError("empty", "must not be empty")
    return value


Text = Annotated[str, AfterValidator(_encodable)]
NonEmptyText = Annotated[Text, AfterValidator(_not_blank)]
ROLES = ("system", "user", "assistant")


def _known_role(value: str) -> str:
    if value not in ROLES:
        raise PydanticCustomError(
            "unknown_role",
            "unknown role {role}: expected one of system, user, assistant",
            {"role": shown(value)},
        )
    return value


def _zero_or_one(value: Any) -> int:
    # `type(...) is int` on purpose: JSON true/false and 1.0 are not weights.
    if type(value) is not int or value not in (0, 1):
        text = json.dumps(value)
        shown_text = text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "..."
        raise PydanticCustomError("weight", "must be 0 or 1, got {value}", {"value": shown_text})
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


class PreferenceInput(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    messages: Annotated[list[ChatMessage], Field(min_length=1)]

    @model_validator(mode="after")
    def ends_with_a_user_turn(self) -> "PreferenceInput":
        if self.messages[-1].role != "user":
            raise PydanticCustomError(
                "last_turn", "must end with a user message: the outputs are answers to it"
            )
        return self


def _assistant_only(messages: list[ChatMessage]) -> list[ChatMessage]:
    for message in messages:
        if message.role != "assistant":
            raise PydanticCustomError(
                "output_role",
                "an output is the assistant's answer: role must be assistant, got {role}",
                {"role": shown(message.role)},
            )
    return messages


Output = Annotated[list[ChatMessage], Field(min_length=1), AfterValidator(_assistant_only)]


class PreferenceExample(_Example):
    """OpenAI's preference line: a conversation ending with a user turn, and two answers to
    it, the one to prefer and the other."""

    input: PreferenceInput
    preferred_output: Output
    non_preferred_output: Output

    @model_validator(mode="after")
    def answers_differ(self) -> "PreferenceExample":
        def said(output: list[ChatMessage]) -> list[str]:
            return [message.content for message in output]

        if said(self.preferred_output) == said(self.non_preferred_output):
            raise PydanticCustomError(
                "identical_outputs",
                "preferred_output and non_preferred_output say the same: nothing to prefer",
            )
        return self

    def characters(self) -> int:
        messages = [*self.input.messages, *self.preferred_output, *self.non_preferred_output]
        return sum(len(message.content) for message in messages)


Example = (
    ChatExample | PromptCompletionExample | InstructionExample | TextExample | PreferenceExample
)

EXAMPLE_MODELS: dict[DatasetFormat, type[_Example]] = {
    DatasetFormat.CHAT: ChatExample,
    DatasetFormat.PROMPT_COMPLETION: PromptCompletionExample,
    DatasetFormat.INSTRUCTION: InstructionExample,
    DatasetFormat.TEXT: TextExample,
    DatasetFormat.PREFERENCE: PreferenceExample,
}

# Which keys announce which format, tried in this order.
_FORMAT_KEYS: list[tuple[DatasetFormat, tuple[str, ...]]] = [
    (DatasetFormat.PREFERENCE, ("preferred_output", "non_preferred_output")),
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

    def as_dict(self) -> dict[str, Any]:
        """The report as JSON values (`from_dict` reads it back)."""
        return {
            "format": self.format,
            "num_examples": self.num_examples,
            "characters": self.characters,
            "errors": [[error.line, error.message] for error in self.errors],
            "num_bad_lines": self.num_bad_lines,
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "DatasetReport":
        return cls(
            format=DatasetFormat(values["format"]) if values["format"] else None,
            num_examples=values["num_examples"],
            characters=values["characters"],
            errors=[LineError(line, message) for line, message in values["errors"]],
            num_bad_lines=values["num_bad_lines"],
        )

    def summary(self) -> str:
        listed = "; ".join(str(error) for error in self.errors)
        if not self.num_bad_lines:
            return listed
        hidden = self.num_bad_lines - len(self.errors)
        more = f"; and {hidden} more" if hidden > 0 else ""
        plural = "s" if self.num_bad_lines > 1 else ""
        return f"{self.num_bad_lines} bad line{plural}: {listed}{more}"


class _InvalidLine(Exception):
    pass


def _read_blocks(
    stream: BinaryIO, max_line_bytes: int
) -> Iterator[tuple[int, list[bytes | None], bytes]]:
    """Yield (number of the first line, the lines without their newline, the block they
    came from), a block of about `BLOCK_BYTES` at a time; None for a line over the limit,
    which is skipped without being kept. A last line without a newline counts."""
    number = 1
    carry: bytes | None = b""  # the start of a line whose end is still to come; None: too long
    while block := stream.read(BLOCK_BYTES):
        lines: list[bytes | None] = list(block.split(b"\n"))
        rest = lines.pop()
        if lines:
            head = lines[0]
            assert head is not None
            if carry is None or len(carry) + len(head) > max_line_bytes:
                lines[0] = None
            elif carry:
                lines[0] = carry + head
            carry = b""
            if len(block) > max_line_bytes:  # else no line that ends in this block is too long
                lines[1:] = [x if len(x or b"") <= max_line_bytes else None for x in lines[1:]]
        if carry is not None:
            carry = carry + rest if len(carry) + len(rest) <= max_line_bytes else None
        if lines:
            yield number, lines, block
            number += len(lines)
    if carry is None or carry:
        yield number, [carry], carry or b""


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    # Python reads 1e999999 as infinity, which no JSON number is either.
    value = float(text)
    if math.isinf(value):
        cut = text if len(text) <= 24 else text[:24] + "..."
        raise ValueError(f"the number {cut} is out of range")
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


class _LineChecker:
    """The detailed checker: the verdict on a line, with the words for what is wrong. It
    remembers the file's format (the format of its first good line)."""

    def __init__(self, max_line_bytes: int) -> None:
        self.max_line_bytes = max_line_bytes
        self.format: DatasetFormat | None = None
        self.format_line = 0

    def check(self, number: int, raw: bytes | None) -> _Example | _InvalidLine | None:
        """The example on the line, what is wrong with it, or None for a blank line."""
        if raw is not None:
            raw = raw.rstrip(b"\r\n")
            if not raw.strip():
                return None  # blank lines are allowed anywhere
        try:
            if raw is None:
                raise _InvalidLine(f"line is longer than {self.max_line_bytes} bytes")
            example = _parse_object(_decode(raw, first=number == 1))
            line_format = detect_format(example)
            if line_format is None:
                raise _InvalidLine(
                    "unknown format: expected a 'messages', 'prompt'/'completion', "
                    "'instruction'/'output', 'text' or 'preferred_output'/"
                    "'non_preferred_output' field"
                )
            if self.format is not None and line_format != self.format:
                raise _InvalidLine(
                    f"mixed formats: this line is {line_format} "
                    f"but line {self.format_line} is {self.format}"
                )
            try:
                parsed = EXAMPLE_MODELS[line_format].model_validate(example)
            except ValidationError as error:
                raise _InvalidLine(_describe(error)) from None
        except _InvalidLine as problem:
            return problem
        if self.format is None:
            self.format, self.format_line = line_format, number
        return parsed


# --- The fast checker -----------------------------------------------------------------------
# pydantic-core's `validate_json` with a schema per format. It accepts a line only if the
# detailed checker does, with the same format and the same characters (chat's rules on
# assistant turns are checked in `_chat_characters`); anything else it leaves to the detailed
# checker. It keeps no more than the fields it counts.
#
# Where the two JSON parsers differ: pydantic-core's takes NaN, Infinity and numbers past the
# float range (as NaN and infinity); Python's, as `_parse_object` calls it, refuses them. Each
# format has two schemas. The closed one allows no key it does not type, so a line it accepts
# holds no number at all but a 0/1 weight. The open one ignores other keys (as the models
# do; keys that announce an earlier format must be absent), and takes a line only if no
# spelling of those numbers appears in it, even inside a string.

Schema = Callable[[bytes], Any]
_Visible = Annotated[str, StringConstraints(pattern=VISIBLE)]  # no lone surrogate: Rust's str
_Weight = Annotated[int, Strict(), Ge(0), Le(1)]


def _never(_value: Any) -> Any:
    raise ValueError("announces another format")


def _schemas(extra: Literal["forbid", "ignore"]) -> dict[DatasetFormat, Schema]:
    typed = with_config(ConfigDict(strict=True, extra=extra))

    def absent(*keys: str) -> dict[str, Any]:
        never = NotRequired[Annotated[Any, AfterValidator(_never)]]
        return {key: never for key in keys} if extra == "ignore" else {}

    def schema(name: str, fields: dict[str, Any]) -> Schema:
        return TypeAdapter(typed(TypedDict(name, fields))).validator.validate_json  # type: ignore[operator]

    message = typed(
        TypedDict(  # type: ignore[operator]
            "Message",
            {
                "role": Literal["system", "user", "assistant"],
                "content": _Visible,
                "weight": NotRequired[_Weight],
            },
        )
    )
    return {
        DatasetFormat.CHAT: schema(
            "Chat", {"messages": Annotated[list[message], Field(min_length=1)]}
        ),
        DatasetFormat.PROMPT_COMPLETION: schema(
            "PromptCompletion",
            {"prompt": _Visible, "completion": _Visible, **absent("messages")},
        ),
        DatasetFormat.INSTRUCTION: schema(
            "Instruction",
            {
                "instruction": _Visible,
                "input": NotRequired[str],
                "output": _Visible,
                **absent("messages", "prompt", "completion"),
            },
        ),
        DatasetFormat.TEXT: schema(
            "Text",
            {
                "text": _Visible,
                **absent("messages", "prompt", "completion", "instruction", "output"),
            },
        ),
    }


_CLOSED = _schemas("forbid")
_OPEN = _schemas("ignore")


def _chat_characters(example: Any) -> int | None:
    """None: the weights break chat's rules (the detailed checker says how)."""
    characters, trainable = 0, False
    for message in example["messages"]:
        characters += len(message["content"])
        if message["role"] == "assistant":
            trainable = trainable or message.get("weight", 1) == 1
        elif "weight" in message:
            return None
    return characters if trainable else None


_CHARACTERS: dict[DatasetFormat, Callable[[Any], int | None]] = {
    DatasetFormat.CHAT: _chat_characters,
    DatasetFormat.PROMPT_COMPLETION: lambda x: len(x["prompt"]) + len(x["completion"]),
    DatasetFormat.INSTRUCTION: lambda x: (
        len(x["instruction"]) + len(x.get("input", "")) + len(x["output"])
    ),
    DatasetFormat.TEXT: lambda x: len(x["text"]),
}

_NUMBER_SPELLING = bytes.maketrans(b"123456789E", b"000000000e")
_LONG_DIGITS = b"0" * 200  # with an exponent of 2 digits, 210 digits reach infinity


def _unusual_numbers(text: bytes) -> bool:
    """Whether the text may spell NaN, Infinity or a number past the float range."""
    if b"NaN" in text or b"Infinity" in text:
        return True
    text = text.translate(_NUMBER_SPELLING, b"+-")
    return b"e000" in text or _LONG_DIGITS in text


class _FastChecker:
    """The fast checker for the lines of one file, once its format is known."""

    def __init__(self, dataset_format: DatasetFormat) -> None:
        self.closed = _CLOSED[dataset_format]
        self.open = _OPEN[dataset_format]
        self.characters = _CHARACTERS[dataset_format]
        self.open_first = False  # once a line has had other keys, most lines will
        self.block = b""
        self.unusual_block: bool | None = None

    def verdict(self, raw: bytes, block: bytes, first_in_block: bool) -> int | None:
        """The characters of a good line; None: the detailed checker must decide. The
        line comes from `block` (the first one may have begun in the block before)."""
        if not self.open_first:
            try:
                return self.characters(self.closed(raw))
            except ValidationError:
                pass
        if block is not self.block:
            self.block, self.unusual_block = block, _unusual_numbers(block)
        if (self.unusual_block or first_in_block) and _unusual_numbers(raw):
            return None
        try:
            characters = self.characters(self.open(raw))
        except ValidationError:
            return None
        self.open_first = True
        return characters


def fast_verdict(dataset_format: DatasetFormat, raw: bytes) -> int | None:
    """The fast checker alone on one line of a file of this format (for tests)."""
    return _FastChecker(dataset_format).verdict(raw, raw, True)


def validate_dataset(stream: BinaryIO, *, max_line_bytes: int) -> DatasetReport:
    """Check every line of a JSONL dataset read from a binary stream."""
    report = DatasetReport()
    checker = _LineChecker(max_line_bytes)
    fast: _FastChecker | None = None
    for first, lines, block in _read_blocks(stream, max_line_bytes):
        for index, raw in enumerate(lines):
            if fast is not None and raw is not None:
                characters = fast.verdict(raw, block, index == 0)
                if characters is not None:
                    report.num_examples += 1
                    report.characters += characters
                    continue
            result = checker.check(first + index, raw)
            if result is None:
                continue
            if isinstance(result, _InvalidLine):
                report.add_error(first + index, str(result))
                continue
            report.num_examples += 1
            report.characters += result.characters()
            if fast is None and checker.format in _CLOSED:
                fast = _FastChecker(checker.format)
    report.format = checker.format
    if not report.num_examples and not report.num_bad_lines:
        report.add_error(None, "the file is empty")
    return report


def read_examples(stream: BinaryIO, *, max_line_bytes: int) -> Iterator[Example]:
    """The examples of a dataset that passed `validate_dataset`, one at a time.

    Raises ValueError naming the line if the stream holds a bad line after all.
    """
    checker = _LineChecker(max_line_bytes)
    for first, lines, _block in _read_blocks(stream, max_line_bytes):
        for index, raw in enumerate(lines):
            result = checker.check(first + index, raw)
            if isinstance(result, _InvalidLine):
                raise ValueError(f"line {first + index}: {result}")
            if result is not None:
                yield result  # type: ignore[misc]
