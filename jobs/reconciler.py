"""The reconciler: no job stays `running` without a worker, or `queued` without a message.

It runs in the API process (a thread; several API processes may each run one, since every
change it makes is a conditional UPDATE) and every few seconds:
- takes back a `running` job whose heartbeat is older than `AFINA_WORKER_TIMEOUT_SECONDS`:
  its worker was killed, crashed, or lost its machine. The job is queued again, to resume
  from the newest trainer state its runs kept, or it fails once its worker has been lost
  `AFINA_MAX_ATTEMPTS` times. Waiting for the broker instead would take an hour on Redis
  (its visibility timeout) and for ever on the embedded broker, which never redelivers.
  `afina serve`, which sees its own worker child die, runs a pass naming it at once.
- sends the message of a `queued` job that has none: the process that stored the job died
  before it could queue it;
- sends another message for a `queued` job whose message was lost: sent long ago, and the
  job's training queue on the broker is empty (a worker took it, then died before it could
  claim the job or hand the message back; the embedded broker never delivers a message
  twice);
- fails a merged export whose worker stopped stamping its heartbeat (an export keeps nothing
  to resume: the caller asks for another), and sends the message of a queued one that has
  none (stored without it, or whose message was lost as a job's can be);
- keeps the space reserve of a SQLite database (`core.disk`) in place once its disk has room.

A heartbeat is only as old as the database lets it be: while the database takes no writes
(locked, restarting), no worker can stamp one. So jobs are taken back for their heartbeat
only once the database has been taking writes for a whole timeout (`healthy_since`): each
pass first times a write that changes nothing, and a slow one, or a pass that failed, starts
that wait again. A worker known to have ended (`dead_worker`) is a certain loss: its jobs
are taken back at once all the same. A SQLite database whose disk is (nearly) full counts as
one that takes no writes, since heartbeats may be failing there while this pass's probe,
which changes nothing, goes through.
"""

import logging
import threading
import time
from datetime import datetime, timedelta
from typing import Any

from celery import Celery
from sqlalchemy import ColumnElement, Row, and_, false, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from afina.core.disk import MiB, SpaceReserve, free_bytes, sqlite_directory
from afina.core.settings import Settings
from afina.core.storage import ArtifactStorage, latest_resume_step
from afina.jobs import exports, lifecycle
from afina.jobs.queue import (
    EXPORT_QUEUE,
    enqueue,
    enqueue_again,
    enqueue_export,
    message_counts,
)
from afina.models import Job, JobStatus
from afina.models.base import utcnow

logger = logging.getLogger(__name__)

# A new job's message is sent by the API right after the job is stored: only one still
# unsent after this long has lost its sender.
UNSENT_GRACE_SECONDS = 10.0
# A queued job whose message went this long ago, while its training queue holds none, has
# lost it: workers take a message only to claim its job at once.
LOST_MESSAGE_SECONDS = 60.0
# Free space on a SQLite database's disk under which its writes (heartbeats) may fail.
FULL_DISK_BYTES = 8 * MiB


class _TooSlow(Exception):
    """A take-back's UPDATE waited on the database for longer than a pass lasts."""


class Reconciler:
    def __init__(
        self,
        settings: Settings,
        session_factory: sessionmaker[Session],
        storage: ArtifactStorage,
        queue: Celery,
        *,
        space_reserve: SpaceReserve | None = None,
    ) -> None:
        self.session_factory = session_factory
        self.space_reserve = space_reserve
        self.database_directory = sqlite_directory(settings.database_url)
        self.storage = storage
        self.queue = queue
        self.timeout = timedelta(seconds=settings.worker_timeout_seconds)
        self.max_attempts = settings.max_attempts
        self.interval = max(0.5, min(10.0, settings.heartbeat_seconds))
        # Since when (time.monotonic) the database has taken this reconciler's writes without
        # stalling; a process starting takes it as healthy, and its first pass checks.
        self.healthy_since = time.monotonic() - self.timeout.total_seconds()
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
            try:
                if self.space_reserve is not None:
                    self.space_reserve.ensure()
            except OSError:
                logger.exception("could not check the space reserve")
            if self._stopped.wait(self.interval):
                return

    def reconcile(self, dead_worker: str | None = None) -> None:
        """One pass. `dead_worker` names a worker process known to have ended (`afina serve`
        saw its child die): its jobs are taken back at once, not once their heartbeat is old."""
        try:
            self._probe()
            self._reconcile(dead_worker)
        except Exception:
            self._unhealthy()
            raise

    def _unhealthy(self) -> None:
        self.healthy_since = time.monotonic()

    def _probe(self) -> None:
        """Time a write that changes nothing but waits, like any write, for the database to
        take writes (on SQLite, its write lock): a slow one means the workers' heartbeats
        may have waited too."""
        started = time.monotonic()
        with self.session_factory.begin() as session:
            session.execute(update(Job).where(false()).values(worker=None))
        if time.monotonic() - started > self.interval:
            logger.warning("the database was slow to take a write: heartbeats may be late")
            self._unhealthy()
        if self.database_directory is not None:
            free = free_bytes(self.database_directory)
            if free < FULL_DISK_BYTES:
                logger.warning(
                    "the database's disk is full (%.1f MiB free): heartbeats may be failing",
                    free / MiB,
                )
                self._unhealthy()

    def _heartbeats_trusted(self) -> bool:
        return time.monotonic() - self.healthy_since >= self.timeout.total_seconds()

    def _reconcile(self, dead_worker: str | None) -> None:
        now = utcnow()
        causes = []
        if self._heartbeats_trusted():
            causes.append(Job.heartbeat_at < now - self.timeout)
        if dead_worker is not None:
            causes.append(Job.worker == dead_worker)
        lost_if = or_(*causes) if causes else false()
        with self.session_factory() as session:
            lost = session.execute(
                select(
                    Job.id,
                    Job.queue,
                    Job.lost_workers,
                    Job.heartbeat_at,
                    Job.steps_done,
                    Job.worker,
                ).where(Job.status == JobStatus.RUNNING, lost_if)
            ).all()
            unsent = session.execute(
                select(Job.id, Job.queue).where(
                    Job.status == JobStatus.QUEUED,
                    Job.enqueued_at.is_(None),
                    Job.updated_at < now - timedelta(seconds=UNSENT_GRACE_SECONDS),
                )
            ).all()
            sent_before = now - timedelta(seconds=LOST_MESSAGE_SECONDS)
            long_sent = session.execute(
                select(Job.id, Job.queue)
                .where(Job.status == JobStatus.QUEUED, Job.enqueued_at < sent_before)
                .order_by(Job.created_at)
            ).all()
        # Once a message cannot be sent (the broker is down), the others of this pass are
        # not tried: their jobs keep an empty `enqueued_at`, and a later pass sends them.
        broker_up = True
        for job in lost:
            try:
                certain = job.worker is not None and job.worker == dead_worker
                if self._take_back(job, now, lost_if, certain) and broker_up:
                    broker_up = self._send(job.id, job.queue)
            except _TooSlow:
                logger.warning("the database stalled taking back job %s: left as it is", job.id)
                self._unhealthy()
            except Exception:
                logger.exception("could not take back job %s; trying again later", job.id)
                self._unhealthy()
        for job_id, queue in unsent:
            if broker_up:
                logger.warning("job %s was queued without a message: sending it", job_id)
                broker_up = self._send(job_id, queue)
        # Each job's own queue: a message waiting there says the job's is not lost.
        empty: dict[str, bool] = {}
        for job_id, queue in long_sent:
            if not broker_up:
                break
            if queue not in empty:
                empty[queue] = self._queue_is_empty(queue)
            if empty[queue]:
                broker_up = self._send_again(job_id, queue, sent_before)
        if broker_up:
            self._reconcile_exports(now)

    def _reconcile_exports(self, now: datetime) -> None:
        with self.session_factory.begin() as session:
            if self._heartbeats_trusted():
                for export_id in exports.fail_lost(session, now - self.timeout):
                    logger.warning("export %s lost its worker: failed", export_id)
            unsent = exports.unsent(session, now - timedelta(seconds=UNSENT_GRACE_SECONDS))
            lost = exports.long_sent(session, now - timedelta(seconds=LOST_MESSAGE_SECONDS))
        if lost and self._queue_is_empty(EXPORT_QUEUE):  # lost, as `exports.long_sent` says
            unsent += lost
        for export_id in unsent:
            logger.warning("export %s was queued without a message: sending it", export_id)
            try:
                with self.session_factory() as session:
                    enqueue_export(self.queue, session, export_id)
            except Exception as error:
                logger.warning("could not queue export %s (%r); trying later", export_id, error)
                return

    def _take_back(
        self,
        job: Row[Any],
        now: datetime,
        lost_if: ColumnElement[bool],
        certain: bool,
    ) -> bool:
        """Queue the job again, or fail it; True when it needs its message sent. `certain`:
        its worker is known to have ended, rather than silent."""
        lost_workers = job.lost_workers + 1
        silent = (now - job.heartbeat_at).total_seconds()
        cause = "its worker process ended" if certain else f"no heartbeat for {silent:.0f} s"
        lost = f"at step {job.steps_done} ({cause})"
        where = and_(Job.id == job.id, Job.status == JobStatus.RUNNING, lost_if)
        data = {"lost_workers": lost_workers, "step": job.steps_done}
        resume_step = latest_resume_step(self.storage, job.id) or 0
        with self.session_factory.begin() as session:
            started = time.monotonic()
            if lost_workers >= self.max_attempts:
                message = (
                    f"the worker running this job was lost {lost_workers} times, the last "
                    f"{lost}. The worker's log says why; a worker that the machine kills for "
                    "lack of memory ends this way: lower batch_size or training.max_seq_length"
                )
                error = {"code": "worker_lost", "message": message, "param": None}
                changed = lifecycle.fail(
                    session,
                    job.id,
                    where,
                    error,
                    f"Job failed: {message}",
                    lost_workers=lost_workers,
                    data=data,
                )
            else:
                changed = lifecycle.requeue(
                    session,
                    job.id,
                    where,
                    f"Worker lost {lost}: queued again, to resume from step {resume_step} "
                    f"(worker lost {lost_workers} time(s); the job fails at {self.max_attempts})",
                    resume_step=resume_step,
                    level="warn",
                    lost_workers=lost_workers,
                    data=data,
                )
            # A change that waited on the database for longer than a pass is undone: the
            # heartbeats waited too, unless the job's worker is known to have ended.
            if changed and time.monotonic() - started > self.interval and not certain:
                raise _TooSlow  # rolls the change back
        if changed and lost_workers >= self.max_attempts:
            lifecycle.ended(self.storage, job.id)
            return False
        return changed == JobStatus.QUEUED  # a job paused meanwhile waits for its resume

    def _queue_is_empty(self, name: str) -> bool:
        """Whether the training queue `name` holds no message waiting for a worker (False
        when the broker cannot say). Declaring the queue counts them; the workers declare it
        too."""
        try:
            return message_counts(self.queue, [name])[name] == 0
        except Exception as error:
            logger.warning("could not count the messages of training queue %s (%r)", name, error)
            return False

    def _send_again(self, job_id: str, queue: str, sent_before: datetime) -> bool:
        try:
            with self.session_factory() as session:
                if enqueue_again(self.queue, session, job_id, queue, sent_before):
                    logger.warning(
                        "job %s has been queued for over %.0f s and the queue holds no message: "
                        "its message was lost, sending another",
                        job_id,
                        LOST_MESSAGE_SECONDS,
                    )
        except Exception as error:
            logger.warning("could not queue job %s again (%r); trying later", job_id, error)
            return False
        return True

    def _send(self, job_id: str, queue: str) -> bool:
        try:
            with self.session_factory() as session:
                enqueue(self.queue, session, job_id, queue)
        except Exception as error:
            logger.warning("could not queue job %s (%r); trying again later", job_id, error)
            return False
        return True
