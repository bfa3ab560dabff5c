"""Sending a job's message to the training queue, and noting in the job that it was sent.

A queued job whose `enqueued_at` is still empty has no message yet (the process that meant to
send it died first): the reconciler sends it. A message sent twice is harmless: a worker
starts a job only while the database says it is queued.
"""

from datetime import datetime

from celery import Celery
from sqlalchemy import update
from sqlalchemy.orm import Session

from afina.models import Job, JobStatus
from afina.models.base import utcnow
from afina.worker.celery_app import TRAIN_TASK


def enqueue(queue: Celery, session: Session, job_id: str) -> None:
    queue.send_task(TRAIN_TASK, args=[job_id])
    session.execute(
        update(Job).where(Job.id == job_id, Job.enqueued_at.is_(None)).values(enqueued_at=utcnow())
    )
    session.commit()


def enqueue_again(queue: Celery, session: Session, job_id: str, sent_before: datetime) -> bool:
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
        queue.send_task(TRAIN_TASK, args=[job_id])
    return bool(renewed)
