"""The composition root of each afina process: the database engine and sessions, artifact
storage, the Celery app, the reconciler and the inference engine, built from settings once
and closed once. `afina serve` (the API and its reconciler), the worker's task and the tests
build one `Services` each, so a process holds one of each, one reconciler included.

What a process may not need is built, and its module imported, when first asked for: the
worker's task sends no message and serves no model, so its process neither makes a second
Celery app nor loads the inference engine.
"""

from functools import cached_property
from typing import TYPE_CHECKING

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from afina.core.disk import SpaceReserve, sqlite_reserve
from afina.core.settings import Settings
from afina.core.storage import ArtifactStorage
from afina.jobs.reconciler import Reconciler
from afina.models.session import make_engine, make_session_factory

if TYPE_CHECKING:
    from celery import Celery

    from afina.serving.engine import InferenceEngine


class Services:
    def __init__(self, settings: Settings, *, database_threads: int | None = None) -> None:
        """`database_threads`: how many threads use the database at once, to size its pool
        by (`make_engine`)."""
        self.settings = settings
        self.engine: Engine = make_engine(settings.database_url, threads=database_threads)
        self.session_factory: sessionmaker[Session] = make_session_factory(self.engine)
        self.storage = ArtifactStorage(settings.storage_url, settings.storage_options())

    @cached_property
    def celery(self) -> "Celery":
        from afina.worker.celery_app import create_celery

        return create_celery(self.settings)

    @cached_property
    def space_reserve(self) -> SpaceReserve | None:
        """The space kept aside on a SQLite database's disk, for the writes that free space
        once it is full (`core.disk`)."""
        return sqlite_reserve(self.settings.database_url, self.settings.disk_reserve_bytes)

    @cached_property
    def reconciler(self) -> Reconciler:
        return Reconciler(
            self.settings,
            self.session_factory,
            self.storage,
            self.celery,
            space_reserve=self.space_reserve,
        )

    @cached_property
    def inference(self) -> "InferenceEngine":
        from afina.serving.engine import InferenceEngine

        return InferenceEngine(self.settings, self.storage)

    def close(self) -> None:
        """Stop and close what was built, the threads first."""
        built = self.__dict__
        if "reconciler" in built:
            self.reconciler.stop()
        if "inference" in built:
            self.inference.close()
        if "celery" in built:
            self.celery.close()
        self.engine.dispose()
