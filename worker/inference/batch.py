"""Serving one batch: load what it needs, turn each request into a row, decode them together.

A request that cannot be served (its adapter is missing, its prompt too long) gets its
error and leaves the batch; the others go on. Nothing here raises to the engine's loop.
"""

import logging
import secrets

import torch

from afina.worker.inference.decoding import Row, generate
from afina.worker.inference.models import NO_ADAPTER, LoadedBase, ModelCache
from afina.worker.inference.prompts import prompt_ids
from afina.worker.inference.protocol import GenerationStream, InferenceError, Started
from afina.worker.inference.text import IncrementalText

logger = logging.getLogger(__name__)


def _row(models: ModelCache, base: LoadedBase, stream: GenerationStream, ceiling: int) -> Row:
    adapter, vocabulary = NO_ADAPTER, base.vocabulary
    if stream.model.adapter is not None:
        adapter, vocabulary = models.adapter(base, stream.model.adapter)
    tokenizer, prompt, params = vocabulary.tokenizer, stream.prompt, stream.params
    ids = prompt_ids(tokenizer, prompt)
    room = ceiling if base.context_length is None else base.context_length - len(ids)
    if room < 1:
        raise InferenceError(
            400,
            f"the prompt is {len(ids)} tokens and the model's context is "
            f"{base.context_length}: shorten it",
            param=prompt.param,
            code="context_length_exceeded",
        )
    wanted = params.max_new_tokens
    if wanted is not None and wanted > room:
        raise InferenceError(
            400,
            f"the prompt is {len(ids)} tokens, so at most {room} more fit in the model's "
            f"context of {base.context_length}; {params.max_tokens_param} asks for {wanted}",
            param=params.max_tokens_param,
            code="context_length_exceeded",
        )
    chat = prompt.messages is not None
    stop_ids = vocabulary.eos | (vocabulary.end_of_turn.ids if chat else frozenset())
    if params.ignore_eos:
        stop_ids = frozenset()
    stop_strings = params.stop + (vocabulary.end_of_turn.strings if chat else ())
    generator = None
    if params.temperature > 0:
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        generator = torch.Generator().manual_seed(seed)
    return Row(
        stream=stream,
        adapter=adapter,
        prompt_ids=ids,
        max_new_tokens=min(wanted or params.default_max_new_tokens or ceiling, ceiling, room),
        stop_ids=stop_ids,
        text=IncrementalText(
            lambda token_ids: tokenizer.decode(token_ids, skip_special_tokens=True),
            stop_strings,
        ),
        temperature=params.temperature,
        top_p=params.top_p,
        generator=generator,
    )


def serve_batch(models: ModelCache, batch: list[GenerationStream], max_new_tokens: int) -> None:
    """Answer every request of the batch (all on one base model)."""
    try:
        base = models.base(batch[0].model.base)
    except InferenceError as error:
        for stream in batch:
            stream.post(error)
        return
    rows = []
    for stream in batch:
        try:
            rows.append(_row(models, base, stream, max_new_tokens))
        except InferenceError as error:
            stream.post(error)
    for row in rows:
        row.stream.post(Started(prompt_tokens=len(row.prompt_ids), batch_size=len(rows)))
    if not rows:
        return
    try:
        generate(
            base.model,
            rows,
            pad_id=base.vocabulary.tokenizer.pad_token_id or 0,
            by_adapter=base.takes_adapter_names,
        )
    except Exception as error:
        if isinstance(error, torch.OutOfMemoryError | MemoryError):
            failure = InferenceError(
                503,
                "out of memory while generating: retry with fewer tokens or fewer requests "
                "at once (AFINA_MAX_BATCH_SIZE)",
                code="out_of_memory",
            )
        else:
            logger.exception("generation failed")
            failure = InferenceError(
                500, "The server had an error while generating.", code="internal_error"
            )
        for row in rows:
            if not row.finished:
                row.stream.post(failure)
