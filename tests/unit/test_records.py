"""Examples -> records: which real token ids of the demo tokenizer carry loss, for each
format, and how `to_records` cuts, drops and counts."""

from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer

from afina.core.chat_format import CHATML_TEMPLATE, Stops, ensure_chat_template, generation_stops
from afina.core.datasets import (
    ChatExample,
    InstructionExample,
    PreferenceExample,
    PromptCompletionExample,
    TextExample,
)
from afina.core.records import (
    IGNORE_INDEX,
    Record,
    RecordError,
    RecordStats,
    instruction_prompt,
    prompt_and_reference,
    sequence_tokens,
    to_preference_record,
    to_record,
    to_records,
)


@pytest.fixture(scope="module")
def tokenizer(demo_model):
    """Shared by the tests that do not change it."""
    return AutoTokenizer.from_pretrained(demo_model)


@pytest.fixture
def fresh_tokenizer(demo_model):
    """A tokenizer of its own, for a test that changes it."""
    return AutoTokenizer.from_pretrained(demo_model)


def chat(*messages: tuple[str, str] | tuple[str, str, int]) -> ChatExample:
    """`("user", "hi")`, or `("assistant", "yo", 0)` with a weight."""
    return ChatExample.model_validate(
        {
            "messages": [
                {"role": role, "content": content, **({"weight": rest[0]} if rest else {})}
                for role, content, *rest in messages
            ]
        }
    )


def loss_segments(tokenizer, record: Record) -> list[str]:
    """The decoded text of each run of consecutive tokens that carry loss; checks on the
    way that a label is the token's own id or IGNORE_INDEX."""
    assert len(record.labels) == len(record.input_ids)
    segments: list[list[int]] = []
    previous = IGNORE_INDEX
    for token, label in zip(record.input_ids, record.labels, strict=True):
        assert label in (token, IGNORE_INDEX)
        if label != IGNORE_INDEX:
            if previous == IGNORE_INDEX:
                segments.append([])
            segments[-1].append(token)
        previous = label
    return [tokenizer.decode(segment) for segment in segments]


def record(example, tokenizer, loss_on="completion") -> tuple[str, list[str]]:
    """The record's whole decoded text and its loss segments."""
    result = to_record(example, tokenizer, loss_on=loss_on)
    return tokenizer.decode(result.input_ids), loss_segments(tokenizer, result)


SYSTEM = ("system", "Be brief.")
QUESTION = ("user", "What is the capital of France?")
ANSWER = ("assistant", "Paris.")


def chatml(*turns: tuple[str, str]) -> str:
    return "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in turns)


def test_chat_loss_is_on_the_assistant_content_and_end_of_turn_only(tokenizer):
    text, segments = record(chat(SYSTEM, QUESTION, ANSWER), tokenizer)

    assert text == chatml(SYSTEM, QUESTION, ANSWER)
    assert segments == ["Paris.<|im_end|>\n"]


def test_chat_turn_with_weight_zero_carries_no_loss(tokenizer):
    example = chat(("user", "Say no."), ("assistant", "No.", 0), ("user", "Say yes."), ANSWER)
    text, segments = record(example, tokenizer)

    assert text == chatml(("user", "Say no."), ("assistant", "No."), ("user", "Say yes."), ANSWER)
    assert segments == ["Paris.<|im_end|>\n"]


def test_chat_every_assistant_turn_carries_loss(tokenizer):
    example = chat(
        SYSTEM,
        ("user", "One?"),
        ("assistant", "One."),
        ("user", "Two?"),
        ("assistant", "Two.", 1),
    )
    _, segments = record(example, tokenizer)

    assert segments == ["One.<|im_end|>\n", "Two.<|im_end|>\n"]


def test_chat_opening_with_an_assistant_turn_trains_it(tokenizer):
    text, segments = record(chat(("assistant", "Hello."), QUESTION, ANSWER), tokenizer)

    assert text == chatml(("assistant", "Hello."), QUESTION, ANSWER)
    assert segments == ["Hello.<|im_end|>\n", "Paris.<|im_end|>\n"]


def test_chat_with_loss_on_all_trains_every_token(tokenizer):
    result = to_record(chat(SYSTEM, QUESTION, ANSWER), tokenizer, loss_on="all")

    assert result.labels == result.input_ids
    assert tokenizer.decode(result.input_ids) == chatml(SYSTEM, QUESTION, ANSWER)


def test_tokenizer_without_chat_template_gets_chatml(fresh_tokenizer):
    fresh_tokenizer.chat_template = None
    with pytest.raises(RecordError, match="the chat template failed"):
        to_record(chat(QUESTION, ANSWER), fresh_tokenizer, loss_on="completion")

    ensure_chat_template(fresh_tokenizer)

    assert fresh_tokenizer.chat_template == CHATML_TEMPLATE
    assert record(chat(QUESTION, ANSWER), fresh_tokenizer) == (
        chatml(QUESTION, ANSWER),
        ["Paris.<|im_end|>\n"],
    )


def test_ensure_chat_template_keeps_a_tokenizer_own_template(fresh_tokenizer):
    own = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
    fresh_tokenizer.chat_template = own

    ensure_chat_template(fresh_tokenizer)

    assert fresh_tokenizer.chat_template == own


@pytest.mark.parametrize(
    "template",
    [
        "{{ messages[-1]['role'] }}: {{ messages[-1]['content'] }}\n",
        "{% for m in messages %}{% if loop.last %}[last] {% endif %}"
        "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}",
        "{% for m in messages %}{{ m['role'] }}: "
        "{% if m['role'] == 'assistant' and not loop.last %}...{% else %}{{ m['content'] }}"
        "{% endif %}\n{% endfor %}",
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}bot: {% endif %}",
    ],
    ids=[
        "only the last message",
        "last turn marked",
        "earlier answers elided",
        "generation prompt unlike the assistant turn",
    ],
)
def test_chat_template_that_is_not_prefix_stable_is_refused(fresh_tokenizer, template):
    fresh_tokenizer.chat_template = template
    example = chat(QUESTION, ANSWER, ("user", "And Spain?"), ("assistant", "Madrid."))

    with pytest.raises(RecordError, match="does not render a conversation as the sum"):
        to_record(example, fresh_tokenizer, loss_on="completion")


def test_prompt_completion_is_bos_prompt_completion_eos_with_loss_on_completion(tokenizer):
    example = PromptCompletionExample(prompt="The capital of France is", completion=" Paris.")
    result = to_record(example, tokenizer, loss_on="completion")

    assert result.input_ids[0] == tokenizer.bos_token_id
    assert result.input_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(result.input_ids) == "<s>The capital of France is Paris.</s>"
    assert loss_segments(tokenizer, result) == [" Paris.</s>"]


def test_a_token_merged_across_the_prompt_end_carries_loss(tokenizer):
    # BPE joins the prompt's trailing space and the completion into one token, " Paris".
    example = PromptCompletionExample(prompt="Answer: ", completion="Paris")
    result = to_record(example, tokenizer, loss_on="completion")

    assert loss_segments(tokenizer, result) == [" Paris</s>"]


@pytest.mark.parametrize(
    ("prompt", "completion", "text"),
    [
        ("<s>2+2=", "4", "<s>2+2=4</s>"),
        ("2+2=", "4</s>", "<s>2+2=4</s>"),
    ],
    ids=["prompt starts with BOS", "completion ends with EOS"],
)
def test_prompt_completion_does_not_double_bos_or_eos(tokenizer, prompt, completion, text):
    example = PromptCompletionExample(prompt=prompt, completion=completion)

    assert record(example, tokenizer) == (text, ["4</s>"])


@pytest.mark.parametrize(
    ("input_text", "prompt"),
    [
        (
            "2 and 2",
            "Below is an instruction that describes a task, paired with an input that provides "
            "further context. Write a response that appropriately completes the request.\n\n"
            "### Instruction:\nAdd.\n\n### Input:\n2 and 2\n\n### Response:\n",
        ),
        (
            "",
            "Below is an instruction that describes a task. Write a response that appropriately "
            "completes the request.\n\n### Instruction:\nAdd.\n\n### Response:\n",
        ),
    ],
    ids=["with input", "without input"],
)
def test_instruction_is_the_alpaca_prompt_with_loss_on_output(tokenizer, input_text, prompt):
    assert instruction_prompt("Add.", input_text) == prompt

    example = InstructionExample(instruction="Add.", input=input_text, output="4")

    assert record(example, tokenizer) == (f"<s>{prompt}4</s>", ["4</s>"])


@pytest.mark.parametrize(
    "text",
    ["hello world", "<s>hello world", "hello world</s>", "<s>hello world</s>"],
    ids=["plain", "starts with BOS", "ends with EOS", "both"],
)
def test_text_is_bos_text_eos_all_carrying_loss(tokenizer, text):
    result = to_record(TextExample(text=text), tokenizer, loss_on="completion")

    assert tokenizer.decode(result.input_ids) == "<s>hello world</s>"
    assert result.input_ids.count(tokenizer.bos_token_id) == 1
    assert result.input_ids.count(tokenizer.eos_token_id) == 1
    assert result.labels == result.input_ids


def test_to_records_cuts_drops_and_counts(tokenizer):
    fits = TextExample(text="hello world")
    long = TextExample(text="The quick brown fox jumps over the lazy dog.")
    beyond = PromptCompletionExample(prompt="The quick brown fox jumps over", completion=" no")
    fits_ids = to_record(fits, tokenizer, loss_on="completion").input_ids
    long_ids = to_record(long, tokenizer, loss_on="completion").input_ids
    max_length = len(fits_ids)  # exactly at the limit: not truncated
    assert len(long_ids) > max_length

    stats = RecordStats()
    records = list(
        to_records(
            [fits, long, beyond],
            tokenizer,
            loss_on="completion",
            max_length=max_length,
            stats=stats,
        )
    )

    assert records == [
        {"input_ids": fits_ids, "labels": fits_ids},
        {"input_ids": long_ids[:max_length], "labels": long_ids[:max_length]},
    ]
    assert stats == RecordStats(examples=3, truncated=2, dropped=1, tokens=2 * max_length)


def test_to_records_keeps_a_truncated_example_with_loss_left(tokenizer):
    example = PromptCompletionExample(prompt="2+2=", completion="4 and 4 and 4")
    full = to_record(example, tokenizer, loss_on="completion")
    stats = RecordStats()

    (kept,) = to_records([example], tokenizer, loss_on="completion", max_length=6, stats=stats)

    assert kept == {"input_ids": full.input_ids[:6], "labels": full.labels[:6]}
    assert tokenizer.decode(kept["input_ids"]) == "<s>2+2=4"
    assert loss_segments(tokenizer, Record(**kept)) == ["4"]
    assert stats == RecordStats(examples=1, truncated=1, dropped=0, tokens=6)


@pytest.mark.parametrize(
    "not_fast",
    [SimpleNamespace(is_fast=False), SimpleNamespace()],
    ids=["is_fast false", "no is_fast"],
)
def test_to_records_refuses_a_tokenizer_that_is_not_fast(not_fast):
    records = to_records(
        [TextExample(text="hi")], not_fast, loss_on="all", max_length=16, stats=RecordStats()
    )

    with pytest.raises(RecordError, match="SimpleNamespace is not a fast tokenizer"):
        next(records)


def preference(*context: tuple[str, str], preferred: str, other: str) -> PreferenceExample:
    return PreferenceExample.model_validate(
        {
            "input": {"messages": [{"role": r, "content": c} for r, c in context]},
            "preferred_output": [{"role": "assistant", "content": preferred}],
            "non_preferred_output": [{"role": "assistant", "content": other}],
        }
    )


def test_a_preference_record_is_the_prompt_then_each_answer_with_its_end_of_turn(tokenizer):
    example = preference(SYSTEM, QUESTION, preferred="Paris.", other="I think it is Lyon.")
    pair = to_preference_record(example, tokenizer)
    assert tokenizer.decode(pair.prompt_ids) == chatml(SYSTEM, QUESTION) + "<|im_start|>assistant\n"
    # The answers are what DPO's loss is on: each answer's tokens, its end of turn included.
    assert tokenizer.decode(pair.chosen_ids) == "Paris.<|im_end|>\n"
    assert tokenizer.decode(pair.rejected_ids) == "I think it is Lyon.<|im_end|>\n"
    # Prompt + answer are exactly the ids of the whole conversation, as training tokenizes it.
    whole = to_record(chat(SYSTEM, QUESTION, ("assistant", "Paris.")), tokenizer, loss_on="all")
    assert pair.prompt_ids + pair.chosen_ids == whole.input_ids


def test_earlier_assistant_turns_of_a_preference_prompt_are_context(tokenizer):
    example = preference(
        QUESTION,
        ("assistant", "Paris."),
        ("user", "And Spain?"),
        preferred="Madrid.",
        other="Rome.",
    )
    pair = to_preference_record(example, tokenizer)
    assert "Paris." in tokenizer.decode(pair.prompt_ids)
    assert tokenizer.decode(pair.chosen_ids) == "Madrid.<|im_end|>\n"


def test_preference_records_are_cut_to_the_room_the_prompt_leaves_or_dropped(tokenizer):
    example = preference(QUESTION, preferred="Paris, the capital.", other="No idea.")
    pair = to_preference_record(example, tokenizer)
    prompt = len(pair.prompt_ids)
    stats = RecordStats()
    [cut] = to_records(
        [example], tokenizer, loss_on="completion", max_length=prompt + 3, stats=stats
    )
    assert cut["prompt_ids"] == pair.prompt_ids
    assert cut["chosen_ids"] == pair.chosen_ids[:3]
    assert cut["rejected_ids"] == pair.rejected_ids[:3]
    assert (stats.truncated, stats.dropped, stats.tokens) == (1, 0, 2 * (prompt + 3))
    assert sequence_tokens(cut) == 2 * (prompt + 3)
    dropped = RecordStats()
    assert (
        list(
            to_records([example], tokenizer, loss_on="completion", max_length=prompt, stats=dropped)
        )
        == []
    )
    assert (dropped.examples, dropped.dropped) == (1, 1)


def test_the_prompt_and_reference_of_each_format(tokenizer):
    bos = tokenizer.bos_token or ""
    opened = "<|im_start|>assistant\n"
    cases = [
        (chat(QUESTION, ANSWER), (chatml(QUESTION) + opened, "Paris.")),
        (
            chat(QUESTION, ANSWER, ("user", "And Spain?"), ("assistant", "Madrid.")),
            (chatml(QUESTION, ANSWER, ("user", "And Spain?")) + opened, "Madrid."),
        ),
        (
            PromptCompletionExample(prompt="2+2=", completion="4"),
            (bos + "2+2=", "4"),
        ),
        (
            InstructionExample(instruction="Add 2 and 2.", output="4"),
            (bos + instruction_prompt("Add 2 and 2."), "4"),
        ),
        (
            preference(QUESTION, preferred="Paris.", other="Lyon."),
            (chatml(QUESTION) + opened, "Paris."),
        ),
        (TextExample(text="Plain text has no prompt."), None),
    ]
    for example, expected in cases:
        assert prompt_and_reference(example, tokenizer) == expected, example


def test_a_chat_prompt_also_stops_at_the_end_of_turn_and_a_plain_one_at_eos_alone():
    eos, turn = frozenset({2}), Stops(ids=frozenset({7}), strings=("</turn>",))
    assert generation_stops(eos, turn, chat=True) == Stops(frozenset({2, 7}), ("</turn>",))
    assert generation_stops(eos, turn, chat=False) == Stops(frozenset({2}))
