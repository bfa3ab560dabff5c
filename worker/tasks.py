"""Celery tasks: thin wrappers that hand a job id to the job runner."""

from functools import lru_cache
from typing import Any

from celery import Task, shared_task
from celery.exceptions import Reject
from celery.signals import worker_shutting_down

from afina.core.settings import get_settings
from afina.core.storage import ArtifactStorage
from afina.models.session import make_engine, make_session_factory
from afina.worker.celery_app import TRAIN_TASK
from afina.worker.job_records import shutdown_requested
from afina.worker.job_runner import WorkerContext, run_job


@lru_cache
def _context() -> WorkerContext:
    settings = get_settings()
    return WorkerContext(
        settings=settings,
        session_factory=make_session_factory(make_engine(settings.database_url or "")),
        storage=ArtifactStorage(settings.storage_url or ""),
    )


@worker_shutting_down.connect
def _stop_training(**_: Any) -> None:
    # Sent from the signal handler while a task may be training: it stops at the next step.
    shutdown_requested.set()


@shared_task(name=TRAIN_TASK, bind=True)
def train_job(self: Task, job_id: str) -> None:
    # A worker that is stopping neither starts a job nor drops its message: both go back.
    if shutdown_requested.is_set() or run_job(_context(), job_id, task_id=self.request.id):
        raise Reject(reason="the worker is shutting down", requeue=True)
