"""Dataset examples -> token ids and labels for the trainer.

Each example is rendered to one text, with the character spans that carry loss:
- chat: the tokenizer's chat template (ChatML when it has none); loss on each assistant
  turn's content and end-of-turn marker, not on the template's "assistant" header; a turn
  with `weight: 0` carries none;
- prompt-completion: BOS + prompt + completion + EOS, loss on completion + EOS;
- instruction: the Alpaca prompt, loss on output + EOS;
- text: BOS + text + EOS, loss on all of it.
With `loss_on="all"` every token carries loss. The text is tokenized once, as a whole, and the
spans are mapped to tokens through the offset mapping, so the ids are exactly those the model
sees at inference; labels are -100 where no loss applies.
"""

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from afina.core.chat_format import bos_prefix, prompt_text
from afina.core.datasets import (
    ChatExample,
    Example,
    InstructionExample,
    PromptCompletionExample,
    TextExample,
)

IGNORE_INDEX = -100
LossOn = Literal["completion", "all"]

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


class RecordError(ValueError):
    """An example the tokenizer or its chat template cannot turn into a record."""


@dataclass(frozen=True)
class Record:
    input_ids: list[int]
    labels: list[int]


def instruction_prompt(instruction: str, input_text: str = "") -> str:
    if input_text:
        return ALPACA_PROMPT.format(instruction=instruction, input=input_text)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def _eos(tokenizer: Any, text: str) -> str:
    eos = tokenizer.eos_token
    return "" if not eos or text.endswith(eos) else eos


def _render_chat(example: ChatExample, tokenizer: Any) -> tuple[str, list[tuple[int, int]]]:
    messages = [{"role": m.role, "content": m.content} for m in example.messages]

    def render(upto: int, generation_prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(
                messages[:upto], tokenize=False, add_generation_prompt=generation_prompt
            )
        except Exception as error:
            raise RecordError(f"the chat template failed: {error}") from error

    text = render(len(messages), False)
    spans = []
    for index, message in enumerate(example.messages):
        if message.role != "assistant" or message.weight == 0:
            continue
        through = render(index + 1, False)
        # A template cannot render an empty conversation: an opening assistant turn's text
        # starts where its content does.
        if index:
            before = render(index, True)
            start = len(before) if through.startswith(before) else -1
        else:
            start = through.rfind(message.content)
        if start < 0 or not text.startswith(through):
            raise RecordError(
                "the chat template does not render a conversation as the sum of its turns, "
                "so afina cannot tell which tokens are the assistant's"
            )
        spans.append((start, len(through)))
    return text, spans


def render(example: Example, tokenizer: Any) -> tuple[str, list[tuple[int, int]]]:
    """The example's training text and the character spans that carry loss."""
    if isinstance(example, ChatExample):
        return _render_chat(example, tokenizer)
    if isinstance(example, TextExample):
        text = bos_prefix(tokenizer, example.text) + example.text
        text += _eos(tokenizer, text)
        return text, [(0, len(text))]
    if isinstance(example, PromptCompletionExample):
        prompt, completion = example.prompt, example.completion
    elif isinstance(example, InstructionExample):
        prompt, completion = instruction_prompt(example.instruction, example.input), example.output
    else:
        raise TypeError(f"not a dataset example: {type(example).__name__}")
    prompt = prompt_text(tokenizer, prompt)
    text = prompt + completion
    text += _eos(tokenizer, text)
    return text, [(len(prompt), len(text))]


def _overlaps(token: tuple[int, int], span: tuple[int, int]) -> bool:
    """Whether a token's characters reach into a loss span. A token that BPE merged across
    the boundary (" Paris" after "Answer:") is the first one to learn."""
    (begin, end), (start, stop) = token, span
    if begin == end:
        return start <= begin < stop
    return max(begin, start) < min(end, stop)


def to_record(example: Example, tokenizer: Any, *, loss_on: LossOn) -> Record:
    text, spans = render(example, tokenizer)
    if loss_on == "all":
        spans = [(0, len(text))]
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoding["input_ids"])
    labels = [
        token if any(_overlaps(offsets, span) for span in spans) else IGNORE_INDEX
        for token, offsets in zip(input_ids, encoding["offset_mapping"], strict=True)
    ]
    return Record(input_ids=input_ids, labels=labels)


@dataclass
class RecordStats:
    examples: int = 0
    truncated: int = 0
    dropped: int = 0
    tokens: int = 0


def to_records(
    examples: Iterable[Example],
    tokenizer: Any,
    *,
    loss_on: LossOn,
    max_length: int,
    stats: RecordStats,
) -> Iterator[dict[str, list[int]]]:
    """Records cut to `max_length` tokens; an example left with no token carrying loss is
    dropped. `stats` counts what happened, for the job's events."""
    if not getattr(tokenizer, "is_fast", False):
        raise RecordError(
            f"the tokenizer {type(tokenizer).__name__} is not a fast tokenizer: afina needs "
            "its offset mapping to place the loss"
        )
    for example in examples:
        stats.examples += 1
        record = to_record(example, tokenizer, loss_on=loss_on)
        input_ids, labels = record.input_ids, record.labels
        if len(input_ids) > max_length:
            stats.truncated += 1
            input_ids, labels = input_ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels):
            stats.dropped += 1
            continue
        stats.tokens += len(input_ids)
        yield {"input_ids": input_ids, "labels": labels}
