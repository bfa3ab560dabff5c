"""Celery tasks: thin wrappers that hand a job id to the job runner, or an export id to the
exporter.

A task hands its message back to the broker when its worker stops. A job that cannot be
claimed because the database fails is tried again later with Celery's retry: a copy of the
message, due after a pause that doubles up to `CLAIM_RETRY_LONGEST_SECONDS`, replaces this
one. Should the broker not take the copy (the embedded broker shares the data dir's disk,
which may be full), Celery drops the message; the job stays `queued`, and the reconciler
sends it another once the training queue has been empty for a while (`jobs.reconciler`).
"""

import logging
from functools import lru_cache
from typing import Any

from celery import Task, shared_task
from celery.exceptions import Reject
from celery.signals import worker_ready, worker_shutdown, worker_shutting_down
from sqlalchemy.exc import SQLAlchemyError

from afina.core.settings import get_settings
from afina.jobs.queue import EXPORT_TASK, TRAIN_QUEUE, TRAIN_TASK, handed_back, training_queues
from afina.services.root import Services
from afina.worker.exports import run_export
from afina.worker.job_runner import WorkerContext, run_job
from afina.worker.presence import Presence
from afina.worker.process import shutdown_requested, this_worker

logger = logging.getLogger(__name__)

# How long a task whose job could not be claimed (the database failed: away, locked, its disk
# full) waits before it tries again, first and at most.
CLAIM_RETRY_DELAY_SECONDS = 1.0
CLAIM_RETRY_LONGEST_SECONDS = 30.0


@lru_cache
def _context() -> WorkerContext:
    """The worker process's services, built at its first task and kept until it exits."""
    services = Services(get_settings())
    return WorkerContext(services.settings, services.session_factory, services.storage)


def _training_queues() -> list[str]:
    """The training queues this worker takes (AFINA_WORKER_QUEUES, `afina worker --queues`),
    in its order: the first is its worker class's own."""
    return training_queues(get_settings().worker_queues)


@lru_cache
def _presence() -> Presence:
    context = _context()
    return Presence(
        context.session_factory,
        this_worker(),
        _training_queues(),
        context.settings.heartbeat_seconds,
    )


def _trains() -> bool:
    """Whether this worker takes training jobs: only those count for the estimates."""
    return bool(_training_queues())


def _queue_of(task: Task) -> str:
    """The queue the task's message came from (a direct exchange's routing key is its
    queue's name): its retry goes back there, to the workers of the job's class."""
    delivery = task.request.delivery_info or {}
    return delivery.get("routing_key") or TRAIN_QUEUE


@worker_ready.connect
def _announce(**_: Any) -> None:
    if _trains():
        _presence().start()


@worker_shutdown.connect
def _withdraw(**_: Any) -> None:
    if _trains():
        _presence().stop()


@worker_shutting_down.connect
def _stop_training(**_: Any) -> None:
    # Sent from the signal handler while a task may be training: it stops at the next step.
    shutdown_requested.set()


@shared_task(name=TRAIN_TASK, bind=True, max_retries=None)
def train_job(self: Task, job_id: str) -> None:
    # A worker that is stopping neither starts a job nor drops its message: both go back.
    if shutdown_requested.is_set():
        raise Reject(reason="the worker is shutting down", requeue=True)
    try:
        requeued = run_job(_context(), job_id)
    except SQLAlchemyError as error:
        # Raised before the job was claimed, or by a run that could not record its end (then
        # the job is no longer queued, and the next try finds it so). A job still `queued`
        # has had its message sent: dropping it would leave the job there.
        if shutdown_requested.is_set():
            _hand_back(job_id)
            raise Reject(reason="the worker is shutting down", requeue=True) from error
        delay = _retry_delay(self)
        logger.warning(
            "could not claim job %s (%s); trying again in %.0f s",
            job_id,
            type(error).__name__,
            delay,
        )
        raise self.retry(exc=error, countdown=delay, queue=_queue_of(self)) from error
    if requeued:
        raise Reject(reason="the worker is shutting down", requeue=True)


@shared_task(name=EXPORT_TASK, bind=True, max_retries=None)
def export_model(self: Task, export_id: str) -> None:
    # A worker stopping mid-export fails it (the reconciler, once its heartbeat is old): a
    # merge keeps nothing to resume, and the caller asks for another.
    if shutdown_requested.is_set():
        raise Reject(reason="the worker is shutting down", requeue=True)
    try:
        run_export(_context(), export_id)
    except SQLAlchemyError as error:  # could not claim it, or record how it ended: later
        raise self.retry(exc=error, countdown=_retry_delay(self)) from error


def _retry_delay(task: Task) -> float:
    """A pause before the next try that doubles up to `CLAIM_RETRY_LONGEST_SECONDS`."""
    return min(CLAIM_RETRY_DELAY_SECONDS * 2**task.request.retries, CLAIM_RETRY_LONGEST_SECONDS)


def _hand_back(job_id: str) -> None:
    """Before a stopping worker hands back the message of a job it could not claim: mark the
    job as having none, so that the reconciler sends another should the broker not take it
    back. Best effort: the database has just failed."""
    try:
        with _context().session_factory.begin() as session:
            handed_back(session, job_id)
    except SQLAlchemyError as error:
        logger.warning("could not mark job %s as without a message (%r)", job_id, error)
