"""What the API hands the inference engine and what it gets back, free of torch.

A request names a base model (as it was quantized for training) and, optionally, an adapter
directory; the engine answers with a stream of events: `Started` once the prompt is
accepted, `Delta`s of text, then `Finished`, or an `InferenceError` instead.
"""

import asyncio
import threading
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

from afina.core.job_config import QuantizationSettings
from afina.serving import metrics

FinishReason = Literal["stop", "length"]


class InferenceError(Exception):
    """A request the engine cannot serve: the status and OpenAI error fields to answer."""

    def __init__(
        self, status_code: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.param = param
        self.code = code


def internal_error() -> InferenceError:
    """For a failure that is the server's: the details go to its log, not to the client."""
    return InferenceError(500, "The server had an error while generating.", code="internal_error")


@dataclass(frozen=True)
class BaseModelSpec:
    """A base model as loaded: the same weights quantized differently are two bases."""

    model: str
    quantization: QuantizationSettings = field(default_factory=QuantizationSettings)

    @cached_property
    def key(self) -> tuple[str, str]:
        """What tells bases apart; read for every waiting request when a batch is taken."""
        return self.model, self.quantization.model_dump_json()


@dataclass(frozen=True)
class AdapterSpec:
    """A LoRA adapter directory: its artifact storage key, and the model name it serves."""

    key: str
    name: str


@dataclass(frozen=True)
class ModelSpec:
    """A model to serve; `param` is the request field that named it, which errors about
    the model (it cannot be loaded, its adapter is missing) name."""

    name: str
    base: BaseModelSpec
    adapter: AdapterSpec | None = None
    param: str = "model"


@dataclass(frozen=True)
class Prompt:
    """Plain text, or chat messages for the model's chat template (`param` names the
    request field in errors)."""

    text: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None
    param: str = "prompt"


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int | None = None  # asked for: more than the context holds is an error
    default_max_new_tokens: int | None = None  # if not asked: this, or what the context holds
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # run to max_new_tokens: for benchmarks
    max_tokens_param: str = "max_tokens"


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }


@dataclass(frozen=True)
class Started:
    prompt_tokens: int


@dataclass(frozen=True)
class Delta:
    text: str


@dataclass(frozen=True)
class Finished:
    finish_reason: FinishReason
    usage: Usage


Event = Started | Delta | Finished | InferenceError


@dataclass(frozen=True)
class GeneratedText:
    text: str
    finish_reason: FinishReason
    usage: Usage


class GenerationStream:
    """One request's side of the engine: the engine thread posts events into the caller's
    event loop; the caller reads them, and `cancel()` tells the engine to drop the row.

    The stream also counts how its request ended (`serving.metrics`), once: at the first
    `Finished` or error posted, or as cancelled when the engine drops it (`drop`)."""

    def __init__(self, model: ModelSpec, prompt: Prompt, params: SamplingParams) -> None:
        """Made on the caller's event loop: its events are delivered there."""
        self.model = model
        self.prompt = prompt
        self.params = params
        self.submitted_at = time.perf_counter()  # for the time to its first token
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._cancelled = threading.Event()
        self._ended = False  # counted in the metrics; read and set on the engine thread

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        self._cancelled.set()

    def drop(self) -> None:
        """Called from the engine thread when it drops this request, cancelled, before it
        ended."""
        self._end("cancelled")

    def _end(self, outcome: str) -> None:
        if not self._ended:
            self._ended = True
            metrics.ended(outcome)

    def post(self, event: Event) -> None:
        """Called from the engine thread."""
        if isinstance(event, Finished):
            self._end(event.finish_reason)
        elif isinstance(event, InferenceError):
            self._end("error")
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the caller's loop is closed: nobody is listening
            self.cancel()

    async def next_event(self) -> Started | Delta | Finished:
        event = await self._events.get()
        if isinstance(event, InferenceError):
            raise event
        return event

    async def completion(self) -> GeneratedText:
        """Everything after `Started`, gathered."""
        parts = []
        while True:
            event = await self.next_event()
            if isinstance(event, Delta):
                parts.append(event.text)
            elif isinstance(event, Finished):
                return GeneratedText("".join(parts), event.finish_reason, event.usage)
