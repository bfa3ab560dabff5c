"""What the pure ASGI middlewares (keys, body limits) read of a request before routing."""

import ipaddress
from collections.abc import Iterable, Sequence
from urllib.parse import urlsplit

import fastapi.routing
from starlette.routing import BaseRoute
from starlette.types import Scope

# The event loop's time (`loop.time()`) at which the server had the request's headers:
# `api.server` sets it, `api.limits.ConcurrencyLimit` reads how long the request waited.
RECEIVED_AT = "afina.received_at"


def all_routes(routes: Sequence[BaseRoute]) -> Iterable[BaseRoute]:
    """Every route of an app's `routes`, those of the routers it includes too: since FastAPI
    0.137 an included router is one opaque entry there, which `iter_route_contexts` (what
    FastAPI's OpenAPI schema is built from) opens."""
    return getattr(fastapi.routing, "iter_route_contexts", iter)(routes)


def route_path(scope: Scope) -> str:
    """The path the app routes on: without the prefix a proxy mounts it under."""
    path, root = scope["path"], scope.get("root_path", "")
    return path.removeprefix(root) if root and path.startswith(root + "/") else path


def is_loopback(host: str) -> bool:
    """Whether a host (a name or an address; `host:port` and `[v6]:port` too) is this
    machine's loopback: `localhost` or a loopback address. Any other name may resolve
    anywhere."""
    try:
        name = urlsplit(f"//{host}").hostname  # lower case, without the port and brackets
    except ValueError:  # an unbalanced bracket, or a bare IPv6 address it cannot split
        name = None
    for candidate in (host.strip("[]"), name):
        if candidate == "localhost":
            return True
        try:
            return ipaddress.ip_address(candidate or "").is_loopback
        except ValueError:
            continue
    return False
