"""The HTTP server `afina serve` runs: uvicorn, with the guards against slow and piled-up
clients that uvicorn lacks.

uvicorn closes idle keep-alive connections, but waits for ever on a connection that opens and
then sends its request line and headers a byte at a time (or not at all), and takes every
connection it is offered. Here a connection past `max_connections` is closed at once, and a
request whose line and headers are not all in `header_timeout` seconds after its first byte
(or after the connection opened) is answered 408 and closed. The request body's pace is the
app's to watch (`api.limits.RequestLimits`), since only the app knows when it reads one.
"""

import asyncio
import gc
import importlib
import socket
import threading
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from afina.api.asgi import RECEIVED_AT
from afina.core.settings import Settings

# Open streams (a long generation) get this long to end before they are cut at shutdown.
GRACEFUL_SHUTDOWN_SECONDS = 20

REQUEST_TIMEOUT = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: 42\r\nconnection: close\r\n\r\n"
    b"The request's headers took too long: bye.\n"
)


# `GET /healthz`, answered by the protocol itself (the app's route answers the same).
HEALTH_PATH = "/healthz"
HEALTH_START = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"application/json"), (b"content-length", b"15")],
}
HEALTH_BODY = {"type": "http.response.body", "body": b'{"status":"ok"}'}


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol (httptools) with a connection cap and a header timeout
    (`guarded_protocol` sets the two limits), which answers `GET /healthz` itself."""

    max_connections = 2048
    header_timeout = 10.0
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            self.transport.close()
            return
        self._wait_for_head()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._head_timer is None:
            self._wait_for_head()

    def on_headers_complete(self) -> None:
        self._stop_waiting()
        super().on_headers_complete()
        # The request's task is made but not started: past capacity, tasks wait here, out of
        # any count, so the app sheds by how long they waited (`ConcurrencyLimit`).
        self.scope[RECEIVED_AT] = self.loop.time()  # type: ignore[literal-required]

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_waiting()
        super().connection_lost(exc)

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        if not self._answered_health(cycle):
            super()._start_asgi_task(cycle, app)

    def _answered_health(self, cycle: RequestResponseCycle) -> bool:
        """`GET /healthz` answered as it arrives, not as a task behind every request the app
        has in hand (a burst put it 150 ms back): an orchestrator must tell a busy API from a
        dead one. The answer goes through the request's own cycle, which keeps the
        connection's keep-alive and pipelining right; with writes paused (a client that
        reads nothing), it takes the usual way."""
        scope = cycle.scope
        if scope["method"] != "GET" or scope["path"] != HEALTH_PATH or self.flow.write_paused:
            return False
        for message in (HEALTH_START, HEALTH_BODY):
            sending = cycle.send(message)  # type: ignore[arg-type]
            try:
                sending.send(None)  # writes are not paused: it returns without waiting
            except StopIteration:
                continue
            sending.close()
            raise RuntimeError("writing /healthz's answer waited")
        return True

    def _wait_for_head(self) -> None:
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _stop_waiting(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.transport.write(REQUEST_TIMEOUT)
            self.transport.close()


class Server(uvicorn.Server):
    """uvicorn's server, with the heap it started with kept out of garbage collection.

    The app's modules and state are some 100,000 objects that live as long as the process;
    a full collection walks them all (60 ms on a 2-core machine), and a burst of requests
    allocates enough to start one: every request in flight then waits. Frozen once the app
    is loaded, they are never walked until the server stops."""

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().serve(sockets)
        finally:
            gc.unfreeze()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        gc.collect()  # the app is loaded by now (a factory ran before this)
        gc.freeze()
        await super().startup(sockets)
        threading.Thread(target=_warm_up, name="warm-up", daemon=True).start()


# Imported once the server is up, on a thread of their own: torch and transformers, which the
# first estimate (a tokenizer) and the first generation need, take seconds to import.
WARM_UP_MODULES = ("afina.core.model_loading",)


def _warm_up() -> None:
    for name in WARM_UP_MODULES:
        importlib.import_module(name)
    gc.freeze()  # what they brought is as lasting as the rest


def guarded_protocol(settings: Settings) -> type[GuardedHttpProtocol]:
    return type(
        "GuardedHttpProtocol",
        (GuardedHttpProtocol,),
        {
            "max_connections": settings.max_connections,
            "header_timeout": settings.header_timeout_seconds,
        },
    )


def server_config(app: Any, settings: Settings, **options: Any) -> uvicorn.Config:
    """uvicorn's settings for afina: `app` (an app, or the factory's import string with
    `factory=True`) behind the guarded protocol; `options` go to uvicorn, over afina's."""
    defaults = {
        "log_level": settings.log_level.lower(),
        "access_log": settings.access_log,
        "timeout_graceful_shutdown": GRACEFUL_SHUTDOWN_SECONDS,
    }
    return uvicorn.Config(app, http=guarded_protocol(settings), **{**defaults, **options})
