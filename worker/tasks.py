"""Celery tasks: thin wrappers that hand a job id to the job runner."""

import logging
import time
from functools import lru_cache
from typing import Any

from celery import Task, shared_task
from celery.exceptions import Reject
from celery.signals import worker_shutting_down
from sqlalchemy.exc import SQLAlchemyError

from afina.core.settings import get_settings
from afina.core.storage import ArtifactStorage
from afina.models.session import make_engine, make_session_factory
from afina.worker.celery_app import TRAIN_TASK
from afina.worker.job_records import shutdown_requested
from afina.worker.job_runner import WorkerContext, run_job

logger = logging.getLogger(__name__)

# How long a task whose job could not be claimed (the database failed) waits before its
# message goes back to the broker, so that it is not retried in a tight loop.
CLAIM_RETRY_DELAY_SECONDS = 5.0


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
    if shutdown_requested.is_set():
        raise Reject(reason="the worker is shutting down", requeue=True)
    try:
        requeued = run_job(_context(), job_id, task_id=self.request.id)
    except SQLAlchemyError as error:
        # Raised before the job was claimed (a job that ran ends failed inside run_job): the
        # job is still `queued` with its message sent, so dropping the message would leave
        # it there for ever. It goes back instead; the claim settles any second delivery.
        logger.warning(
            "could not claim job %s (%s); its message goes back to the queue",
            job_id,
            type(error).__name__,
        )
        time.sleep(CLAIM_RETRY_DELAY_SECONDS)
        raise Reject(reason="the database could not be reached", requeue=True) from error
    if requeued:
        raise Reject(reason="the worker is shutting down", requeue=True)
