"""OpenAI's error envelope, `{"error": {message, type, param, code}}`, for every error.

Handlers here turn afina's own errors, FastAPI's request validation and Starlette's HTTP
errors into that body; anything unexpected becomes a 500 with no detail (it is logged).
"""

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from afina.core.fields import field_path

_CODES = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed"}


class APIError(HTTPException):
    """An error a client caused. It is an HTTPException so that FastAPI lets it through
    unchanged while it parses a request body (see `api.limits`)."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(status_code, message)
        self.message = message
        self.param = param
        self.code = code
        self.extra = extra


def error_body(
    status_code: int, message: str, param: str | None = None, code: str | None = None, **extra: Any
) -> dict[str, Any]:
    """`{"error": {...}}`, as a response carries it or as an event inside a stream."""
    if status_code == 401:
        error_type = "authentication_error"
    else:
        error_type = "server_error" if status_code >= 500 else "invalid_request_error"
    body = {"message": message, "type": error_type, "param": param, "code": code, **extra}
    return {"error": body}


def error_response(
    status_code: int, message: str, param: str | None = None, code: str | None = None, **extra: Any
) -> JSONResponse:
    return JSONResponse(error_body(status_code, message, param, code, **extra), status_code)


def shown_id(object_id: str) -> str:
    """An id from a request, quoted for a message: at most 80 of its characters."""
    return repr(object_id if len(object_id) <= 80 else object_id[:80] + "...")


def not_found(kind: str, object_id: str) -> APIError:
    return APIError(404, f"No {kind} with id {shown_id(object_id)}", param="id", code="not_found")


async def _api_error(_request: Request, error: APIError) -> JSONResponse:
    return error_response(error.status_code, error.message, error.param, error.code, **error.extra)


def _field(location: tuple[int | str, ...]) -> str:
    # FastAPI prefixes where the value came from: body, query, path, header, cookie. An
    # error about the whole body names no field.
    return field_path(location[1:])


async def _validation_error(_request: Request, error: RequestValidationError) -> JSONResponse:
    problems = []
    for detail in error.errors():
        if detail["type"] == "json_invalid":  # its location is a character offset
            reason = detail.get("ctx", {}).get("error", "")
            problems.append(("", f"the body is not valid JSON: {reason}"))
            continue
        message = "field required" if detail["type"] == "missing" else detail["msg"]
        message = message.removeprefix("Value error, ")
        problems.append((_field(tuple(detail["loc"])), message))
    message = "; ".join(f"{field}: {text}" if field else text for field, text in problems)
    return error_response(400, message, problems[0][0] or None, "invalid_request")


async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
    message = str(error.detail)
    if error.status_code == 404 and message == "Not Found":
        message = f"Unknown request URL: {request.method} {request.url.path}"
    response = error_response(error.status_code, message, code=_CODES.get(error.status_code))
    if error.headers:
        response.headers.update(error.headers)
    return response


async def _unexpected_error(_request: Request, _error: Exception) -> JSONResponse:
    # Starlette re-raises the error after this response, and the server logs it there.
    return error_response(500, "The server had an error while processing your request.")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
