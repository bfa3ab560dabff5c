"""Refuse request bodies over their limit before they are read whole."""

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from afina.api.asgi import route_path
from afina.api.errors import APIError, error_response

# Room for the multipart envelope and the small form fields beside the file itself.
MULTIPART_OVERHEAD = 1024 * 1024
# The one route that takes an upload. Anywhere else a body labelled multipart is held to
# the JSON limit: its label must not buy it the upload limit.
UPLOAD_ROUTE = ("POST", "/v1/files")


class BodySizeLimit:
    """Pure ASGI middleware: a Content-Length over the limit is refused at once; other
    bodies (chunked ones have no length) are counted as they arrive and refused as soon
    as they pass the limit. Uploads (multipart, to the upload route) get the upload limit;
    every other body the much smaller AFINA_MAX_JSON_BYTES."""

    def __init__(self, app: ASGIApp, max_upload_bytes: int, max_json_bytes: int) -> None:
        self.app = app
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

        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            incoming = await receive()
            if incoming["type"] == "http.request":
                received += len(incoming.get("body", b""))
                if received > limit:
                    # An HTTPException: FastAPI passes it through its body parsing untouched.
                    raise APIError(413, message, param=param, code=code)
            return incoming

        await self.app(scope, counting_receive, send)
