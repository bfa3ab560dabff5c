"""Fixtures the integration tests share."""

from collections.abc import Iterator

import pytest

from afina.serving.engine import InferenceEngine
from afina.serving.protocol import InferenceError
from tests.support import GROWING_CHATS, jsonl, upload


@pytest.fixture
def no_generation(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """For tests of what stands before generation: the engine thread, if any request starts
    it, loads nothing and fails its requests; the test then fails too."""
    runs = []

    def run(engine: InferenceEngine) -> None:
        runs.append(engine)
        engine._fail_waiting(InferenceError(500, "a test reached generation", code="test"))

    monkeypatch.setattr(InferenceEngine, "_run", run)
    yield
    assert runs == [], "a request reached the inference engine's thread"


@pytest.fixture
def model(demo_model) -> str:
    """The demo model's path, as a job body names it."""
    return str(demo_model)


@pytest.fixture
def training_file(client) -> str:
    """A file of `GROWING_CHATS`, uploaded."""
    return upload(client, jsonl(*GROWING_CHATS)).json()["id"]
