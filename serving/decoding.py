"""Decoding a batch of rows together, each with its own adapter, sampling, stops and length.

Prompts are left-padded to one width and prefilled in one forward pass; then every step
feeds each row's last token. A row that finishes (or whose client went away) leaves the
batch, and the KV cache drops it, so the rest keep going at the cost of the rows still there.
Each step counts its tokens and times them (`serving.metrics`): the first step's tokens from
their requests' submission, the later ones from the step before.
"""

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from afina.serving import metrics
from afina.serving.protocol import (
    Delta,
    Finished,
    FinishReason,
    GenerationStream,
    InferenceError,
    Usage,
    internal_error,
)
from afina.serving.text import IncrementalText

logger = logging.getLogger(__name__)


@dataclass
class Row:
    stream: GenerationStream
    adapter: str
    prompt_ids: list[int]
    max_new_tokens: int
    stop_ids: frozenset[int]
    text: IncrementalText
    temperature: float = 0.0
    top_p: float = 1.0
    generator: torch.Generator | None = None  # None: greedy
    generated: int = 0
    last_token: int = -1
    finished: bool = field(default=False)

    def accept(self, token: int) -> bool:
        """Take the next token; True once the row is done."""
        self.generated += 1
        self.last_token = token
        if token in self.stop_ids:
            return self._finish("stop")
        delta = self.text.add(token)
        if delta:
            self.stream.post(Delta(delta))
        if self.text.stopped:
            return self._finish("stop")
        if self.generated >= self.max_new_tokens:
            return self._finish("length")
        return False

    def fail(self, error: InferenceError) -> None:
        self.stream.post(error)
        self.finished = True

    def _finish(self, reason: FinishReason) -> bool:
        rest = self.text.flush()
        if rest:
            self.stream.post(Delta(rest))
        self.stream.post(Finished(reason, Usage(len(self.prompt_ids), self.generated)))
        self.finished = True
        return True


def _sample(scores: torch.Tensor, row: Row) -> int:
    """One token from a row's logits (float32, on the CPU): softmax at its temperature, cut
    to its top-p nucleus, drawn with its own generator (so a seed gives the same text in any
    batch)."""
    # Shifted so the best score is 0: a tiny temperature then gives -inf, never inf - inf.
    # In float64, where no valid temperature underflows to 0 (1e-46 does in float32, and 0/0
    # would make the best token's probability NaN): a tiny temperature is greedy.
    shifted = scores.double() - scores.max().double()
    probabilities = torch.softmax(shifted / row.temperature, dim=-1)
    if row.top_p < 1:
        ordered, order = probabilities.sort(descending=True)
        outside = ordered.cumsum(0) - ordered > row.top_p  # the first token always stays
        ordered[outside] = 0
        probabilities = torch.zeros_like(probabilities).scatter(0, order, ordered)
    return int(torch.multinomial(probabilities, 1, generator=row.generator))


def _advance(logits: torch.Tensor, rows: Sequence[Row]) -> list[int]:
    """Give each row its next token; the indexes of the rows still going. A row that fails
    here gets its error and leaves; the others go on."""
    greedy = logits.argmax(dim=-1).tolist()
    sampling = [i for i, row in enumerate(rows) if row.generator is not None]
    # One copy off the device for the rows that sample, not one per row.
    scores = dict(zip(sampling, logits[sampling].float().cpu(), strict=True)) if sampling else {}
    going = []
    for i, row in enumerate(rows):
        try:
            token = _sample(scores[i], row) if i in scores else greedy[i]
            done = row.accept(token)
        except Exception:
            logger.exception("decoding a row failed")
            row.fail(internal_error())
            done = True
        if done:
            continue
        if row.stream.cancelled:
            row.stream.drop()
        else:
            going.append(i)
    return going


def generate(model: torch.nn.Module, rows: list[Row], *, pad_id: int, by_adapter: bool) -> None:
    """Run the rows until each has finished or been cancelled; events go to their streams.
    `by_adapter`: the model is a peft model and each row names its adapter."""
    device = next(model.parameters()).device
    width = max(len(row.prompt_ids) for row in rows)
    input_ids = torch.tensor(
        [[pad_id] * (width - len(r.prompt_ids)) + r.prompt_ids for r in rows], device=device
    )
    mask = torch.tensor(
        [[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in rows], device=device
    )
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)

    def forward(tokens: torch.Tensor) -> torch.Tensor:
        extra = {"adapter_names": [row.adapter for row in rows]} if by_adapter else {}
        output = model(
            input_ids=tokens,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
            **extra,
        )
        return output.logits[:, -1, :]

    with torch.inference_mode():
        logits = forward(input_ids)
        last = None  # when the rows got their last token
        while True:
            keep = _advance(logits, rows)
            now = time.perf_counter()
            metrics.TOKENS.inc(len(rows))
            if last is None:
                metrics.first_tokens((row.stream.submitted_at for row in rows), now)
            else:
                metrics.next_tokens(len(rows), now - last)
            last = now
            if not keep:
                return
            if len(keep) < len(rows):
                index = torch.tensor(keep, device=device)
                cache.batch_select_indices(index)
                mask, positions = mask[index], positions[index]
                rows = [rows[i] for i in keep]
            mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=-1)
            positions = positions[:, -1:] + 1
            tokens = torch.tensor([row.last_token for row in rows], device=device)
            logits = forward(tokens[:, None])
