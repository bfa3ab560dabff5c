"""The JSONL validator: the good case of each format and one case per refusal."""

import io
import json
import unicodedata

import pytest

from afina.core import datasets
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


# --- Content that is empty once whitespace and control characters are set aside ----------

NUL = "\u0000"


@pytest.mark.parametrize(
    ("example", "field"),
    [
        (chat(USER, {"role": "assistant", "content": NUL}), "messages[1].content"),
        (chat({"role": "user", "content": "\x1b\x07"}, ASSISTANT), "messages[0].content"),
        ({"prompt": "2+2=", "completion": NUL * 3}, "completion"),
        ({"prompt": f"{NUL} \t\x7f\u0085", "completion": "4"}, "prompt"),
        ({"instruction": NUL, "output": "4"}, "instruction"),
        ({"instruction": "Add.", "output": f"\r{NUL}\n"}, "output"),
        ({"text": f"{NUL}\u00a0\u3000"}, "text"),
    ],
)
def test_refuses_content_of_only_control_characters_naming_the_line(example, field):
    good = jsonl(FIRST[datasets.detect_format(example)])  # so that the fast checker is on
    assert only_error(good + jsonl(example)) == (
        2,
        f"{field}: must not be empty: it has only control characters and whitespace",
    )


@pytest.mark.parametrize("blank", [" ", "\u00a0\u2003\u3000", "\u2028\t\n"])
def test_whitespace_only_content_keeps_its_message(blank):
    assert only_error(jsonl({"text": blank})) == (1, "text: must not be empty")


def test_text_with_something_visible_among_control_characters_is_kept():
    report = check(jsonl({"text": f"{NUL}a{NUL}"}, {"text": "\u200b"}, {"text": "\x1b[31mred"}))
    assert report.ok, report.errors


def test_an_error_quotes_at_most_80_characters_of_a_value_from_the_file():
    data = jsonl(
        chat({"role": "r" * 100_000, "content": "hi"}, ASSISTANT),
        chat(USER, {**ASSISTANT, "weight": "w" * 100_000}),
    )
    report = check(data, max_line_bytes=1_000_000)
    assert [(e.line, e.message) for e in report.errors] == [
        (
            1,
            f"messages[0].role: unknown role '{'r' * 80}...': expected one of system, user, "
            "assistant",
        ),
        (2, f'messages[1].weight: must be 0 or 1, got "{"w" * 79}...'),
    ]


# --- The fast checker and the detailed one give the same verdicts ------------------------

# One good line per format the fast checker knows (the SFT formats), the file's first line in
# the tests below.
FIRST = {
    DatasetFormat.CHAT: chat(USER, ASSISTANT),
    DatasetFormat.PROMPT_COMPLETION: {"prompt": "2+2=", "completion": "4"},
    DatasetFormat.INSTRUCTION: {"instruction": "Add.", "input": "2, 2", "output": "4"},
    DatasetFormat.TEXT: {"text": "hello"},
}


def _lines(*examples: object) -> list[bytes]:
    return [e if isinstance(e, bytes) else json.dumps(e).encode() for e in examples]


# Lines each checker could judge alone: good ones of each format (with extra keys, escapes,
# weights...), and bad ones of every kind the detailed checker words.
GOOD = _lines(
    *FIRST.values(),
    chat({"role": "system", "content": "Be brief."}, USER, {**ASSISTANT, "weight": 1}),
    chat(USER, {**ASSISTANT, "weight": 0}, USER, ASSISTANT),
    {**chat({**USER, "name": "alice"}, ASSISTANT), "id": "x", "metadata": {"n": [1, 2.5, None]}},
    {"prompt": "a", "completion": "b", "text": "also here", "n": -0.0},
    {"instruction": "a", "output": "b"},
    {"instruction": "a", "input": "", "output": "b", "text": "c"},
    {"text": "caf\u00e9 \U0001f600 \u200b", "input": "ignored"},
    b'{"text": "\\ud83d\\ude00 \\/ \\" \\\\ \\b\\f\\n\\r\\t \\u00e9"}',
    b'  {"text": "spaces around", "n": 1e30, "m": -12345678901234567890}\t\r',
    b'{"text": "dup", "text": "last wins"}',
    b'{"text": "", "text": "last wins"}',
    b'{"text": "a", "n": 1E+99, "z": 0.000000000000000000000000000001}',
)
# Good lines the fast checker may leave to the detailed one: numbers spelled like the ones
# only pydantic-core's parser takes.
UNUSUAL = _lines(
    b'{"text": "a", "n": 1e308}',
    b'{"text": "a", "n": ' + b"9" * 4300 + b"}",
    {"text": "NaN and Infinity in a string", "e": "e-123"},
)
BAD = _lines(
    b'{"text": "unterminated}',
    b'{"text": "a",}',
    b'{"text": NaN}',
    b'{"text": "a", "n": NaN}',
    b'{"text": "a", "n": [Infinity]}',
    b'{"text": "a", "n": -Infinity}',
    b'{"text": "a", "n": 1e999999}',
    b'{"text": "a", "n": -1E400}',
    b'{"text": "a", "n": 1' + b"0" * 400 + b".5}",
    b'{"text": "a", "n": ' + b"9" * 4301 + b"}",
    b'{"text": "a", "n": 01}',
    b'{"text": "a", "n": +1}',
    b'{"text": "a", "n": .5}',
    b'{"text": "a", "n": 1.}',
    b'{"text": "a", "n": 0x10}',
    b"[1, 2]",
    b'"just a string"',
    b"42",
    b"null",
    b'{"text": "a"} {"text": "b"}',
    b'{"text": "a"}\x0c',
    b'{"text": "a"}\x00',
    b"\xef\xbb\xbf" + b'{"text": "a BOM past line 1"}',
    b'{"question": "hi", "answer": "yo"}',
    b'{"text": "caf\xe9"}',
    b'{"text": "\xed\xa0\x80"}',
    b'{"text": "ok", "k": "\xc0\xaf"}',
    b'{"text": "a\x00b"}',
    b'{"te\x00xt": "a"}',
    b'{"text": "half a pair \\ud800"}',
    b'{"text": "ok", "k": "\\udfff"}',
    b'{"te\\ud800xt": "a", "text": "b"}',
    b'{"text": "a", "text": ""}',
    b'{"text": "a", "d": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b'{"text": "a", "d": ' + b"[" * 500 + b"]" * 500 + b"}",
    *_lines(
        {"text": 42},
        {"text": None},
        {"text": ["a"]},
        {"text": "   \n "},
        {"text": NUL},
        {"text": "\u2028\u3000"},
        {"prompt": "2+2="},
        {"completion": "4"},
        {"prompt": "", "completion": "4"},
        {"prompt": "a", "completion": "b", "messages": []},
        {"instruction": "Add.", "input": "2 and 2"},
        {"instruction": "a", "input": None, "output": "b"},
        {"instruction": "a", "input": 1, "output": "b"},
        {"instruction": "a", "output": "b", "prompt": "c"},
        {"instruction": "a", "output": "b", "completion": "c"},
        {"text": "a", "output": "b"},
        {"text": "a", "instruction": "b"},
        {"text": "a", "messages": "b"},
        {"messages": []},
        {"messages": "hi"},
        {"messages": [USER, "assistant: 4"]},
        chat({"role": "user"}, ASSISTANT),
        chat({"content": "hi"}, ASSISTANT),
        chat({"role": "bot", "content": "hi"}, ASSISTANT),
        chat({"role": "User", "content": "hi"}, ASSISTANT),
        chat({"role": 1, "content": "hi"}, ASSISTANT),
        chat(USER, {"role": "assistant", "content": {"text": "4"}}),
        chat(USER, {"role": "assistant", "content": ""}),
        chat(USER, {"role": "assistant", "content": NUL}),
        chat({"role": "system", "content": "Be brief."}, USER),
        chat(USER, {**ASSISTANT, "weight": 0}),
        chat(USER, {**ASSISTANT, "weight": 0}, {**ASSISTANT, "weight": 0}),
        chat({**USER, "weight": 1}, ASSISTANT),
        chat({**USER, "weight": 0}, ASSISTANT),
        *(chat(USER, {**ASSISTANT, "weight": w}) for w in (2, -1, 0.5, 1.0, 0.0, True, "1", None)),
        {"messages": [USER, ASSISTANT], "prompt": "p", "completion": "c"},
    ),
)


def detailed_only(monkeypatch: pytest.MonkeyPatch, data: bytes, max_line_bytes: int = MAX_LINE):
    """The report of the detailed checker alone."""
    with monkeypatch.context() as patch:
        patch.setattr(datasets._FastChecker, "verdict", lambda *_args: None)
        return check(data, max_line_bytes)


def as_tuple(report) -> tuple:
    errors = [(e.line, e.message) for e in report.errors]
    return report.format, report.num_examples, report.characters, errors, report.num_bad_lines


@pytest.mark.parametrize("line", GOOD + UNUSUAL + BAD, ids=lambda line: repr(line[:50]))
@pytest.mark.parametrize("dataset_format", list(FIRST))
def test_fast_and_detailed_checkers_agree_on_every_line(monkeypatch, dataset_format, line):
    data = jsonl(FIRST[dataset_format]) + line + b"\n" + jsonl(FIRST[dataset_format])
    assert as_tuple(check(data, 1_000_000)) == as_tuple(detailed_only(monkeypatch, data, 1_000_000))
    verdict = datasets.fast_verdict(dataset_format, line)
    if verdict is not None:  # it accepted: then so does the detailed checker, alike
        report = detailed_only(monkeypatch, jsonl(FIRST[dataset_format]) + line + b"\n")
        assert report.ok, report.errors
        assert report.characters == check(jsonl(FIRST[dataset_format])).characters + verdict


@pytest.mark.parametrize("dataset_format", list(FIRST))
def test_the_fast_checker_takes_the_good_lines_of_its_format(dataset_format):
    ours = [line for line in GOOD if datasets.detect_format(json.loads(line)) == dataset_format]
    assert ours
    for line in ours:
        assert datasets.fast_verdict(dataset_format, line) is not None, line


def test_fast_and_detailed_checkers_agree_on_which_characters_are_blank():
    """Every character Python counts as whitespace or control, alone and with a letter."""
    blank = [
        chr(c)
        for c in range(0x110000)
        if not 0xD800 <= c < 0xE000 and (chr(c).isspace() or unicodedata.category(chr(c)) == "Cc")
    ]
    assert len(blank) > 60
    for character in blank:
        for text, ok in ((character, False), (character + "a", True)):
            line = json.dumps({"text": text}).encode()
            assert (datasets.fast_verdict(DatasetFormat.TEXT, line) is not None) == ok, text
            assert check(line + b"\n").ok == ok, text


@pytest.mark.parametrize("block_bytes", [1, 7, 64, 1000])
def test_lines_are_the_same_whatever_the_block_size(monkeypatch, block_bytes):
    data = (
        "\ufeff".encode()
        + jsonl({"text": "first"}, {"text": "x" * 150}, {"text": "y" * 80})
        + b"\r\n  \n"
        + jsonl({"text": "z" * 300}, [1], {"text": "ok"}, {"text": "w" * 101})
        + b'{"text": "no newline at the end"}'
    )
    expected = as_tuple(check(data, max_line_bytes=100))
    assert expected[3] == [
        (2, "line is longer than 100 bytes"),
        (6, "line is longer than 100 bytes"),
        (7, "expected a JSON object, got an array"),
        (9, "line is longer than 100 bytes"),
    ]
    monkeypatch.setattr(datasets, "BLOCK_BYTES", block_bytes)
    assert as_tuple(check(data, max_line_bytes=100)) == expected
    assert as_tuple(check(data + b"a" * 1000, max_line_bytes=100))[3][-1] == (
        10,
        "line is longer than 100 bytes",
    )


# --- Preference data (OpenAI's format, for DPO) ----------------------------------------------

PREFERENCE = {
    "input": {"messages": [{"role": "system", "content": "Be brief."}, USER]},
    "preferred_output": [{"role": "assistant", "content": "4"}],
    "non_preferred_output": [{"role": "assistant", "content": "It is four."}],
}


def test_a_preference_file_is_its_own_format_counted_over_every_message():
    report = check(jsonl(PREFERENCE, PREFERENCE))
    assert (report.format, report.num_examples, report.errors) == (DatasetFormat.PREFERENCE, 2, [])
    characters = len("Be brief.") + len(USER["content"]) + len("4") + len("It is four.")
    assert report.characters == 2 * characters


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"preferred_output": []}, "preferred_output: List should have at least 1 item"),
        ({"non_preferred_output": None}, "non_preferred_output: Input should be a valid list"),
        (
            {"non_preferred_output": [{"role": "user", "content": "5"}]},
            "non_preferred_output: an output is the assistant's answer: role must be assistant, "
            "got 'user'",
        ),
        (
            {"non_preferred_output": [{"role": "assistant", "content": "4"}]},
            "preferred_output and non_preferred_output say the same: nothing to prefer",
        ),
        (
            {"input": {"messages": [USER, {"role": "assistant", "content": "4"}]}},
            "input: must end with a user message: the outputs are answers to it",
        ),
        ({"preferred_output": [{"role": "assistant", "content": " "}]}, "must not be empty"),
    ],
)
def test_a_bad_preference_line_is_named_with_what_is_wrong(change, message):
    line, error = only_error(jsonl(PREFERENCE, {**PREFERENCE, **change}))
    assert line == 2
    assert message in error, error


def test_a_preference_line_in_a_chat_file_is_a_mixed_format():
    line, error = only_error(jsonl(chat(USER, ASSISTANT), PREFERENCE))
    assert (line, error) == (2, "mixed formats: this line is preference but line 1 is chat")
