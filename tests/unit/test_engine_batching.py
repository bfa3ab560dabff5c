"""The inference engine's queue and batching policy, without torch and without its thread:
requests are put on `_waiting` by hand and batches taken with `_take_batch`/`_next_batch`.

GenerationStream binds to the running event loop, so each test runs in `asyncio.run`."""

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from afina.core.job_config import QuantizationSettings
from afina.core.settings import Settings
from afina.core.storage import ArtifactStorage, adapter_key
from afina.serving.batch import serve_batch
from afina.serving.engine import InferenceEngine
from afina.serving.protocol import (
    AdapterSpec,
    BaseModelSpec,
    GenerationStream,
    InferenceError,
    ModelSpec,
    Prompt,
    SamplingParams,
)

PROMPT = Prompt(text="hi")
PARAMS = SamplingParams()


def in_event_loop(test: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Run an async test body with asyncio.run (no async pytest plugin is installed)."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return run


def engine(tmp_path: Path, **overrides: Any) -> InferenceEngine:
    settings = Settings(_env_file=None, data_dir=tmp_path, api_keys=[], **overrides)
    return InferenceEngine(settings, ArtifactStorage(str(tmp_path / "artifacts")))


def model(base: str = "base-a", adapter: str | None = None, bits: int | None = 4) -> ModelSpec:
    spec = BaseModelSpec(base, QuantizationSettings(bits=bits))
    if adapter is None:
        return ModelSpec(base, spec)
    return ModelSpec(adapter, spec, AdapterSpec(adapter_key(adapter), adapter))


def wait(queue: InferenceEngine, *models: ModelSpec, at: float | None = None):
    """Put a request for each model on the queue, oldest first; return their streams."""
    streams = [GenerationStream(spec, PROMPT, PARAMS) for spec in models]
    now = time.monotonic() if at is None else at
    queue._waiting.extend((now, stream) for stream in streams)
    return streams


def waiting(queue: InferenceEngine) -> list[GenerationStream]:
    return [stream for _, stream in queue._waiting]


@in_event_loop
async def test_a_batch_takes_only_the_oldest_requests_base_model(tmp_path):
    queue = engine(tmp_path)
    a1, b1, a2, b2, a3 = wait(
        queue, model("a"), model("b"), model("a", "ftjob-x"), model("b"), model("a")
    )
    assert queue._take_batch() == [a1, a2, a3]
    assert waiting(queue) == [b1, b2]  # left in their order
    assert queue._take_batch() == [b1, b2]
    assert waiting(queue) == []


@in_event_loop
async def test_the_same_weights_quantized_differently_are_two_bases(tmp_path):
    queue = engine(tmp_path)
    four, eight, four_again = wait(
        queue, model("a", bits=4), model("a", "ftjob-y", bits=8), model("a", "ftjob-z", bits=4)
    )
    assert queue._take_batch() == [four, four_again]
    assert waiting(queue) == [eight]


@in_event_loop
async def test_a_batch_has_at_most_max_batch_size_rows(tmp_path):
    queue = engine(tmp_path, max_batch_size=3)
    streams = wait(queue, *(model("a") for _ in range(5)))
    assert queue._take_batch() == streams[:3]
    assert waiting(queue) == streams[3:]
    assert queue._take_batch() == streams[3:]


@in_event_loop
async def test_a_batch_has_at_most_max_loaded_adapters_adapters(tmp_path):
    queue = engine(tmp_path, max_loaded_adapters=2)
    plain, one, two, three, one_again, plain_again, three_again = wait(
        queue,
        model("a"),
        model("a", "ftjob-one"),
        model("a", "ftjob-two"),
        model("a", "ftjob-three"),
        model("a", "ftjob-one"),
        model("a"),
        model("a", "ftjob-three"),
    )
    # Base-only rows take no adapter slot; a third adapter waits for the next batch.
    assert queue._take_batch() == [plain, one, two, one_again, plain_again]
    assert waiting(queue) == [three, three_again]
    assert queue._take_batch() == [three, three_again]


@in_event_loop
async def test_base_only_rows_do_not_count_against_the_adapter_limit(tmp_path):
    queue = engine(tmp_path, max_loaded_adapters=1)
    plain, x, plain_again, y, x_again = wait(
        queue,
        model("a"),
        model("a", "ftjob-x"),
        model("a"),
        model("a", "ftjob-y"),
        model("a", "ftjob-x"),
    )
    assert queue._take_batch() == [plain, x, plain_again, x_again]
    assert waiting(queue) == [y]


@in_event_loop
async def test_the_batch_size_limit_keeps_the_queue_order(tmp_path):
    queue = engine(tmp_path, max_batch_size=2, max_loaded_adapters=1)
    x, y, plain, x_again = wait(
        queue, model("a", "ftjob-x"), model("a", "ftjob-y"), model("a"), model("a", "ftjob-x")
    )
    assert queue._take_batch() == [x, plain]
    assert waiting(queue) == [y, x_again]


@in_event_loop
async def test_cancelled_requests_are_dropped_before_the_batch_is_chosen(tmp_path):
    queue = engine(tmp_path, batch_window_ms=0)
    a1, b1, a2, b2 = wait(queue, model("a"), model("b"), model("a"), model("b"))
    a1.cancel()
    b2.cancel()
    # The oldest live request is b1's: its base is the batch's.
    assert queue._next_batch() == [b1]
    assert waiting(queue) == [a2]
    assert queue._next_batch() == [a2]
    assert waiting(queue) == []


@in_event_loop
async def test_a_request_older_than_the_window_is_taken_at_once(tmp_path):
    queue = engine(tmp_path, batch_window_ms=10_000)
    (stream,) = wait(queue, model("a"), at=time.monotonic() - 10)
    started = time.monotonic()
    assert queue._next_batch() == [stream]
    assert time.monotonic() - started < 1


@in_event_loop
async def test_a_full_batch_does_not_wait_for_the_window(tmp_path):
    queue = engine(tmp_path, batch_window_ms=10_000, max_batch_size=2)
    streams = wait(queue, model("a"), model("a"), model("a"))
    started = time.monotonic()
    assert queue._next_batch() == streams[:2]
    assert time.monotonic() - started < 1


@in_event_loop
async def test_a_lone_fresh_request_waits_the_window_for_company(tmp_path):
    queue = engine(tmp_path, batch_window_ms=300)
    started = time.monotonic()
    (stream,) = wait(queue, model("a"), at=started)
    assert queue._next_batch() == [stream]
    assert time.monotonic() - started >= 0.3


@in_event_loop
async def test_close_fails_the_waiting_requests_with_a_503(tmp_path):
    queue = engine(tmp_path)
    streams = wait(queue, model("a"), model("b", "ftjob-x"))
    queue.close()
    assert waiting(queue) == []
    for stream in streams:
        with pytest.raises(InferenceError) as failed:
            await asyncio.wait_for(stream.next_event(), 5)
        assert failed.value.status_code == 503
        assert failed.value.code == "shutting_down"
    assert queue._next_batch() is None  # the engine loop ends
    with pytest.raises(InferenceError) as refused:
        queue.submit(model("a"), PROMPT, PARAMS)
    assert (refused.value.status_code, refused.value.code) == (503, "shutting_down")
    assert queue._thread is None


@in_event_loop
async def test_a_full_queue_refuses_with_a_429_before_starting_anything(tmp_path):
    queue = engine(tmp_path, max_queued_generations=2)
    streams = wait(queue, model("a"), model("a"))
    with pytest.raises(InferenceError) as refused:
        queue.submit(model("a"), PROMPT, PARAMS)
    assert refused.value.status_code == 429
    assert refused.value.code == "too_many_requests"
    assert "AFINA_MAX_QUEUED_GENERATIONS" in refused.value.message
    assert waiting(queue) == streams
    assert queue._thread is None


@in_event_loop
async def test_an_engine_found_unavailable_refuses_new_requests(tmp_path):
    queue = engine(tmp_path)
    queue._unavailable = InferenceError(503, "no torch here", code="inference_unavailable")
    with pytest.raises(InferenceError) as refused:
        queue.submit(model("a"), PROMPT, PARAMS)
    assert refused.value is queue._unavailable
    assert waiting(queue) == []
    assert queue._thread is None


class _UnloadableCache:
    def base(self, spec: BaseModelSpec) -> Any:
        raise InferenceError(409, "cannot load", code="model_load_failed")


@in_event_loop
async def test_a_model_that_cannot_load_is_an_error_in_the_field_that_named_it():
    by_name, by_job = model(), ModelSpec("ft:x", model().base, param="job_id")
    streams = [GenerationStream(spec, PROMPT, PARAMS) for spec in (by_name, by_job)]
    serve_batch(_UnloadableCache(), streams, max_new_tokens=8)  # type: ignore[arg-type]
    errors = []
    for stream in streams:
        with pytest.raises(InferenceError) as raised:
            await stream.next_event()
        errors.append((raised.value.param, raised.value.code))
    assert errors == [("model", "model_load_failed"), ("job_id", "model_load_failed")]
