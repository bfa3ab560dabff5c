"""The FastAPI application factory."""

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from afina.api.auth import ApiKeyAuth
from afina.api.errors import install_error_handlers
from afina.api.keys import KeyStore
from afina.api.limits import BodySizeLimit
from afina.api.routers import files, fine_tuning, health, inference, models
from afina.core.disk import sqlite_reserve
from afina.core.settings import Settings, get_settings
from afina.core.storage import ArtifactStorage
from afina.models.session import make_engine, make_session_factory
from afina.worker.celery_app import create_celery
from afina.worker.inference.engine import InferenceEngine
from afina.worker.reconciler import Reconciler

logger = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    engine = make_engine(settings.database_url)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if app.state.space_reserve is not None:
            try:
                app.state.space_reserve.ensure()
            except OSError:
                logger.exception("could not keep space aside for a full disk")
        app.state.reconciler.start()
        yield
        await run_in_threadpool(app.state.reconciler.stop)
        await run_in_threadpool(app.state.inference.close)
        app.state.celery.close()
        engine.dispose()

    app = FastAPI(
        title="afina",
        summary="Self-hosted, OpenAI-compatible QLoRA fine-tuning",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.session_factory = make_session_factory(engine)
    app.state.storage = ArtifactStorage(settings.storage_url)
    app.state.celery = create_celery(settings)
    app.state.inference = InferenceEngine(settings, app.state.storage)
    # Made (when the disk has room) at start-up, then again by the reconciler's passes once
    # a full disk has had it released.
    app.state.space_reserve = sqlite_reserve(
        settings.database_url or "", settings.disk_reserve_bytes
    )
    app.state.reconciler = Reconciler(
        settings,
        app.state.session_factory,
        app.state.storage,
        app.state.celery,
        space_reserve=app.state.space_reserve,
    )
    install_error_handlers(app)
    # The last added runs first: the size limit, then the key check, then the app.
    app.add_middleware(
        ApiKeyAuth, keys=KeyStore(app.state.session_factory, settings.api_key_projects())
    )
    app.add_middleware(
        BodySizeLimit,
        max_upload_bytes=settings.max_upload_bytes,
        max_json_bytes=settings.max_json_bytes,
    )
    app.include_router(health.router)
    app.include_router(files.router)
    app.include_router(fine_tuning.router)
    app.include_router(models.router)
    app.include_router(inference.router)
    return app
