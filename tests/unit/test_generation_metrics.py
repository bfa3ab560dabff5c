"""The generation metrics (`serving.metrics`), driven through the engine's own paths without
torch: a request is counted once by how it ended, refusals and cancellations included, and
the token timings land in their histograms. The metrics are the process's: each test reads
what its steps added."""

import asyncio
import functools
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from afina.core.settings import Settings
from afina.core.storage import ArtifactStorage
from afina.serving import metrics
from afina.serving.engine import InferenceEngine
from afina.serving.protocol import (
    BaseModelSpec,
    Delta,
    Finished,
    GenerationStream,
    InferenceError,
    ModelSpec,
    Prompt,
    SamplingParams,
    Started,
    Usage,
)

MODEL = ModelSpec("base", BaseModelSpec("base"))


def in_event_loop(test: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """GenerationStream binds to the running event loop: run the test body in one."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return run


def outcomes() -> dict[str, float]:
    return {
        outcome: REGISTRY.get_sample_value("afina_generation_requests_total", {"outcome": outcome})
        for outcome in metrics.OUTCOMES
    }


def added(before: dict[str, float]) -> dict[str, float]:
    """What each outcome gained since `before`, those that gained nothing left out."""
    now = outcomes()
    return {
        outcome: now[outcome] - before[outcome]
        for outcome in now
        if now[outcome] != before[outcome]
    }


def stream() -> GenerationStream:
    return GenerationStream(MODEL, Prompt(text="hi"), SamplingParams())


def engine(tmp_path: Path, **overrides: Any) -> InferenceEngine:
    settings = Settings(_env_file=None, data_dir=tmp_path, api_keys=[], **overrides)
    return InferenceEngine(settings, ArtifactStorage(str(tmp_path / "artifacts")))


@in_event_loop
async def test_a_request_is_counted_once_by_how_it_ended():
    before = outcomes()
    stopped, cut, failed = stream(), stream(), stream()
    stopped.post(Started(prompt_tokens=3))
    stopped.post(Delta("yes"))
    stopped.post(Finished("stop", Usage(3, 2)))
    cut.post(Finished("length", Usage(3, 16)))
    failed.post(InferenceError(400, "too long", code="context_length_exceeded"))
    # a batch that fails after a row finished posts its error to every row: not counted again
    stopped.post(InferenceError(500, "internal", code="internal_error"))
    stopped.drop()  # nor dropped once its client goes
    assert added(before) == {"stop": 1, "length": 1, "error": 1}


@in_event_loop
async def test_a_request_cancelled_while_waiting_is_dropped_and_counted(tmp_path):
    queue = engine(tmp_path)
    before = outcomes()
    kept, gone = stream(), stream()
    queue._waiting.extend([(0.0, kept), (0.0, gone)])
    gone.cancel()
    assert queue._next_batch() == [kept]
    assert added(before) == {"cancelled": 1}


@in_event_loop
async def test_refusals_are_counted_as_rejected(tmp_path):
    queue = engine(tmp_path, max_queued_generations=1)
    queue._waiting.append((0.0, stream()))
    before = outcomes()
    with pytest.raises(InferenceError) as refused:
        queue.submit(MODEL, Prompt(text="hi"), SamplingParams())
    assert refused.value.status_code == 429
    queue._unavailable = InferenceError(503, "no torch here", code="inference_unavailable")
    with pytest.raises(InferenceError):
        queue.submit(MODEL, Prompt(text="hi"), SamplingParams())
    assert added(before) == {"rejected": 2}


def test_token_timings_land_in_their_histograms():
    def count(name: str) -> float:
        return REGISTRY.get_sample_value(f"{name}_count")

    def under(name: str, bound: str) -> float:
        return REGISTRY.get_sample_value(f"{name}_bucket", {"le": bound})

    first = "afina_generation_time_to_first_token_seconds"
    per_token = "afina_generation_time_per_output_token_seconds"
    before = {name: (count(name), under(name, "0.05")) for name in (first, per_token)}
    metrics.first_tokens([10.0, 10.5], now=10.52)  # 0.52 s and 0.02 s
    metrics.next_tokens(rows=3, seconds=0.02)
    assert count(first) - before[first][0] == 2
    assert under(first, "0.05") - before[first][1] == 1
    assert count(per_token) - before[per_token][0] == 3
    assert under(per_token, "0.05") - before[per_token][1] == 3
