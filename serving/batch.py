"""Serving one batch: load what it needs, turn each request into a row, decode them together.

A request that cannot be served (its adapter is missing, its prompt too long) gets its
error and leaves the batch; the others go on. Nothing here raises to the engine's loop.
"""

import hashlib
import logging
import secrets

import torch

from afina.core.chat_format import generation_stops
from afina.serving import metrics
from afina.serving.decoding import Row, generate
from afina.serving.model_cache import NO_ADAPTER, LoadedBase, ModelCache
from afina.serving.prompts import prompt_ids
from afina.serving.protocol import (
    GenerationStream,
    InferenceError,
    Prompt,
    Started,
    internal_error,
)
from afina.serving.text import IncrementalText

logger = logging.getLogger(__name__)

MAX_CHARACTERS_PER_TOKEN = 64  # above any tokenizer's longest token


def _generator_seed(seed: int | None) -> int:
    """A request's seed (any int64 or uint64) as a distinct generator seed: torch folds
    some values together (0, 2**63 and -2**63 give the same numbers)."""
    if seed is None:
        return secrets.randbits(62)
    digest = hashlib.blake2b(str(seed).encode(), digest_size=8).digest()
    return int.from_bytes(digest) >> 2


def _check_size(prompt: Prompt, context_length: int | None) -> None:
    """Refuse, before tokenizing it on the engine thread (where everyone waits), a prompt
    too long for the context whatever its tokens."""
    characters = len(prompt.text or "") + sum(len(text) for _, text in prompt.messages or ())
    if context_length is not None and characters > context_length * MAX_CHARACTERS_PER_TOKEN:
        raise InferenceError(
            400,
            f"the prompt is {characters} characters: far more than the model's context of "
            f"{context_length} tokens holds",
            param=prompt.param,
            code="context_length_exceeded",
        )


def _about_model(error: InferenceError, stream: GenerationStream) -> InferenceError:
    """A model that cannot be served is an error in the request field that named it."""
    return InferenceError(
        error.status_code, error.message, param=stream.model.param, code=error.code
    )


def _row(models: ModelCache, base: LoadedBase, stream: GenerationStream, ceiling: int) -> Row:
    prompt, params = stream.prompt, stream.params
    _check_size(prompt, base.context_length)
    adapter, vocabulary = NO_ADAPTER, base.vocabulary
    if stream.model.adapter is not None:
        try:
            adapter, vocabulary = models.adapter(base, stream.model.adapter)
        except InferenceError as error:
            raise _about_model(error, stream) from error
    tokenizer = vocabulary.tokenizer
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
    stops = generation_stops(
        vocabulary.eos, vocabulary.end_of_turn, chat=prompt.messages is not None
    )
    stop_ids = frozenset() if params.ignore_eos else stops.ids
    stop_strings = params.stop + stops.strings
    generator = None
    if params.temperature > 0:
        generator = torch.Generator().manual_seed(_generator_seed(params.seed))
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
            stream.post(_about_model(error, stream))
        return
    rows = []
    for stream in batch:
        try:
            rows.append(_row(models, base, stream, max_new_tokens))
        except InferenceError as error:
            stream.post(error)
        except Exception:
            logger.exception("preparing a generation request failed")
            stream.post(internal_error())
    for row in rows:
        row.stream.post(Started(prompt_tokens=len(row.prompt_ids)))
    if not rows:
        return
    metrics.BATCH_SIZE.observe(len(rows))
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
            failure = internal_error()
        for row in rows:
            if not row.finished:
                row.stream.post(failure)
