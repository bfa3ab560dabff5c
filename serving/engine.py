"""The inference engine: one thread that batches waiting requests and runs them.

It lives in the API process. `submit` is called on the event loop and only queues; the
engine thread, started on the first request, imports torch then (so the API starts without
it), loads models, and generates off the event loop, so health checks and job polling stay
responsive while it works.

Batching: an idle engine waits up to AFINA_BATCH_WINDOW_MS for company, then takes the
oldest request and every waiting request on the same base model, up to
AFINA_MAX_BATCH_SIZE rows and AFINA_MAX_LOADED_ADAPTERS distinct adapters; requests that
arrive while a batch runs form the next one. Different adapters of one base share a batch.
"""

import logging
import threading
import time
from typing import TYPE_CHECKING

from afina.core.settings import Settings
from afina.core.storage import ArtifactStorage
from afina.serving import metrics
from afina.serving.protocol import (
    GenerationStream,
    InferenceError,
    ModelSpec,
    Prompt,
    SamplingParams,
    internal_error,
)

if TYPE_CHECKING:  # torch is imported on the engine's thread only
    from afina.serving.model_cache import ModelCache

logger = logging.getLogger(__name__)


def _shutting_down() -> InferenceError:
    return InferenceError(503, "the server is shutting down", code="shutting_down")


class InferenceEngine:
    def __init__(self, settings: Settings, storage: ArtifactStorage) -> None:
        self._settings = settings
        self._storage = storage
        self._window = settings.batch_window_ms / 1000
        self._waiting: list[tuple[float, GenerationStream]] = []
        self._condition = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._unavailable: InferenceError | None = None
        self._forgotten: set[str] = set()  # storage folders whose adapters were deleted

    def submit(self, model: ModelSpec, prompt: Prompt, params: SamplingParams) -> GenerationStream:
        """Queue a request (on the caller's event loop); its events come on the stream."""
        stream = GenerationStream(model, prompt, params)
        with self._condition:
            refusal = self._refusal()
            if refusal is not None:
                metrics.ended("rejected")
                raise refusal
            self._waiting.append((time.monotonic(), stream))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="afina-inference", daemon=True
                )
                self._thread.start()
            self._condition.notify()
        return stream

    def _refusal(self) -> InferenceError | None:
        """Why a new request is refused now, if it is (under the condition's lock)."""
        if self._unavailable is not None:
            return self._unavailable
        if self._closed:
            return _shutting_down()
        if len(self._waiting) >= self._settings.max_queued_generations:
            return InferenceError(
                429,
                f"{len(self._waiting)} generation requests are already waiting "
                "(AFINA_MAX_QUEUED_GENERATIONS): retry shortly",
                code="too_many_requests",
            )
        return None

    def forget(self, folder: str) -> None:
        """Unload the adapters stored under `folder` (their files were deleted), and drop
        their local copies, before the next batch: the engine's thread owns the models."""
        with self._condition:
            self._forgotten.add(folder)

    def _forget_in(self, models: "ModelCache") -> None:
        with self._condition:
            folders, self._forgotten = self._forgotten, set()
        for folder in folders:
            models.forget(folder)

    def close(self, timeout: float = 30) -> None:
        """Refuse new requests, let the running batch end, fail what still waits."""
        with self._condition:
            self._closed = True
            self._condition.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
        self._fail_waiting(_shutting_down())

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException:
            logger.exception("the inference engine stopped")
            self._become_unavailable(
                "the inference engine stopped; restart the server", "engine_stopped"
            )
            raise

    def _serve(self) -> None:
        try:
            from afina.serving.batch import serve_batch
            from afina.serving.model_cache import ModelCache
        except ImportError as error:  # an API node installed without the training extra
            logger.exception("inference is not available")
            self._become_unavailable(
                f"inference is not available on this server: {error}", "inference_unavailable"
            )
            return
        models = ModelCache(
            storage=self._storage,
            cache_dir=self._settings.data_dir / "cache",
            max_bases=self._settings.max_loaded_base_models,
            max_adapters=self._settings.max_loaded_adapters,
            trust_remote_code=self._settings.trust_remote_code,
        )
        try:
            while (batch := self._next_batch()) is not None:
                try:
                    self._forget_in(models)
                    serve_batch(models, batch, self._settings.max_new_tokens)
                except Exception:
                    logger.exception("a generation batch failed")
                    failure = internal_error()
                    for stream in batch:
                        stream.post(failure)
        finally:
            models.close()

    def _next_batch(self) -> list[GenerationStream] | None:
        with self._condition:
            while not self._closed:
                self._waiting = self._without_cancelled()
                if not self._waiting:
                    self._condition.wait()
                    continue
                wait = self._waiting[0][0] + self._window - time.monotonic()
                if wait > 0 and len(self._waiting) < self._settings.max_batch_size:
                    self._condition.wait(wait)
                    continue
                return self._take_batch()
            return None

    def _without_cancelled(self) -> list[tuple[float, GenerationStream]]:
        """The waiting requests less those cancelled, which are dropped."""
        kept = []
        for waited in self._waiting:
            if waited[1].cancelled:
                waited[1].drop()
            else:
                kept.append(waited)
        return kept

    def _take_batch(self) -> list[GenerationStream]:
        base = self._waiting[0][1].model.base.key
        batch: list[GenerationStream] = []
        adapters: set[str | None] = set()
        for _, stream in self._waiting:
            if len(batch) == self._settings.max_batch_size:
                break
            if stream.model.base.key != base:
                continue
            adapter = stream.model.adapter.key if stream.model.adapter else None
            new_adapter = adapter is not None and adapter not in adapters
            if new_adapter and len(adapters - {None}) == self._settings.max_loaded_adapters:
                continue
            adapters.add(adapter)
            batch.append(stream)
        self._waiting = [(t, s) for t, s in self._waiting if s not in batch]
        return batch

    def _become_unavailable(self, message: str, code: str) -> None:
        """Fail what waits, and every later request, with this 503."""
        with self._condition:
            self._unavailable = InferenceError(503, message, code=code)
        self._fail_waiting(self._unavailable)

    def _fail_waiting(self, error: InferenceError) -> None:
        with self._condition:
            waiting, self._waiting = self._waiting, []
        for _, stream in waiting:
            stream.post(error)
