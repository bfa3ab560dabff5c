"""API keys: `Authorization: Bearer <key>` on every route but the health probes, the metrics
(`/metrics`: aggregates only) and the dashboard's page shells and static files (its script
sends the key on its API calls).

Checked in ASGI middleware, before anything reads the request body, so a caller without a
valid key cannot make the server take in an upload. The caller's project goes into the
request state for `get_project`. A service that has never had a key (none set, none stored)
is open, and every caller is in the default project; it then answers only requests addressed
to this machine's loopback (`Host`) and not sent by another site's page (`Origin`), so that a
web page the user opens can neither read it through DNS rebinding nor post a form to it.
"""

from fastapi import Request
from sqlalchemy.exc import SQLAlchemyError
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from afina.api.asgi import is_loopback, route_path
from afina.api.database import DatabaseThreads
from afina.api.errors import error_response
from afina.api.keys import KeyStore
from afina.api.routers.dashboard import is_dashboard_path
from afina.core.settings import DEFAULT_PROJECT

# The probes, and Prometheus's scrape (aggregates only: see `api.metrics`).
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


class ApiKeyAuth:
    def __init__(self, app: ASGIApp, keys: KeyStore, database: DatabaseThreads) -> None:
        self.app = app
        self.keys = keys
        self.database = database

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or route_path(scope) in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        dashboard = is_dashboard_path(route_path(scope))
        headers = Headers(scope=scope)
        scheme, _, token = headers.get("authorization", "").partition(" ")
        token = token.strip() if scheme.lower() == "bearer" else ""
        try:
            required = self.keys.known_required() or await self.database.call(self.keys.required)
            project = DEFAULT_PROJECT if not required else None
            if required and token:
                project = self.keys.remembered_project(token)
                if project is None:
                    project = await self.database.call(self.keys.project_for, token)
        except SQLAlchemyError:
            message = "The service cannot check API keys right now: its database is unreachable."
            await error_response(503, message, code="database_unavailable")(scope, receive, send)
            return
        if not required and not _local(headers):
            message = (
                "This afina has no API key, so it answers only requests to localhost from this "
                "machine, not from another site's web page. Create a key (`afina keys create "
                "--project P`) to serve anything else."
            )
            await error_response(403, message, code="not_local")(scope, receive, send)
            return
        if dashboard:
            await self.app(scope, receive, send)
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

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, message: str, code: str) -> None:
        response = error_response(401, message, code=code)
        response.headers["WWW-Authenticate"] = "Bearer"
        await response(scope, receive, send)


def _local(headers: Headers) -> bool:
    """The request names this machine's loopback, and no other site's page sent it."""
    origin = headers.get("origin")
    return is_loopback(headers.get("host", "")) and (
        origin is None or is_loopback(origin.partition("://")[2])
    )


async def get_project(request: Request) -> str:
    """The caller's project, as `ApiKeyAuth` found it."""
    return request.state.project
