"""The reconciler: no job stays `running` without a worker, or `queued` without a message.

It runs in the API process (a thread; several API processes may each run one, since every
change it makes is a conditional UPDATE) and every few seconds:
- takes back a `running` job whose heartbeat is older than `AFINA_WORKER_TIMEOUT_SECONDS`:
  its worker was killed, crashed, or lost its machine. The job is queued again, to resume
  from the newest trainer state its runs kept, or it fails once its worker has been lost
  `AFINA_MAX_ATTEMPTS` times. Waiting for the broker instead would take an hour on Redis
  (its visibility timeout) and for ever on the embedded broker, which never redelivers.
- sends the message of a `queued` job that has none: the process that stored the job died
  before it could queue it.
"""

import logging
import threading
from datetime import datetime, timedelta
from typing import Any

from celery import Celery
from sqlalchemy import Row, select, update
from sqlalchemy.orm import Session, sessionmaker

from afina.core.settings import Settings
from afina.core.storage import ArtifactStorage, latest_resume_step, resume_key
from afina.models import Job, JobStatus, new_event
from afina.models.base import utcnow
from afina.worker.enqueue import enqueue

logger = logging.getLogger(__name__)

# A new job's message is sent by the API right after the job is stored: only one still
# unsent after this long has lost its sender.
UNSENT_GRACE_SECONDS = 10.0


class Reconciler:
    def __init__(
        self,
        settings: Settings,
        session_factory: sessionmaker[Session],
        storage: ArtifactStorage,
        queue: Celery,
    ) -> None:
        self.session_factory = session_factory
        self.storage = storage
        self.queue = queue
        self.timeout = timedelta(seconds=settings.worker_timeout_seconds)
        self.max_attempts = settings.max_attempts
        self.interval = max(0.5, min(10.0, settings.worker_timeout_seconds / 6))
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="reconciler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            try:
                self.reconcile()
            except Exception:
                logger.exception("reconciling jobs failed; trying again")
            if self._stopped.wait(self.interval):
                return

    def reconcile(self) -> None:
        now = utcnow()
        cutoff = now - self.timeout
        with self.session_factory() as session:
            lost = session.execute(
                select(Job.id, Job.lost_workers, Job.heartbeat_at, Job.steps_done).where(
                    Job.status == JobStatus.RUNNING, Job.heartbeat_at < cutoff
                )
            ).all()
            unsent = session.scalars(
                select(Job.id).where(
                    Job.status == JobStatus.QUEUED,
                    Job.enqueued_at.is_(None),
                    Job.updated_at < now - timedelta(seconds=UNSENT_GRACE_SECONDS),
                )
            ).all()
        # Once a message cannot be sent (the broker is down), the others of this pass are
        # not tried: their jobs keep an empty `enqueued_at`, and a later pass sends them.
        broker_up = True
        for job in lost:
            try:
                if self._take_back(job, now, cutoff) and broker_up:
                    broker_up = self._send(job.id)
            except Exception:
                logger.exception("could not take back job %s; trying again later", job.id)
        for job_id in unsent:
            if broker_up:
                logger.warning("job %s was queued without a message: sending it", job_id)
                broker_up = self._send(job_id)

    def _take_back(self, job: Row[Any], now: datetime, cutoff: datetime) -> bool:
        """Queue the job again, or fail it; True when it needs its message sent."""
        lost_workers = job.lost_workers + 1
        silent = (now - job.heartbeat_at).total_seconds()
        lost = f"at step {job.steps_done} (no heartbeat for {silent:.0f} s)"
        if lost_workers >= self.max_attempts:
            message = (
                f"the worker running this job was lost {lost_workers} times, the last {lost}. "
                "The worker's log says why; a worker that the machine kills for lack of memory "
                "ends this way: lower batch_size or training.max_seq_length"
            )
            failed = self._change(
                job.id,
                cutoff,
                f"Job failed: {message}",
                "error",
                status=JobStatus.FAILED,
                lost_workers=lost_workers,
                error={"code": "worker_lost", "message": message, "param": None},
                finished_at=now,
                estimated_finish=None,
            )
            if failed:
                self.storage.delete(resume_key(job.id))
            return False
        resume_step = latest_resume_step(self.storage, job.id) or 0
        return self._change(
            job.id,
            cutoff,
            f"Worker lost {lost}: queued again, to resume from step {resume_step} "
            f"(worker lost {lost_workers} time(s); the job fails at {self.max_attempts})",
            "warn",
            status=JobStatus.QUEUED,
            lost_workers=lost_workers,
            run_id=None,
            enqueued_at=None,
            steps_done=resume_step,
            epoch=None,
            estimated_finish=None,
        )

    def _change(self, job_id: str, cutoff: datetime, event: str, level: str, **values: Any) -> bool:
        """Apply the change if the job is still running with a stale heartbeat."""
        with self.session_factory.begin() as session:
            changed = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == JobStatus.RUNNING, Job.heartbeat_at < cutoff)
                .values(**values)
            ).rowcount
            if changed:
                session.add(
                    new_event(
                        job_id, event, level=level, data={"lost_workers": values["lost_workers"]}
                    )
                )
        return bool(changed)

    def _send(self, job_id: str) -> bool:
        try:
            with self.session_factory() as session:
                enqueue(self.queue, session, job_id)
        except Exception as error:
            logger.warning("could not queue job %s (%r); trying again later", job_id, error)
            return False
        return True
