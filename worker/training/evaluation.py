"""The end-of-run evaluation a practitioner reads: the fine-tuned model's answers to held-out
prompts beside the base model's and the dataset's own, greedy, with the template training used
and the stops serving uses. The base model is the same weights with the adapter switched off,
so nothing is loaded twice.
"""

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from afina.core.chat_format import Stops, end_of_turn, eos_ids, generation_stops
from afina.core.datasets import ChatExample, PreferenceExample, read_examples
from afina.core.job_config import EvaluationSettings
from afina.core.records import prompt_and_reference

BATCH_SIZE = 8


@dataclass(frozen=True)
class Sample:
    example: int  # 1-based position among the file's examples
    prompt: str
    reference: str
    chat: bool  # rendered through the chat template: its end of turn stops the answer


def sample_prompts(
    open_data: Callable[[], BinaryIO], tokenizer: Any, samples: int, *, max_line_bytes: int
) -> list[Sample]:
    """The first `samples` (one or more) examples of the file that have a prompt (plain
    text has none)."""
    found: list[Sample] = []
    with open_data() as stream:
        for index, example in enumerate(read_examples(stream, max_line_bytes=max_line_bytes)):
            prompted = prompt_and_reference(example, tokenizer)
            if prompted is not None:
                chat = isinstance(example, ChatExample | PreferenceExample)
                found.append(Sample(index + 1, *prompted, chat=chat))
                if len(found) == samples:
                    break
    return found


@contextmanager
def _left_padded(tokenizer: Any) -> Iterator[None]:
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        yield
    finally:
        tokenizer.padding_side = side


def _batches(samples: list[Sample]) -> Iterator[list[Sample]]:
    """Batches of prompts that stop alike (chat or plain), in the samples' order."""
    for chat in (True, False):
        alike = [sample for sample in samples if sample.chat == chat]
        for start in range(0, len(alike), BATCH_SIZE):
            yield alike[start : start + BATCH_SIZE]


def _generate(
    model: Any, tokenizer: Any, inputs: Any, stops: Stops, max_new_tokens: int
) -> list[str]:
    output = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=sorted(stops.ids) or None,
        pad_token_id=tokenizer.pad_token_id,
    )
    texts = []
    for row in output[:, inputs["input_ids"].shape[1] :]:
        text = tokenizer.decode(row, skip_special_tokens=True)
        for marker in stops.strings:
            text = text.split(marker, 1)[0]
        texts.append(text)
    return texts


def _answers(
    model: Any, tokenizer: Any, samples: list[Sample], max_new_tokens: int
) -> dict[Sample, tuple[str, str]]:
    """Each sample's answers from the fine-tuned adapter and from the base, each batch
    tokenized once for both."""
    eos, turn = eos_ids(model, tokenizer), end_of_turn(tokenizer)
    device = next(model.parameters()).device
    answers: dict[Sample, tuple[str, str]] = {}
    with _left_padded(tokenizer), torch.no_grad():
        for batch in _batches(samples):
            stops = generation_stops(eos, turn, chat=batch[0].chat)
            prompts = [sample.prompt for sample in batch]
            inputs = tokenizer(
                prompts, return_tensors="pt", padding=True, add_special_tokens=False
            ).to(device)
            tuned = _generate(model, tokenizer, inputs, stops, max_new_tokens)
            with model.disable_adapter():
                base = _generate(model, tokenizer, inputs, stops, max_new_tokens)
            answers.update(zip(batch, zip(tuned, base, strict=True), strict=True))
    return answers


def write_generations(
    model: Any,
    tokenizer: Any,
    samples: list[Sample],
    settings: EvaluationSettings,
    path: Path,
) -> float:
    """Write one JSON line per sample with the fine-tuned and the base model's answers;
    the seconds it took."""
    started = time.monotonic()
    model.eval()
    use_cache = model.config.use_cache
    model.config.use_cache = True  # training turns the cache off
    try:
        answers = _answers(model, tokenizer, samples, settings.max_new_tokens)
    finally:
        model.config.use_cache = use_cache
    with path.open("w", encoding="utf-8") as out:
        for sample in samples:
            tuned, base = answers[sample]
            line = {
                "example": sample.example,
                "prompt": sample.prompt,
                "reference": sample.reference,
                "fine_tuned_model": tuned,
                "base_model": base,
            }
            out.write(json.dumps(line, ensure_ascii=False) + "\n")
    return time.monotonic() - started
