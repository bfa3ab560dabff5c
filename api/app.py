"""The FastAPI application factory."""

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
from anyio import CapacityLimiter
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from afina.api import metrics
from afina.api.asgi import all_routes
from afina.api.auth import ApiKeyAuth
from afina.api.database import DatabaseThreads
from afina.api.errors import install_error_handlers
from afina.api.http_metrics import HttpMetrics, HttpMetricsMiddleware, RouteTemplates
from afina.api.keys import KeyStore
from afina.api.limits import ConcurrencyLimit, RequestLimits
from afina.api.routers import (
    dashboard,
    files,
    fine_tuning,
    health,
    inference,
    job_artifacts,
    models,
    workers,
)
from afina.core.settings import Settings, get_settings
from afina.services.root import Services

logger = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, services: Services | None = None) -> FastAPI:
    """The app, on `services` (built from `settings` if not given); it starts their
    reconciler and closes them when it stops."""
    settings = settings or get_settings()
    # The threads that use the database (the database threads, and anyio's for the routes
    # that are plain functions) and its pool are sized together (see `make_engine`): a
    # thread never waits for a connection another request holds.
    services = services or Services(settings, database_threads=2 * settings.api_threads)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.api_threads
        if app.state.space_reserve is not None:
            try:
                app.state.space_reserve.ensure()
            except OSError:
                logger.exception("could not keep space aside for a full disk")
        app.state.reconciler.start()
        yield
        # Threads of their own: stopping must not wait for the request threads' places.
        await anyio.to_thread.run_sync(app.state.database.close, limiter=CapacityLimiter(1))
        await anyio.to_thread.run_sync(services.close, limiter=CapacityLimiter(1))

    app = FastAPI(
        # FastAPI's OpenTelemetry hook looks at the environment on every request when on.
        telemetry={"tracing": False, "metrics": False, "logs": False},
        title="afina",
        summary="Self-hosted, OpenAI-compatible QLoRA fine-tuning",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = services.engine
    app.state.session_factory = services.session_factory
    app.state.database = DatabaseThreads(services.engine, settings.api_threads)
    app.state.storage = services.storage
    app.state.celery = services.celery
    app.state.inference = services.inference
    # Made (when the disk has room) at start-up, then again by the reconciler's passes once
    # a full disk has had it released.
    app.state.space_reserve = services.space_reserve
    app.state.reconciler = services.reconciler
    # `GET /metrics`: this app's HTTP families and those read at scrape time.
    app.state.metrics = metrics.metrics_registry(
        services.engine, services.celery, settings.worker_timeout_seconds
    )
    install_error_handlers(app)
    # The last added runs first: the HTTP metrics (so that every answer is counted, the
    # refused ones too), the limit on requests at once, the body's limits, then the key
    # check, then the app.
    app.add_middleware(
        ApiKeyAuth,
        keys=KeyStore(
            app.state.session_factory, settings.api_key_projects(), settings.key_cache_seconds
        ),
        database=app.state.database,
    )
    app.add_middleware(
        RequestLimits,
        max_upload_bytes=settings.max_upload_bytes,
        max_json_bytes=settings.max_json_bytes,
        body_timeout=settings.body_timeout_seconds,
    )
    app.add_middleware(
        ConcurrencyLimit,
        limit=settings.max_concurrent_requests,
        max_queue_seconds=settings.max_queue_seconds,
    )
    app.add_middleware(
        HttpMetricsMiddleware,
        metrics=HttpMetrics(app.state.metrics),
        templates=RouteTemplates(lambda: all_routes(app.routes)),
    )
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(files.router)
    app.include_router(fine_tuning.router)
    app.include_router(job_artifacts.router)
    app.include_router(models.router)
    app.include_router(inference.router)
    app.include_router(workers.router)
    app.include_router(dashboard.router)
    app.mount(dashboard.STATIC_PATH, StaticFiles(directory=dashboard.STATIC_DIR), name="static")
    return app
