"""Sending a job's message to the training queue, and noting in the job that it was sent.

A queued job whose `enqueued_at` is still empty has no message yet (the process that meant to
send it died first): the reconciler sends it. A message sent twice is harmless: a worker
starts a job only while the database says it is queued.
"""

from celery import Celery
from sqlalchemy import update
from sqlalchemy.orm import Session

from afina.models import Job
from afina.models.base import utcnow
from afina.worker.celery_app import TRAIN_TASK


def enqueue(queue: Celery, session: Session, job_id: str) -> None:
    queue.send_task(TRAIN_TASK, args=[job_id])
    session.execute(
        update(Job).where(Job.id == job_id, Job.enqueued_at.is_(None)).values(enqueued_at=utcnow())
    )
    session.commit()
