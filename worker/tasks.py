"""Celery tasks: thin wrappers that hand a job id to the job runner.

A task hands its message back to the broker only when its worker stops: on a full disk (the
embedded broker shares the data dir's disk) or with the broker away, handing it back fails,
and the message is lost, and a message that could not be acknowledged or rejected keeps the
worker from taking any other (prefetch 1). A job that cannot be claimed because the database
fails keeps its message in the worker, which tries the claim again until it goes through.
"""

import logging
from functools import lru_cache
from typing import Any

from celery import Task, shared_task
from celery.exceptions import Reject
from celery.signals import worker_shutting_down
from sqlalchemy import update
from sqlalchemy.exc import SQLAlchemyError

from afina.core.settings import get_settings
from afina.core.storage import ArtifactStorage
from afina.models import Job, JobStatus
from afina.models.session import make_engine, make_session_factory
from afina.worker.celery_app import TRAIN_TASK
from afina.worker.job_records import shutdown_requested
from afina.worker.job_runner import WorkerContext, run_job

logger = logging.getLogger(__name__)

# How long a task whose job could not be claimed (the database failed: away, locked, its disk
# full) waits before it tries again, first and at most.
CLAIM_RETRY_DELAY_SECONDS = 1.0
CLAIM_RETRY_LONGEST_SECONDS = 30.0


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
    delay = CLAIM_RETRY_DELAY_SECONDS
    while True:
        try:
            requeued = run_job(_context(), job_id, task_id=self.request.id)
            break
        except SQLAlchemyError as error:
            # Raised before the job was claimed, or by a run that could not record its end
            # (then the job is no longer queued, and the next try finds it so). A job still
            # `queued` has had its message sent: dropping it would leave the job there.
            logger.warning(
                "could not claim job %s (%s); trying again in %.0f s",
                job_id,
                type(error).__name__,
                delay,
            )
            if shutdown_requested.wait(delay):
                _hand_back(job_id)
                raise Reject(reason="the worker is shutting down", requeue=True) from error
            delay = min(2 * delay, CLAIM_RETRY_LONGEST_SECONDS)
    if requeued:
        raise Reject(reason="the worker is shutting down", requeue=True)


def _hand_back(job_id: str) -> None:
    """Before a stopping worker hands back the message of a job it could not claim: mark the
    job as having none, so that the reconciler sends another should the broker not take it
    back. Best effort: the database has just failed."""
    try:
        with _context().session_factory.begin() as session:
            session.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == JobStatus.QUEUED)
                .values(enqueued_at=None)
            )
    except SQLAlchemyError as error:
        logger.warning("could not mark job %s as without a message (%r)", job_id, error)
