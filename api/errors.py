"""OpenAI's error envelope, `{"error": {message, type, param, code}}`, for every error.

Handlers here turn afina's own errors, FastAPI's request validation and Starlette's HTTP
errors into that body; a full disk (ENOSPC, SQLite's "database or disk is full", ...) anywhere
in a request becomes a 507 `insufficient_storage` (its transaction rolled back, what it began
writing removed by the code that wrote it); anything else unexpected becomes a 500 with no
detail (it is logged).
The OpenAPI schema says the same: routers declare their error statuses with
`error_responses`, and FastAPI's 422 (which afina never answers) is taken out of it.
"""

import logging
from collections.abc import Callable
from typing import Any, Literal

import sqlalchemy.exc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from python_multipart.exceptions import FormParserError
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException
from starlette.routing import Match

from afina.api.asgi import all_routes
from afina.core.datasets import json_limit_reason
from afina.core.disk import is_disk_full
from afina.core.fields import field_path

logger = logging.getLogger(__name__)

_CODES = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed"}
ErrorType = Literal["invalid_request_error", "authentication_error", "server_error"]


class LineProblem(BaseModel):
    line: int | None = Field(description="1-based line of the upload; null: the whole file.")
    message: str


class ErrorObject(BaseModel):
    message: str
    type: ErrorType
    param: str | None = Field(description="The field, parameter or line the error is about.")
    code: str | None
    errors: list[LineProblem] | None = Field(
        default=None, description="An upload that failed validation: its first bad lines."
    )


class ErrorBody(BaseModel):
    """What every 4xx and 5xx answer carries."""

    error: ErrorObject


_ERRORS = {
    400: "The request is invalid: `param` names the field, parameter or upload at fault",
    401: "No API key, or one the service does not know (`Authorization: Bearer <key>`)",
    403: "The model is no longer allowed here (AFINA_ALLOWED_MODELS)",
    404: "No such object in the caller's project",
    408: "The client took too long to send the request's body (AFINA_BODY_TIMEOUT_SECONDS)",
    409: "The object's state does not allow this",
    413: "The body is over AFINA_MAX_UPLOAD_BYTES (uploads) or AFINA_MAX_JSON_BYTES",
    429: "Too many generation requests are waiting",
    503: "A service this request needs is unavailable (the database, the job queue or the "
    "inference engine), or the API is at its limit of requests at once "
    "(AFINA_MAX_CONCURRENT_REQUESTS); `Retry-After` says when to try again",
    507: "The server's disk is full: nothing of the request was stored",
}
# What every route behind an API key can answer: refused keys, or a database that cannot
# check them.
KEYED = (401, 503)

STORAGE_FULL_MESSAGE = (
    "The server's disk is full: nothing of this request was stored. Free some space "
    "(delete files, cancel jobs you no longer need, or ask the operator), then try again."
)


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The `responses=` of a router or route answering these error statuses."""
    return {status: {"model": ErrorBody, "description": _ERRORS[status]} for status in statuses}


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
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(status_code, message, headers)
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
    response = error_response(
        error.status_code, error.message, error.param, error.code, **error.extra
    )
    if error.headers:
        response.headers.update(error.headers)
    return response


def overloaded(message: str, code: str) -> JSONResponse:
    """A 503 that asks the client to come back in a second: the service is busy, not
    broken."""
    response = error_response(503, message, code=code)
    response.headers["Retry-After"] = "1"
    return response


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


def _allowed_methods(request: Request) -> str:
    """Every method the request's path takes. Starlette's own `Allow` names only the first
    route that matched the path, and one path often has a route per method."""
    # A path named literally by some route (`/v1/fine_tuning/jobs/estimate`) is that route's
    # resource, though a route with a parameter (`/v1/fine_tuning/jobs/{job_id}`) matches it.
    literal: set[str] = set()
    templated: set[str] = set()
    for route in all_routes(request.app.routes):
        match, _ = route.matches(request.scope)
        if match is not Match.NONE:
            path = getattr(route, "path", "")
            (templated if "{" in path else literal).update(route.methods or set())
    return ", ".join(sorted(literal or templated))


# What FastAPI and Starlette say when a body cannot be parsed at all; the exception they
# raise it from says why.
_UNPARSED_JSON = "There was an error parsing the body"
_UNPARSED_FORM = "Invalid multipart data."


def _root_cause(error: BaseException) -> BaseException:
    seen = {id(error)}
    while (inner := error.__cause__ or error.__context__) is not None and id(inner) not in seen:
        seen.add(id(inner))
        error = inner
    return error


def _unparsed_body(message: str, error: HTTPException) -> str:
    cause = _root_cause(error)
    reason = json_limit_reason(cause) if message == _UNPARSED_JSON else None
    if reason is not None:
        return f"the body is not valid JSON: {reason}"
    if isinstance(cause, FormParserError):  # the parser's own words, no server detail
        return f"the body is not valid multipart/form-data: {cause}"
    return message


async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
    message = str(error.detail)
    if message in (_UNPARSED_JSON, _UNPARSED_FORM) and is_disk_full(error):
        # The upload could not be spooled to a temporary file: its disk is full.
        return await _storage_full(request, error)
    if error.status_code == 404 and message == "Not Found":
        message = f"Unknown request URL: {request.method} {request.url.path}"
    if error.status_code == 400 and message in (_UNPARSED_JSON, _UNPARSED_FORM):
        message = _unparsed_body(message, error)
    response = error_response(error.status_code, message, code=_CODES.get(error.status_code))
    if error.headers:
        response.headers.update(error.headers)
    if error.status_code == 405:
        response.headers["Allow"] = _allowed_methods(request)
    return response


async def _storage_full(_request: Request, error: Exception) -> JSONResponse:
    logger.warning("a request met a full disk: %s", str(error).strip().splitlines()[0])
    return error_response(507, STORAGE_FULL_MESSAGE, code="insufficient_storage")


async def _service_error(request: Request, error: Exception) -> JSONResponse:
    """An OSError or a database error: a 507 when it is a full disk; a 503 to try again
    when the database is busy or unreachable (a pool with no connection for
    POOL_TIMEOUT_SECONDS, a lock held too long, a server that went away); else what any
    other unexpected error is (re-raised to the 500 handler)."""
    if is_disk_full(error):
        return await _storage_full(request, error)
    if isinstance(error, sqlalchemy.exc.TimeoutError | sqlalchemy.exc.OperationalError):
        logger.warning("database unavailable: %s", error)
        return overloaded(
            "The database is busy or unreachable right now; nothing was changed. Try again.",
            "database_unavailable",
        )
    raise error


async def _unexpected_error(_request: Request, _error: Exception) -> JSONResponse:
    # Starlette re-raises the error after this response, and the server logs it there.
    return error_response(500, "The server had an error while processing your request.")


SECURITY_SCHEME = {
    "type": "http",
    "scheme": "bearer",
    "description": "An API key: AFINA_API_KEYS or `afina keys create`.",
}


def _documented(openapi: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    """FastAPI's schema in afina's terms: without the 422 FastAPI gives every route with
    parameters (afina answers a request that fails validation with a 400 and the error
    envelope), and with the API key required wherever a route documents a 401."""

    def schema() -> dict[str, Any]:
        document = openapi()
        for operations in document.get("paths", {}).values():
            for operation in operations.values():
                responses = operation.get("responses", {})
                responses.pop("422", None)
                if "401" in responses:
                    operation["security"] = [{"APIKey": []}]
        components = document.setdefault("components", {})
        for name in ("HTTPValidationError", "ValidationError"):
            components.get("schemas", {}).pop(name, None)
        components["securitySchemes"] = {"APIKey": SECURITY_SCHEME}
        return document

    return schema


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(OSError, _service_error)
    app.add_exception_handler(SQLAlchemyError, _service_error)
    app.add_exception_handler(Exception, _unexpected_error)
    app.openapi = _documented(app.openapi)  # type: ignore[method-assign]
