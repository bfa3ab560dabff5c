"""Refuse request bodies over the upload limit before they are read whole."""

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from afina.api.errors import APIError, error_response

# Room for the multipart envelope and the small form fields beside the file itself.
MULTIPART_OVERHEAD = 1024 * 1024


class BodySizeLimit:
    """Pure ASGI middleware: a Content-Length over the limit is refused at once; other
    bodies (chunked ones have no length) are counted as they arrive and refused as soon
    as they pass the limit."""

    def __init__(self, app: ASGIApp, max_upload_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_upload_bytes + MULTIPART_OVERHEAD
        self.message = (
            f"Request body is larger than the upload limit of {max_upload_bytes} bytes "
            "(AFINA_MAX_UPLOAD_BYTES)"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            response = error_response(413, self.message, "file", "file_too_large")
            response.headers["Connection"] = "close"
            await response(scope, receive, send)
            return

        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    # An HTTPException: FastAPI passes it through its body parsing untouched.
                    raise APIError(413, self.message, param="file", code="file_too_large")
            return message

        await self.app(scope, counting_receive, send)
