"""API keys: `Authorization: Bearer <key>` on every route but the health probes.

Checked in ASGI middleware, before anything reads the request body, so a caller without a
valid key cannot make the server take in an upload. The caller's project goes into the
request state for `get_project`. A service that has never had a key (none set, none stored)
is open, and every caller is in the default project.
"""

from fastapi import Request
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from afina.api.errors import error_response
from afina.api.keys import KeyStore
from afina.core.settings import DEFAULT_PROJECT

OPEN_PATHS = frozenset({"/healthz", "/readyz"})


class ApiKeyAuth:
    def __init__(self, app: ASGIApp, keys: KeyStore) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
        token = token.strip() if scheme.lower() == "bearer" else ""
        try:
            project = await self._project(token)
        except SQLAlchemyError:
            message = "The service cannot check API keys right now: its database is unreachable."
            await error_response(503, message, code="database_unavailable")(scope, receive, send)
            return
        if project is None:
            if token:
                message, code = "Incorrect API key provided.", "invalid_api_key"
            else:
                message = "Missing API key: send it as `Authorization: Bearer <key>`."
                code = "missing_api_key"
            await self._refuse(scope, receive, send, message, code)
            return
        scope.setdefault("state", {})["project"] = project
        await self.app(scope, receive, send)

    async def _project(self, token: str) -> str | None:
        if not await run_in_threadpool(self.keys.required):
            return DEFAULT_PROJECT
        return await run_in_threadpool(self.keys.project_for, token) if token else None

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, message: str, code: str) -> None:
        response = error_response(401, message, code=code)
        response.headers["WWW-Authenticate"] = "Bearer"
        await response(scope, receive, send)


def get_project(request: Request) -> str:
    """The caller's project, as `ApiKeyAuth` found it."""
    return request.state.project
