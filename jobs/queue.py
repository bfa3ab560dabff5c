"""The training queues: their names, sending a job's message, and noting on the job whether
it has one.

A job's message goes to the job's own queue (`Job.queue`, chosen when it was created: the
worker class it was routed to), whoever sends it: the API, a resume, the reconciler. A worker
takes the queues it was started with (AFINA_WORKER_QUEUES, `afina worker --queues`):
`export` is the merged exports' queue, any other name a training queue.

A queued job whose `enqueued_at` is empty has no message (the process that meant to send it
died first, or a stopping worker handed it back): the reconciler sends it. A message sent
twice is harmless: a worker starts a job only while the database says it is queued.
"""

from collections.abc import Iterable
from datetime import datetime

from celery import Celery
from sqlalchemy import update
from sqlalchemy.orm import Session

from afina.jobs import exports
from afina.models import Job, JobStatus
from afina.models.base import utcnow

# The default training queue: a job goes there when nothing could be checked (no worker
# registered yet, the model's config not here), and every worker takes it by default.
TRAIN_QUEUE = "train"
TRAIN_TASK = "afina.train_job"
# Merged exports: a queue of their own, so that a worker can be kept for training.
EXPORT_QUEUE = "export"
EXPORT_TASK = "afina.export_model"


def training_queues(queues: Iterable[str]) -> list[str]:
    """The training queues among a worker's queues, in its order."""
    return [name for name in queues if name != EXPORT_QUEUE]


def message_counts(
    queue: Celery, names: Iterable[str], *, timeout: float | None = None
) -> dict[str, int]:
    """Messages waiting in each of the queues `names`: declaring a queue counts them (the
    workers declare theirs too). Raises when the broker cannot be reached (within `timeout`
    seconds, when given)."""
    with queue.connection_for_read() as connection:
        if timeout is not None:
            connection.ensure_connection(max_retries=1, interval_start=0, timeout=timeout)
        channel = connection.default_channel
        return {name: channel.queue_declare(queue=name).message_count for name in names}


def send(queue: Celery, job_id: str, name: str) -> None:
    """Send the job's message to the training queue `name` (it wins over any route)."""
    queue.send_task(TRAIN_TASK, args=[job_id], queue=name)


def enqueue(queue: Celery, session: Session, job_id: str, name: str) -> None:
    """Send the job's message to its training queue `name` (`Job.queue`), and note it."""
    send(queue, job_id, name)
    session.execute(
        update(Job).where(Job.id == job_id, Job.enqueued_at.is_(None)).values(enqueued_at=utcnow())
    )
    session.commit()


def enqueue_export(queue: Celery, session: Session, export_id: str) -> None:
    queue.send_task(EXPORT_TASK, args=[export_id])
    exports.sent(session, export_id)
    session.commit()


def enqueue_again(
    queue: Celery, session: Session, job_id: str, name: str, sent_before: datetime
) -> bool:
    """Send another message for a queued job whose message, sent before `sent_before`, was
    lost. The new time is written first, and only while the job is still queued with its
    message that old: of several reconcilers one sends it, and a database that takes no
    writes gets no message sent. False when the job has changed meanwhile (taken,
    cancelled, sent again)."""
    renewed = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.QUEUED, Job.enqueued_at < sent_before)
        .values(enqueued_at=utcnow())
    ).rowcount
    session.commit()
    if renewed:
        send(queue, job_id, name)
    return bool(renewed)


def handed_back(session: Session, job_id: str) -> None:
    """A queued job's message goes back to the broker: should the broker not take it, the
    reconciler sends another."""
    session.execute(
        update(Job).where(Job.id == job_id, Job.status == JobStatus.QUEUED).values(enqueued_at=None)
    )
