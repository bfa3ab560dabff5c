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

A preference example (for DPO) becomes the prompt's ids and the ids of each answer after it,
`prompt_ids`, `chosen_ids` and `rejected_ids`, as trl's DPOTrainer takes them: each answer is
rendered as the conversation's next assistant turn, the way a chat example is, and the answers'
ids (the loss of DPO) are the tokens that turn's loss span covers.
"""

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from afina.core.chat_format import bos_prefix, prompt_text
from afina.core.datasets import (
    ChatExample,
    ChatMessage,
    Example,
    InstructionExample,
    PreferenceExample,
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


def _chat_text(tokenizer: Any, messages: list[ChatMessage], *, generation_prompt: bool) -> str:
    """The conversation through the tokenizer's chat template; with `generation_prompt`, the
    assistant's turn opened after it."""
    try:
        return tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages],
            tokenize=False,
            add_generation_prompt=generation_prompt,
        )
    except Exception as error:  # jinja raises on conversations a template refuses
        raise RecordError(f"the chat template failed: {error}") from error


def _render_chat(example: ChatExample, tokenizer: Any) -> tuple[str, list[tuple[int, int]]]:
    messages = example.messages

    def render(upto: int, generation_prompt: bool) -> str:
        return _chat_text(tokenizer, messages[:upto], generation_prompt=generation_prompt)

    text = render(len(messages), False)
    spans = []
    for index, message in enumerate(messages):
        if message.role != "assistant" or message.weight == 0:
            continue
        through = text if index + 1 == len(messages) else render(index + 1, False)
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


def _prompt_and_completion(example: Example, tokenizer: Any) -> tuple[str, str] | None:
    """A prompt-completion or instruction example's prompt, as training renders it (BOS
    first), and what follows it."""
    if isinstance(example, PromptCompletionExample):
        prompt, completion = example.prompt, example.completion
    elif isinstance(example, InstructionExample):
        prompt, completion = instruction_prompt(example.instruction, example.input), example.output
    else:
        return None
    return prompt_text(tokenizer, prompt), completion


def render(example: Example, tokenizer: Any) -> tuple[str, list[tuple[int, int]]]:
    """The example's training text and the character spans that carry loss."""
    if isinstance(example, ChatExample):
        return _render_chat(example, tokenizer)
    if isinstance(example, TextExample):
        text = bos_prefix(tokenizer, example.text) + example.text
        text += _eos(tokenizer, text)
        return text, [(0, len(text))]
    prompted = _prompt_and_completion(example, tokenizer)
    if prompted is None:
        raise TypeError(f"not a dataset example: {type(example).__name__}")
    prompt, completion = prompted
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


@dataclass(frozen=True)
class PreferenceRecord:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


def _answer_record(
    conversation: list[ChatMessage], answer: list[ChatMessage], tokenizer: Any
) -> tuple[list[int], int]:
    """The ids of the conversation followed by `answer`, and where the answer's loss starts.
    Earlier assistant turns of the conversation are context, not loss."""
    context = [
        message.model_copy(update={"weight": 0}) if message.role == "assistant" else message
        for message in conversation
    ]
    record = to_record(ChatExample(messages=[*context, *answer]), tokenizer, loss_on="completion")
    start = next(i for i, label in enumerate(record.labels) if label != IGNORE_INDEX)
    return record.input_ids, start


def _common_prefix(first: list[int], second: list[int]) -> int:
    length = 0
    for a, b in zip(first, second, strict=False):
        if a != b:
            break
        length += 1
    return length


def to_preference_record(example: PreferenceExample, tokenizer: Any) -> PreferenceRecord:
    """The prompt's ids, shared by both answers, and each answer's ids after it."""
    messages = example.input.messages
    chosen, chosen_start = _answer_record(messages, example.preferred_output, tokenizer)
    rejected, rejected_start = _answer_record(messages, example.non_preferred_output, tokenizer)
    # Where BPE merged the prompt's end into an answer, the prompt ends before the merge.
    prompt_length = min(chosen_start, rejected_start, _common_prefix(chosen, rejected))
    return PreferenceRecord(
        prompt_ids=chosen[:prompt_length],
        chosen_ids=chosen[prompt_length:],
        rejected_ids=rejected[prompt_length:],
    )


def sequence_tokens(record: dict[str, list[int]]) -> int:
    """The tokens the trainer runs for a record: a preference record's two answers are two
    rows after the same prompt, each padded to the longer one."""
    if "prompt_ids" in record:
        answer = max(len(record["chosen_ids"]), len(record["rejected_ids"]))
        return 2 * (len(record["prompt_ids"]) + answer)
    return len(record["input_ids"])


def prompt_and_reference(example: Example, tokenizer: Any) -> tuple[str, str] | None:
    """The prompt text a model answers, as training rendered it, and the answer the dataset
    gives for it: the last assistant turn of a chat, a completion, an output, the preferred
    answer. None for plain text, which has no prompt."""
    if isinstance(example, ChatExample):
        last = max(i for i, m in enumerate(example.messages) if m.role == "assistant")
        context, answer = example.messages[:last], [example.messages[last]]
    elif isinstance(example, PreferenceExample):
        context, answer = example.input.messages, example.preferred_output
    else:
        return _prompt_and_completion(example, tokenizer)
    if not context:
        return None
    prompt = _chat_text(tokenizer, context, generation_prompt=True)
    return prompt, "".join(message.content for message in answer)


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
    dropped (a preference example whose prompt alone fills `max_length`: its answers are
    cut to what is left of it). `stats` counts what happened, for the job's events."""
    if not getattr(tokenizer, "is_fast", False):
        raise RecordError(
            f"the tokenizer {type(tokenizer).__name__} is not a fast tokenizer: afina needs "
            "its offset mapping to place the loss"
        )
    for example in examples:
        stats.examples += 1
        if isinstance(example, PreferenceExample):
            pair = _cut_pair(to_preference_record(example, tokenizer), max_length, stats)
            if pair is not None:
                stats.tokens += sequence_tokens(pair)
                yield pair
            continue
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


def _cut_pair(
    record: PreferenceRecord, max_length: int, stats: RecordStats
) -> dict[str, list[int]] | None:
    room = max_length - len(record.prompt_ids)
    if room <= 0:
        stats.dropped += 1
        return None
    if max(len(record.chosen_ids), len(record.rejected_ids)) > room:
        stats.truncated += 1
    return {
        "prompt_ids": record.prompt_ids,
        "chosen_ids": record.chosen_ids[:room],
        "rejected_ids": record.rejected_ids[:room],
    }
