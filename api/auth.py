"""API keys: `Authorization: Bearer <key>` on every route but the health probes.

Checked in ASGI middleware, before anything reads the request body, so a caller without a
valid key cannot make the server take in an upload. The caller's project goes into the
request state for `get_project`.
"""

import hmac

from fastapi import Request
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from afina.api.errors import error_response
from afina.core.settings import DEFAULT_PROJECT

OPEN_PATHS = frozenset({"/healthz", "/readyz"})


def find_project(keys: dict[str, str], token: str) -> str | None:
    """Compare the token with every key, so the time taken says nothing about any key."""
    found = None
    for key, project in keys.items():
        if hmac.compare_digest(key.encode(), token.encode()):
            found = project
    return found


class ApiKeyAuth:
    def __init__(self, app: ASGIApp, keys: dict[str, str]) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        project = DEFAULT_PROJECT
        if self.keys:
            scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                message = "Missing API key: send it as `Authorization: Bearer <key>`."
                await self._refuse(scope, receive, send, message, "missing_api_key")
                return
            project = find_project(self.keys, token.strip())
            if project is None:
                message = "Incorrect API key provided."
                await self._refuse(scope, receive, send, message, "invalid_api_key")
                return
        scope.setdefault("state", {})["project"] = project
        await self.app(scope, receive, send)

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, message: str, code: str) -> None:
        response = error_response(401, message, code=code)
        response.headers["WWW-Authenticate"] = "Bearer"
        await response(scope, receive, send)


def get_project(request: Request) -> str:
    """The caller's project, as `ApiKeyAuth` found it."""
    return request.state.project
