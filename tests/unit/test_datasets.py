"""The JSONL validator: the good case of each format and one case per refusal."""

import io
import json

import pytest

from afina.core.datasets import MAX_REPORTED_ERRORS, DatasetFormat, validate_dataset

MAX_LINE = 4096


def jsonl(*lines: object) -> bytes:
    return b"".join(
        (line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines
    )


def check(data: bytes, max_line_bytes: int = MAX_LINE):
    return validate_dataset(io.BytesIO(data), max_line_bytes=max_line_bytes)


def chat(*messages: dict) -> dict:
    return {"messages": list(messages)}


USER = {"role": "user", "content": "What is 2+2?"}
ASSISTANT = {"role": "assistant", "content": "4"}


def only_error(data: bytes, max_line_bytes: int = MAX_LINE) -> tuple[int | None, str]:
    report = check(data, max_line_bytes)
    assert not report.ok
    assert report.num_bad_lines == 1, report.errors
    (error,) = report.errors
    return error.line, error.message


@pytest.mark.parametrize(
    ("example", "expected_format", "characters"),
    [
        (
            chat({"role": "system", "content": "Be brief."}, USER, ASSISTANT),
            DatasetFormat.CHAT,
            len("Be brief.") + len("What is 2+2?") + 1,
        ),
        ({"prompt": "2+2=", "completion": "4"}, DatasetFormat.PROMPT_COMPLETION, 5),
        (
            {"instruction": "Add.", "input": "2 and 2", "output": "4"},
            DatasetFormat.INSTRUCTION,
            len("Add.") + len("2 and 2") + 1,
        ),
        ({"text": "<s>[INST] hi [/INST] hello </s>"}, DatasetFormat.TEXT, 31),
    ],
)
def test_each_format_is_accepted_and_measured(example, expected_format, characters):
    report = check(jsonl(example, example, example))

    assert report.ok, report.errors
    assert report.format == expected_format
    assert report.num_examples == 3
    assert report.characters == 3 * characters
    assert report.estimated_tokens == -(-3 * characters // 4)


def test_accepts_what_real_datasets_contain():
    data = (
        "\ufeff".encode()  # a BOM from a Windows editor
        + jsonl(
            chat(USER, {**ASSISTANT, "weight": 0}, USER, {**ASSISTANT, "weight": 1}),
            {**chat(USER, ASSISTANT), "id": "ex-2", "metadata": {"source": "web"}},
            chat({**USER, "name": "alice"}, ASSISTANT),
        )
        + b"\r\n   \n"  # blank lines and CRLF endings are skipped
        + json.dumps(chat(USER, ASSISTANT)).encode()  # last line without a newline
    )
    report = check(data)

    assert report.ok, report.errors
    assert report.num_examples == 4


def test_instruction_input_may_be_empty_or_missing():
    report = check(
        jsonl(
            {"instruction": "Say hi.", "input": "", "output": "hi"},
            {"instruction": "Say hi.", "output": "hi"},
        )
    )
    assert report.ok, report.errors
    assert report.num_examples == 2


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b'{"text": "unterminated}', "invalid JSON: Unterminated string starting at (column 10)"),
        (b'{"text": "a",}', "invalid JSON: Expecting property name enclosed in double quotes"),
        (b'{"text": NaN}', "invalid JSON: NaN is not a JSON number"),
        (b"[1, 2]", "expected a JSON object, got an array"),
        (b'"just a string"', "expected a JSON object, got a string"),
        (b"42", "expected a JSON object, got a number"),
        (b"null", "expected a JSON object, got null"),
        (b'{"question": "hi", "answer": "yo"}', "unknown format: expected a 'messages'"),
    ],
)
def test_refuses_lines_that_are_not_json_objects(line, message):
    good = jsonl({"text": "fine"})
    error_line, error = only_error(good + line + b"\n" + good)
    assert error_line == 2
    assert error.startswith(message)


def test_refuses_nesting_too_deep_and_numbers_too_large():
    deep = b'{"text": "x", "extra": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    line, message = only_error(jsonl({"text": "ok"}) + deep + b"\n", max_line_bytes=len(deep))
    assert (line, message) == (2, "invalid JSON: nested too deeply")

    huge = b'{"text": "x", "n": ' + b"9" * 10_000 + b"}"
    line, message = only_error(huge + b"\n", max_line_bytes=len(huge))
    assert (line, message) == (1, "invalid JSON: a number has more than 4300 digits")


def test_refuses_mixed_formats_naming_both_lines():
    data = jsonl(chat(USER, ASSISTANT), chat(USER, ASSISTANT), {"text": "hello"})
    assert only_error(data) == (3, "mixed formats: this line is text but line 1 is chat")


@pytest.mark.parametrize(
    ("example", "message"),
    [
        ({"prompt": "2+2="}, "completion: is missing"),
        ({"completion": "4"}, "prompt: is missing"),
        ({"instruction": "Add.", "input": "2 and 2"}, "output: is missing"),
        (chat({"role": "user"}, ASSISTANT), "messages[0].content: is missing"),
        (chat({"content": "hi"}, ASSISTANT), "messages[0].role: is missing"),
        ({"prompt": "2+2=", "completion": ""}, "completion: must not be empty"),
        ({"text": "   \n "}, "text: must not be empty"),
        (
            chat(USER, {"role": "assistant", "content": ""}),
            "messages[1].content: must not be empty",
        ),
        ({"messages": []}, "messages: List should have at least 1 item after validation, not 0"),
    ],
)
def test_refuses_missing_and_empty_fields(example, message):
    assert only_error(jsonl(example)) == (1, message)


@pytest.mark.parametrize(
    ("example", "message"),
    [
        ({"text": 42}, "text: Input should be a valid string"),
        ({"prompt": ["a"], "completion": "b"}, "prompt: Input should be a valid string"),
        ({"messages": "hi"}, "messages: Input should be a valid list"),
        (
            chat(USER, {"role": "assistant", "content": {"text": "4"}}),
            "messages[1].content: Input should be a valid string",
        ),
        (
            {"messages": [USER, "assistant: 4"]},
            "messages[1]: Input should be a valid dictionary or instance of ChatMessage",
        ),
        (
            {"instruction": "Add.", "input": None, "output": "4"},
            "input: Input should be a valid string",
        ),
    ],
)
def test_refuses_wrong_types(example, message):
    assert only_error(jsonl(example)) == (1, message)


def test_refuses_unknown_role():
    data = jsonl(chat(USER, ASSISTANT), chat({"role": "bot", "content": "hi"}, ASSISTANT))
    assert only_error(data) == (
        2,
        "messages[0].role: unknown role 'bot': expected one of system, user, assistant",
    )


def test_refuses_chat_without_assistant_message():
    data = jsonl(chat({"role": "system", "content": "Be brief."}, USER))
    assert only_error(data) == (1, "a chat needs an assistant message")


def test_refuses_chat_where_every_assistant_turn_has_weight_zero():
    data = jsonl(chat(USER, {**ASSISTANT, "weight": 0}))
    assert only_error(data) == (1, "every assistant message has weight 0: nothing to learn")


@pytest.mark.parametrize(
    ("message", "error"),
    [
        ({**ASSISTANT, "weight": 2}, "messages[1].weight: must be 0 or 1, got 2"),
        ({**ASSISTANT, "weight": 0.5}, "messages[1].weight: must be 0 or 1, got 0.5"),
        ({**ASSISTANT, "weight": True}, "messages[1].weight: must be 0 or 1, got true"),
        ({**ASSISTANT, "weight": "1"}, 'messages[1].weight: must be 0 or 1, got "1"'),
        ({**ASSISTANT, "weight": None}, "messages[1].weight: must be 0 or 1, got null"),
    ],
)
def test_refuses_weights_other_than_zero_or_one(message, error):
    assert only_error(jsonl(chat(USER, message))) == (1, error)


def test_refuses_weight_on_a_user_message():
    data = jsonl(chat({**USER, "weight": 1}, ASSISTANT))
    assert only_error(data) == (1, "messages[0]: weight is only allowed on assistant messages")


@pytest.mark.parametrize(
    ("line", "error"),
    [
        (rb'{"text": "half a pair \ud800"}', "text: contains an unpaired surrogate escape \\ud800"),
        (
            rb'{"instruction": "a", "input": "\udfff", "output": "b"}',
            "input: contains an unpaired surrogate escape \\udfff",
        ),
    ],
)
def test_refuses_unpaired_surrogate_escapes(line, error):
    assert only_error(line + b"\n") == (1, error)


def test_refuses_bytes_that_are_not_utf8():
    data = jsonl({"text": "ok"}) + b'{"text": "caf\xe9"}\n'  # Latin-1, not UTF-8
    assert only_error(data) == (2, "not valid UTF-8 (byte 0xe9 at byte 14)")


@pytest.mark.parametrize("data", [b"", b"\n\n  \r\n\t\n"], ids=["no bytes", "blank lines"])
def test_refuses_an_empty_file(data):
    report = check(data)
    assert [(e.line, e.message) for e in report.errors] == [(None, "the file is empty")]
    assert report.summary() == "the file is empty"


def test_refuses_a_line_over_the_limit_and_goes_on_with_the_next():
    long_line = json.dumps({"text": "x" * 200}).encode()
    data = jsonl({"text": "ok"}) + long_line + b"\n" + jsonl({"text": "ok"}, [1])
    report = check(data, max_line_bytes=100)

    assert report.num_examples == 2
    assert [(e.line, e.message) for e in report.errors] == [
        (2, "line is longer than 100 bytes"),
        (4, "expected a JSON object, got an array"),
    ]


def test_a_line_exactly_at_the_limit_is_accepted():
    line = json.dumps({"text": "x" * 50}).encode()
    assert check(line + b"\n", max_line_bytes=len(line)).ok


def test_reports_the_first_errors_and_counts_the_rest():
    lines = [{"text": "ok"}] + [b"not json"] * (MAX_REPORTED_ERRORS + 5)
    report = check(jsonl(*lines))

    assert report.num_bad_lines == MAX_REPORTED_ERRORS + 5
    assert [e.line for e in report.errors] == list(range(2, MAX_REPORTED_ERRORS + 2))
    assert report.summary().startswith(f"{MAX_REPORTED_ERRORS + 5} bad lines: line 2: ")
    assert report.summary().endswith("; and 5 more")
    assert report.num_examples == 1
