"""What a request may cost the service: its body's size and pace, and how many requests are
worked on at once."""

import asyncio

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from afina.api.asgi import RECEIVED_AT, route_path
from afina.api.errors import APIError, error_response, overloaded

# Room for the multipart envelope and the small form fields beside the file itself.
MULTIPART_OVERHEAD = 1024 * 1024
# The one route that takes an upload. Anywhere else a body labelled multipart is held to
# the JSON limit: its label must not buy it the upload limit.
UPLOAD_ROUTE = ("POST", "/v1/files")


class RequestLimits:
    """Pure ASGI middleware: a Content-Length over the limit is refused at once; other
    bodies (chunked ones have no length) are counted as they arrive and refused as soon
    as they pass the limit. Uploads (multipart, to the upload route) get the upload limit;
    every other body the much smaller AFINA_MAX_JSON_BYTES.

    A client's pace is bounded too: a body that stops arriving (a slow client, or a
    Content-Length longer than what is sent) is answered 408 once no byte came for
    `body_timeout` seconds, and an answer the client stops reading is cut off after as
    long, so that neither holds a request's place for ever."""

    def __init__(
        self, app: ASGIApp, max_upload_bytes: int, max_json_bytes: int, body_timeout: float
    ) -> None:
        self.app = app
        self.body_timeout = body_timeout
        self.upload = (
            max_upload_bytes + MULTIPART_OVERHEAD,
            f"Request body is larger than the upload limit of {max_upload_bytes} bytes "
            "(AFINA_MAX_UPLOAD_BYTES)",
            "file",
            "file_too_large",
        )
        self.json = (
            max_json_bytes,
            f"Request body is larger than the limit of {max_json_bytes} bytes for JSON "
            "(AFINA_MAX_JSON_BYTES)",
            None,
            "request_too_large",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        multipart = headers.get("content-type", "").startswith("multipart/form-data")
        upload = multipart and (scope["method"], route_path(scope)) == UPLOAD_ROUTE
        limit, message, param, code = self.upload if upload else self.json
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            response = error_response(413, message, param, code)
            response.headers["Connection"] = "close"
            await response(scope, receive, send)
            return

        received, whole = 0, False

        async def counting_receive() -> Message:
            nonlocal received, whole
            if whole:  # later calls wait for the client to go, as long as it takes
                return await receive()
            try:
                async with asyncio.timeout(self.body_timeout):
                    incoming = await receive()
            except TimeoutError:
                raise APIError(
                    408,
                    f"The request body stopped arriving: no byte for {self.body_timeout:g} s "
                    "(AFINA_BODY_TIMEOUT_SECONDS)",
                    code="body_timeout",
                    headers={"Connection": "close"},
                ) from None
            if incoming["type"] == "http.request":
                whole = not incoming.get("more_body", False)
                received += len(incoming.get("body", b""))
                if received > limit:
                    # An HTTPException: FastAPI passes it through its body parsing untouched.
                    raise APIError(413, message, param=param, code=code)
            return incoming

        async def paced_send(message: Message) -> None:
            try:
                async with asyncio.timeout(self.body_timeout):
                    await send(message)
            except TimeoutError:
                raise ClientStalled(
                    f"the client read nothing of its answer for {self.body_timeout:g} s"
                ) from None

        await self.app(scope, counting_receive, paced_send)


class ClientStalled(Exception):
    """The client stopped reading its answer: the server gives up on the connection."""


# Never refused for load: an orchestrator must be able to tell a busy API from a dead one.
NEVER_SHED = frozenset({"/healthz"})


class ConcurrencyLimit:
    """Pure ASGI middleware: at most `limit` requests inside the app at once, and none that
    waited more than `max_queue_seconds` for the app to start on it (the server stamps
    when it had the headers; past capacity, requests queue before any middleware runs).
    Either is answered 503 with `Retry-After` at once, so that past its capacity the
    service sheds load instead of building a backlog that takes minutes to drain."""

    def __init__(self, app: ASGIApp, limit: int, max_queue_seconds: float) -> None:
        self.app = app
        self.limit = limit
        self.max_queue_seconds = max_queue_seconds
        self.active = 0  # changed on the event loop's thread alone

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or route_path(scope) in NEVER_SHED:
            await self.app(scope, receive, send)
            return
        waited = asyncio.get_running_loop().time() - scope.get(RECEIVED_AT, float("inf"))
        if waited > self.max_queue_seconds:
            message = (
                f"The service is past its capacity: this request waited {waited:.1f} s to be "
                f"started (AFINA_MAX_QUEUE_SECONDS is {self.max_queue_seconds:g}); try again "
                "in a moment."
            )
        elif self.active >= self.limit:
            message = (
                f"The service is working on its limit of {self.limit} requests at once "
                "(AFINA_MAX_CONCURRENT_REQUESTS); try again in a moment."
            )
        else:
            self.active += 1
            try:
                await self.app(scope, receive, send)
            finally:
                self.active -= 1
            return
        await overloaded(message, "overloaded")(scope, receive, send)
