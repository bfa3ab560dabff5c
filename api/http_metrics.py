"""The HTTP families of `GET /metrics`, counted by pure ASGI middleware around the whole app:

- `afina_http_requests_total{route, method, status}`: requests answered;
- `afina_http_request_duration_seconds{route, method, status}`: from when the server had the
  request's headers (`api.server` stamps it; else from when the app got the request) to the
  end of its answer, a stream's included.

`route` is the path template of the route that answered (`/v1/fine_tuning/jobs/{job_id}`),
never the raw path, so that ids do not make a series each. A request answered before routing
(a missing key, a body over its limit, load shed) is labelled with the route its path and
method match; one that matches none with `unmatched`. `method` is one of the usual methods or
`other`. A request whose answer never started is counted with status 500 when the app
failed, 499 when it was cancelled (the client or the server went away).

The cost per request is a clock read at each end, one dictionary look-up and two updates of
prometheus_client values: a few microseconds (`bench/load.py` measures the API's CPU per
request).
"""

import asyncio
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from afina.api.asgi import RECEIVED_AT, route_path

UNMATCHED = "unmatched"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Fast polls take a millisecond; uploads, exports and generation streams minutes.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
# An answer that never started: the app failed, or its task was cancelled.
FAILED, CANCELLED = 500, 499


class HttpMetrics:
    """The two families, in `registry`, and the label sets met so far (bounded: routes x
    methods x statuses)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["route", "method", "status"]
        self.requests = Counter(
            "afina_http_requests",
            "HTTP requests answered, by route template, method and status",
            labels,
            registry=registry,
        )
        self.duration = Histogram(
            "afina_http_request_duration_seconds",
            "HTTP request latency, from its headers to the end of its answer, by route "
            "template, method and status",
            labels,
            buckets=BUCKETS,
            registry=registry,
        )
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def record(self, route: str, method: str, status: int, seconds: float) -> None:
        key = (route, method, status)
        children = self._children.get(key)
        if children is None:
            labels = (route, method, str(status))
            children = self.requests.labels(*labels), self.duration.labels(*labels)
            self._children[key] = children
        children[0].inc()
        children[1].observe(seconds)


class RouteTemplates:
    """The path template a request's path and method match, for requests answered before the
    router ran: the routes tried in the router's order, a route that takes the method
    first (what the router would answer), else the first whose path matches (a 405)."""

    def __init__(self, routes: Callable[[], Iterable[Any]]) -> None:
        self._routes = routes
        self._table: list[tuple[Any, frozenset[str] | None, str]] | None = None

    def __call__(self, path: str, method: str) -> str:
        if self._table is None:  # the app's routes are all there once it serves
            self._table = [
                (route.path_regex, getattr(route, "methods", None), template(route))
                for route in self._routes()
                if hasattr(route, "path_regex")
            ]
        found = UNMATCHED
        for regex, methods, name in self._table:
            if regex.match(path):
                if methods is None or method in methods:
                    return name
                if found is UNMATCHED:
                    found = name
        return found


def template(route: Any) -> str:
    """A route's path template, its parameters without their converters."""
    return getattr(route, "path_format", None) or route.path


class HttpMetricsMiddleware:
    """Pure ASGI middleware: counts and times every HTTP request (outermost, so that what
    the other middlewares refuse is counted too)."""

    def __init__(self, app: ASGIApp, metrics: HttpMetrics, templates: RouteTemplates) -> None:
        self.app = app
        self.metrics = metrics
        self.templates = templates

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        clock = asyncio.get_running_loop().time
        started = scope.get(RECEIVED_AT) or clock()
        path = route_path(scope)  # before a mount changes the scope's root path
        status = 0

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except asyncio.CancelledError:
            status = status or CANCELLED
            raise
        except BaseException:
            status = status or FAILED
            raise
        finally:
            route = scope.get("route")
            method = scope["method"]
            name = template(route) if route is not None else self.templates(path, method)
            method = method if method in METHODS else "other"
            self.metrics.record(name, method, status or FAILED, clock() - started)
