"""The end-of-run evaluation a practitioner reads: the fine-tuned model's answers to held-out
prompts beside the base model's and the dataset's own, greedy, with the template training used.
The base model is the same weights with the adapter switched off, so nothing is loaded twice.
"""

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import torch

from afina.core.chat_format import end_of_turn, eos_ids
from afina.core.datasets import read_examples
from afina.core.job_config import EvaluationSettings
from afina.core.records import prompt_and_reference

BATCH_SIZE = 8


def sample_prompts(
    open_data: Callable[[], BinaryIO], tokenizer: Any, samples: int, *, max_line_bytes: int
) -> list[dict[str, Any]]:
    """The first `samples` examples of the file that have a prompt (plain text has none):
    each as its 1-based position among the file's examples, prompt text and reference."""
    prompts: list[dict[str, Any]] = []
    if samples == 0:
        return prompts
    with open_data() as stream:
        for index, example in enumerate(read_examples(stream, max_line_bytes=max_line_bytes)):
            found = prompt_and_reference(example, tokenizer)
            if found is not None:
                prompts.append({"example": index + 1, "prompt": found[0], "reference": found[1]})
                if len(prompts) == samples:
                    break
    return prompts


@contextmanager
def _left_padded(tokenizer: Any) -> Iterator[None]:
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        yield
    finally:
        tokenizer.padding_side = side


def _answers(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int) -> list[str]:
    stops = end_of_turn(tokenizer)
    stop_ids = sorted(eos_ids(model, tokenizer) | stops.ids)
    device = next(model.parameters()).device
    answers = []
    with _left_padded(tokenizer), torch.no_grad():
        for start in range(0, len(prompts), BATCH_SIZE):
            batch = tokenizer(
                prompts[start : start + BATCH_SIZE],
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
            ).to(device)
            output = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=stop_ids or None,
                pad_token_id=tokenizer.pad_token_id,
            )
            for row in output[:, batch["input_ids"].shape[1] :]:
                text = tokenizer.decode(row, skip_special_tokens=True)
                for marker in stops.strings:
                    text = text.split(marker, 1)[0]
                answers.append(text)
    return answers


def write_generations(
    model: Any,
    tokenizer: Any,
    prompts: list[dict[str, Any]],
    settings: EvaluationSettings,
    path: Path,
) -> float:
    """Write one JSON line per prompt with the fine-tuned and the base model's answers;
    the seconds it took."""
    started = time.monotonic()
    texts = [prompt["prompt"] for prompt in prompts]
    model.eval()
    use_cache = model.config.use_cache
    model.config.use_cache = True  # training turns the cache off
    try:
        tuned = _answers(model, tokenizer, texts, settings.max_new_tokens)
        with model.disable_adapter():
            base = _answers(model, tokenizer, texts, settings.max_new_tokens)
    finally:
        model.config.use_cache = use_cache
    with path.open("w", encoding="utf-8") as out:
        for prompt, tuned_answer, base_answer in zip(prompts, tuned, base, strict=True):
            line = {**prompt, "fine_tuned_model": tuned_answer, "base_model": base_answer}
            out.write(json.dumps(line, ensure_ascii=False) + "\n")
    return time.monotonic() - started
