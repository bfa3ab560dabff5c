"""A request whose client goes away while it waits is dropped from the engine, not generated
to the end for nobody."""

import asyncio

import pytest

from afina.api.errors import APIError
from afina.api.routers.inference import _while_connected
from afina.serving.protocol import (
    BaseModelSpec,
    Delta,
    GenerationStream,
    ModelSpec,
    Prompt,
    SamplingParams,
)


class FakeRequest:
    def __init__(self, messages: list[dict]) -> None:
        self.messages = messages

    async def receive(self) -> dict:
        if self.messages:
            return self.messages.pop(0)
        await asyncio.Event().wait()  # connected: nothing more comes
        raise AssertionError("unreachable")


def stream() -> GenerationStream:
    return GenerationStream(ModelSpec("m", BaseModelSpec("/m")), Prompt(text="x"), SamplingParams())


def test_a_client_that_goes_cancels_its_request():
    async def scenario() -> GenerationStream:
        waiting = stream()
        gone = FakeRequest([{"type": "http.disconnect"}])
        with pytest.raises(APIError) as raised:
            await _while_connected(gone, waiting, waiting.completion())
        assert raised.value.code == "client_closed"
        return waiting

    assert asyncio.run(scenario()).cancelled


def test_a_connected_client_gets_its_answer_and_keeps_its_request():
    async def scenario() -> tuple[GenerationStream, Delta | None]:
        waiting = stream()
        waiting.post(Delta("hi"))
        event = await _while_connected(FakeRequest([]), waiting, waiting.next_event())
        return waiting, event

    waiting, event = asyncio.run(scenario())
    assert event == Delta("hi")
    assert not waiting.cancelled
