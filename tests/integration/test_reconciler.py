"""The reconciler and the fencing of a job's runs, on each backend with its real broker:
SQLite with the embedded SQLite broker, PostgreSQL with Redis.

No worker process and no training: job rows are written as a worker leaves them (a `running`
job whose heartbeat stopped, a `queued` job whose message was never sent), trainer states
are put in storage as a run keeps them, a reconciler's pass is run directly, and what it
sent is read back off the broker's training queue. The fencing tests then play the run that
lost its job: whatever it still writes must change nothing.
"""

import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from sqlalchemy import select, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from afina.core.ids import new_id
from afina.core.settings import Settings
from afina.core.storage import (
    TEMPORARY_MARK,
    ArtifactStorage,
    adapter_key,
    checkpoint_key,
    resume_key,
    staged_adapter_key,
)
from afina.jobs import retry
from afina.jobs.queue import EXPORT_QUEUE, EXPORT_TASK, TRAIN_QUEUE, TRAIN_TASK
from afina.jobs.reconciler import LOST_MESSAGE_SECONDS, UNSENT_GRACE_SECONDS, Reconciler
from afina.jobs.run import Run
from afina.models import (
    ExportStatus,
    Job,
    JobCheckpoint,
    JobEvent,
    JobExport,
    JobMetric,
    JobStatus,
)
from afina.models.base import utcnow
from afina.services.root import Services
from afina.worker import job_runner
from afina.worker.heartbeat import Heartbeat
from afina.worker.job_runner import WorkerContext, claim, fail, finish, run_job, stopped
from afina.worker.process import shutdown_requested
from afina.worker.run_recorder import JobRecorder
from afina.worker.training.errors import TrainingFailure
from afina.worker.training.run import TrainingOutcome
from tests.support import JOB_CONFIG, broker_url_for, job_row, take_messages

pytestmark = pytest.mark.both_backends

TIMEOUT = 30.0  # AFINA_WORKER_TIMEOUT_SECONDS
MAX_ATTEMPTS = 3
SILENT = timedelta(seconds=3 * TIMEOUT)  # how long a lost worker's job has had no heartbeat
STEPS_DONE = 15  # where a lost run had got to


@dataclass
class Stack:
    """What the API's reconciler and a worker's run share: the database, storage, broker."""

    services: Services
    transport_options: dict[str, Any]
    opened: list[Services] = field(default_factory=list)  # closed at the end of the test

    @property
    def settings(self) -> Settings:
        return self.services.settings

    @property
    def session_factory(self) -> sessionmaker[Session]:
        return self.services.session_factory

    @property
    def storage(self) -> ArtifactStorage:
        return self.services.storage

    @property
    def queue(self) -> Celery:
        return self.services.celery

    def reconciler(self, cls: type[Reconciler] = Reconciler, **overrides: Any) -> Reconciler:
        """A reconciler as an API process runs it, with its own services (engine, broker
        connection), on these settings with `overrides`."""
        services = Services(self.settings.model_copy(update=overrides))
        services.celery.conf.broker_transport_options = self.transport_options
        self.opened.append(services)
        return cls(services.settings, services.session_factory, services.storage, services.celery)

    def context(self) -> WorkerContext:
        return WorkerContext(self.settings, self.session_factory, self.storage)

    def close(self) -> None:
        for services in [*self.opened, self.services]:
            services.close()


@pytest.fixture(scope="session")
def redis_broker_url(postgres_url: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Redis as the end-to-end stack gets it: a database emptied once per test run."""
    return broker_url_for(postgres_url, tmp_path_factory.mktemp("broker"))


@pytest.fixture
def stack(
    request: pytest.FixtureRequest, make_settings, clean_database: str, tmp_path: Path
) -> Iterator[Stack]:
    sqlite = make_url(clean_database).get_backend_name() == "sqlite"
    settings = make_settings(
        broker_url=(
            broker_url_for(clean_database, tmp_path / "data")  # a broker file of the test's own
            if sqlite
            else request.getfixturevalue("redis_broker_url")
        ),
        worker_timeout_seconds=TIMEOUT,
        max_attempts=MAX_ATTEMPTS,
    )
    # On Redis, keys of this test's own, on a database it does not empty again.
    options = {} if sqlite else {"global_keyprefix": f"afina-test-{secrets.token_hex(4)}:"}
    services = Services(settings)
    services.celery.conf.broker_transport_options = options
    stack = Stack(services, options)
    yield stack
    stack.close()


# --- rows, storage and broker, as the API and the workers leave them -------------------------


def add_job(stack: Stack, status: JobStatus, **values: Any) -> Job:
    job = job_row(status=status, **values)
    with stack.session_factory.begin() as session:
        session.add(job)
    return job


def running_job(
    stack: Stack,
    *,
    silent: timedelta = SILENT,
    lost_workers: int = 0,
    worker: str | None = "afina-serve-0",
    queue: str = TRAIN_QUEUE,
) -> Job:
    """A job as its run leaves it in the database: held by that run on `worker`, with a
    heartbeat stamped `silent` ago. It is the job as that run knows it, `run_id` included."""
    now = utcnow()
    return add_job(
        stack,
        JobStatus.RUNNING,
        queue=queue,
        run_id=secrets.token_hex(16),
        worker=worker,
        attempts=lost_workers + 1,
        lost_workers=lost_workers,
        steps_done=STEPS_DONE,
        total_steps=40,
        epoch=0.4,
        estimated_finish=now + timedelta(hours=1),
        enqueued_at=now - silent - timedelta(minutes=5),
        started_at=now - silent - timedelta(minutes=1),
        heartbeat_at=now - silent,
    )


def recorder_of(stack: Stack, job: Job) -> JobRecorder:
    return JobRecorder(stack.session_factory, stack.storage, run_of(job))


def run_of(job: Job) -> Run:
    """The run that holds `job`, as the job's row names it."""
    assert job.run_id is not None
    return Run(job.id, job.run_id)


def stored(stack: Stack, job_id: str) -> Job:
    with stack.session_factory() as session:
        return session.get_one(Job, job_id)


def events(stack: Stack, job_id: str) -> list[JobEvent]:
    with stack.session_factory() as session:
        return list(session.scalars(select(JobEvent).where(JobEvent.job_id == job_id)))


def trainer_state(tmp_path: Path, step: int) -> Path:
    """A trainer checkpoint directory, as the Trainer writes it at `step`."""
    directory = tmp_path / "trainer" / f"checkpoint-{step}"
    directory.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors", "optimizer.pt"):
        (directory / name).write_text(f"{name} at step {step}")
    return directory


def keep_resume_state(stack: Stack, tmp_path: Path, job_id: str, step: int) -> None:
    stack.storage.put_directory(trainer_state(tmp_path, step), resume_key(job_id, step))


def half_written_resume_state(stack: Stack, job_id: str, step: int) -> None:
    """What a run killed while uploading its state at `step` leaves in storage."""
    partial = Path(stack.storage.path(resume_key(job_id, step)) + f"{TEMPORARY_MARK}0badc0de")
    partial.mkdir(parents=True)
    (partial / "optimizer.pt").write_text("half")


def resume_steps(stack: Stack, job_id: str) -> list[str]:
    return stack.storage.names(resume_key(job_id))


def trained(directory: Path, adapter: str) -> TrainingOutcome:
    """How a run that trained to its end returns: with its adapter saved in `directory`."""
    directory.mkdir(parents=True)
    (directory / "adapter_model.safetensors").write_text(adapter)
    return TrainingOutcome(JOB_CONFIG, directory, steps=40, trained_tokens=1000)


def snapshot(job: Job) -> dict[str, Any]:
    return {column.key: getattr(job, column.key) for column in Job.__mapper__.column_attrs}


# --- the reconciler ---------------------------------------------------------------------------


@pytest.mark.parametrize("kept", [(), (10, 20)], ids=["no-checkpoint", "checkpoints"])
def test_a_job_whose_heartbeat_stopped_is_queued_again_to_resume_from_its_newest_state(
    stack: Stack, tmp_path: Path, kept: tuple[int, ...]
):
    job = running_job(stack)
    for step in kept:
        keep_resume_state(stack, tmp_path, job.id, step)
    half_written_resume_state(stack, job.id, 30)  # not a state to resume from

    stack.reconciler().reconcile()

    row = stored(stack, job.id)
    resume_step = max(kept, default=0)
    assert row.status == JobStatus.QUEUED
    assert (row.lost_workers, row.attempts) == (1, 1)
    assert row.run_id is None
    assert row.steps_done == resume_step
    assert (row.epoch, row.estimated_finish, row.finished_at, row.error) == (None,) * 4
    assert row.enqueued_at is not None
    assert row.enqueued_at > job.enqueued_at
    (event,) = events(stack, job.id)
    assert event.level == "warn"
    assert event.message.startswith(f"Worker lost at step {STEPS_DONE} (no heartbeat for 9")
    assert f"queued again, to resume from step {resume_step} " in event.message
    assert f"(worker lost 1 time(s); the job fails at {MAX_ATTEMPTS})" in event.message
    assert event.data == {"lost_workers": 1, "step": STEPS_DONE}
    assert take_messages(stack.queue) == [job.id]
    # The state the next run resumes from is kept.
    assert resume_steps(stack, job.id) == [f"step-{step}" for step in kept]


def test_the_job_of_a_worker_seen_to_die_is_taken_back_at_once(stack: Stack, tmp_path: Path):
    dead = running_job(stack, silent=timedelta(0), worker="afina-serve-dead")
    others = [
        running_job(stack, silent=timedelta(0), worker="afina-serve-alive"),
        running_job(stack, silent=timedelta(0), worker=None),
    ]
    keep_resume_state(stack, tmp_path, dead.id, 10)
    before = {job.id: snapshot(stored(stack, job.id)) for job in others}

    stack.reconciler().reconcile(dead_worker="afina-serve-dead")

    row = stored(stack, dead.id)
    assert row.status == JobStatus.QUEUED
    assert (row.lost_workers, row.steps_done, row.run_id) == (1, 10, None)
    (event,) = events(stack, dead.id)
    assert event.message.startswith(
        f"Worker lost at step {STEPS_DONE} (its worker process ended): queued again, to "
        "resume from step 10"
    )
    assert take_messages(stack.queue) == [dead.id]
    # Other workers' jobs, their heartbeats fresh, stay theirs.
    assert {job.id: snapshot(stored(stack, job.id)) for job in others} == before
    assert all(events(stack, job.id) == [] for job in others)


def test_a_fresh_heartbeat_is_left_alone(stack: Stack):
    # Stamped by clocks in other time zones: the same instants, wherever the API runs.
    west, east = timezone(timedelta(hours=-5)), timezone(timedelta(hours=5))
    fresh = running_job(stack, silent=timedelta(seconds=TIMEOUT - 10))
    fresh_west = running_job(stack, silent=timedelta(0))
    with stack.session_factory.begin() as session:
        session.execute(
            update(Job)
            .where(Job.id == fresh_west.id)
            .values(heartbeat_at=utcnow().astimezone(west))
        )
    stale_east = running_job(stack)
    with stack.session_factory.begin() as session:
        session.execute(
            update(Job)
            .where(Job.id == stale_east.id)
            .values(heartbeat_at=(utcnow() - SILENT).astimezone(east))
        )
    before = {job.id: snapshot(stored(stack, job.id)) for job in (fresh, fresh_west)}

    stack.reconciler().reconcile()

    for job in (fresh, fresh_west):
        assert snapshot(stored(stack, job.id)) == before[job.id]
        assert events(stack, job.id) == []
    assert stored(stack, stale_east.id).status == JobStatus.QUEUED
    assert take_messages(stack.queue) == [stale_east.id]


def test_a_job_whose_worker_is_lost_max_attempts_times_fails(stack: Stack, tmp_path: Path):
    job = running_job(stack, lost_workers=MAX_ATTEMPTS - 1)
    keep_resume_state(stack, tmp_path, job.id, 10)
    half_written_resume_state(stack, job.id, 20)

    stack.reconciler().reconcile()

    row = stored(stack, job.id)
    assert row.status == JobStatus.FAILED
    assert (row.lost_workers, row.attempts) == (MAX_ATTEMPTS, MAX_ATTEMPTS)
    assert row.error is not None
    assert (row.error["code"], row.error["param"]) == ("worker_lost", None)
    message = row.error["message"]
    assert message.startswith(
        f"the worker running this job was lost {MAX_ATTEMPTS} times, the last at step "
        f"{STEPS_DONE} (no heartbeat for 9"
    )
    assert "lower batch_size or training.max_seq_length" in message
    assert row.finished_at is not None
    assert row.finished_at > job.heartbeat_at
    assert row.estimated_finish is None
    (event,) = events(stack, job.id)
    assert (event.level, event.message) == ("error", f"Job failed: {message}")
    assert take_messages(stack.queue) == []
    assert not stack.storage.exists(resume_key(job.id))  # half-written state included


def test_a_job_lost_while_it_was_to_pause_is_paused_and_a_paused_job_is_never_lost(
    stack: Stack, tmp_path: Path
):
    pausing = running_job(stack)
    keep_resume_state(stack, tmp_path, pausing.id, 10)
    with stack.session_factory.begin() as session:
        asked = update(Job).where(Job.id == pausing.id).values(pause_requested_at=utcnow())
        session.execute(asked)
    long_ago = utcnow() - timedelta(hours=1)
    paused = add_job(stack, JobStatus.PAUSED, heartbeat_at=long_ago, updated_at=long_ago)

    stack.reconciler().reconcile()

    row = stored(stack, pausing.id)
    assert (row.status, row.run_id, row.steps_done) == (JobStatus.PAUSED, None, 10)
    assert (row.pause_requested_at, row.estimated_finish) == (None, None)
    assert row.lost_workers == 1
    assert [event.message for event in events(stack, pausing.id)] == [
        "Job paused: it resumes from step 10"
    ]
    assert take_messages(stack.queue) == []  # resuming it sends one
    assert snapshot(stored(stack, paused.id))["status"] == JobStatus.PAUSED
    assert events(stack, paused.id) == []


def test_an_export_whose_worker_went_silent_fails_and_an_unsent_one_is_sent(stack: Stack):
    job = add_job(stack, JobStatus.SUCCEEDED)
    long_ago = utcnow() - timedelta(seconds=TIMEOUT + UNSENT_GRACE_SECONDS + 5)

    def export(status: ExportStatus, **values: Any) -> str:
        row = JobExport(
            id=new_id("ftexport"), job_id=job.id, status=status, format="merged", dtype="bfloat16"
        )
        for name, value in values.items():
            setattr(row, name, value)
        with stack.session_factory.begin() as session:
            session.add(row)
        return row.id

    silent = export(ExportStatus.RUNNING, heartbeat_at=long_ago, created_at=long_ago)
    beating = export(ExportStatus.RUNNING, heartbeat_at=utcnow(), created_at=long_ago)
    unsent = export(ExportStatus.QUEUED, created_at=long_ago)
    just_created = export(ExportStatus.QUEUED)

    stack.reconciler().reconcile()

    with stack.session_factory() as session:
        found = {row.id: row for row in session.scalars(select(JobExport))}
    assert found[silent].status == ExportStatus.FAILED
    assert found[silent].error["code"] == "worker_lost"
    assert found[beating].status == ExportStatus.RUNNING
    assert take_messages(stack.queue, EXPORT_QUEUE, EXPORT_TASK) == [unsent]
    assert found[just_created].enqueued_at is None
    assert take_messages(stack.queue) == []
    assert [event.message for event in events(stack, job.id)] == [
        f"Export {silent} failed: {found[silent].error['message']}"
    ]

    # Its message taken by a worker that died before claiming it: sent again once the
    # export queue holds none.
    sent_long_ago = utcnow() - timedelta(seconds=LOST_MESSAGE_SECONDS + 5)
    lost = export(ExportStatus.QUEUED, created_at=sent_long_ago, enqueued_at=sent_long_ago)
    stack.reconciler().reconcile()
    assert take_messages(stack.queue, EXPORT_QUEUE, EXPORT_TASK) == [lost]


def test_a_queued_job_without_a_message_gets_one_once_its_sender_has_had_time(stack: Stack):
    long_ago = utcnow() - timedelta(seconds=UNSENT_GRACE_SECONDS + 5)
    unsent = add_job(stack, JobStatus.QUEUED, updated_at=long_ago)
    just_stored = add_job(stack, JobStatus.QUEUED)  # its sender may be sending it now
    sent = add_job(stack, JobStatus.QUEUED, updated_at=long_ago, enqueued_at=long_ago)

    stack.reconciler().reconcile()

    assert take_messages(stack.queue) == [unsent.id]
    assert stored(stack, unsent.id).enqueued_at is not None
    assert stored(stack, just_stored.id).enqueued_at is None
    assert stored(stack, sent.id).enqueued_at == long_ago
    for job in (unsent, just_stored, sent):
        assert stored(stack, job.id).status == JobStatus.QUEUED
        assert events(stack, job.id) == []


def test_a_queued_job_whose_message_was_lost_gets_another(stack: Stack):
    """Its message was taken by a worker that died before it could claim the job or hand the
    message back, or handing it back failed (the broker's disk was full): the training queue
    is empty, and the embedded broker never delivers a message twice."""
    long_ago = utcnow() - timedelta(seconds=LOST_MESSAGE_SECONDS + 5)
    lost = add_job(stack, JobStatus.QUEUED, enqueued_at=long_ago, updated_at=long_ago)
    just_sent = utcnow() - timedelta(seconds=5)  # a worker may be about to claim it
    recent = add_job(stack, JobStatus.QUEUED, enqueued_at=just_sent, updated_at=just_sent)

    stack.reconciler().reconcile()

    assert take_messages(stack.queue) == [lost.id]
    assert stored(stack, lost.id).enqueued_at > long_ago
    assert stored(stack, recent.id).enqueued_at == just_sent
    assert events(stack, lost.id) == []
    stack.reconciler().reconcile()  # sent again just now: not once more
    assert take_messages(stack.queue) == []


def test_queued_jobs_whose_messages_wait_in_the_queue_are_not_sent_again(stack: Stack):
    """Jobs waiting for a free worker, for as long as it takes."""
    long_ago = utcnow() - timedelta(hours=2)
    waiting = [
        add_job(stack, JobStatus.QUEUED, enqueued_at=long_ago, updated_at=long_ago)
        for _ in range(2)
    ]
    stack.queue.send_task(TRAIN_TASK, args=[waiting[1].id])  # the first is with a worker

    stack.reconciler().reconcile()

    assert take_messages(stack.queue) == [waiting[1].id]  # only the one that was there
    assert [stored(stack, job.id).enqueued_at for job in waiting] == [long_ago] * 2


def test_a_job_s_message_goes_to_the_job_s_own_queue(stack: Stack):
    """Routed to a worker class when it was created: the message the reconciler sends for a
    job taken back from a lost worker, or for one stored without its message, goes there."""
    taken_back = running_job(stack, queue="train-24g")
    long_ago = utcnow() - timedelta(seconds=UNSENT_GRACE_SECONDS + 5)
    unsent = add_job(stack, JobStatus.QUEUED, queue="train-80g", updated_at=long_ago)

    stack.reconciler().reconcile()

    assert stored(stack, taken_back.id).status == JobStatus.QUEUED
    assert take_messages(stack.queue, "train-24g") == [taken_back.id]
    assert take_messages(stack.queue, "train-80g") == [unsent.id]
    assert take_messages(stack.queue) == []


def test_a_lost_message_is_sent_again_when_the_job_s_own_queue_is_empty(stack: Stack):
    """A message waiting on another class's queue says nothing of this job's; one waiting on
    its own queue (another job's, for a busy class) does."""
    long_ago = utcnow() - timedelta(seconds=LOST_MESSAGE_SECONDS + 5)

    def lost_on(queue: str) -> Job:
        return add_job(
            stack, JobStatus.QUEUED, queue=queue, enqueued_at=long_ago, updated_at=long_ago
        )

    lost, waiting, behind = lost_on("train-80g"), lost_on(TRAIN_QUEUE), lost_on("train-24g")
    stack.queue.send_task(TRAIN_TASK, args=[waiting.id], queue=TRAIN_QUEUE)
    stack.queue.send_task(TRAIN_TASK, args=["ftjob-another"], queue="train-24g")

    stack.reconciler().reconcile()

    assert take_messages(stack.queue, "train-80g") == [lost.id]
    assert stored(stack, lost.id).enqueued_at > long_ago
    assert take_messages(stack.queue) == [waiting.id]  # only the one that was there
    assert take_messages(stack.queue, "train-24g") == ["ftjob-another"]
    assert [stored(stack, job.id).enqueued_at for job in (waiting, behind)] == [long_ago] * 2


@pytest.mark.parametrize("status", [JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED])
def test_an_ended_job_is_never_touched(stack: Stack, status: JobStatus):
    # Its heartbeat is long stale, and it has never had a message since.
    job = running_job(stack)
    long_ago = utcnow() - timedelta(hours=1)
    with stack.session_factory.begin() as session:
        session.execute(
            update(Job)
            .where(Job.id == job.id)
            .values(status=status, enqueued_at=None, updated_at=long_ago, finished_at=long_ago)
        )
    before = snapshot(stored(stack, job.id))

    stack.reconciler().reconcile()

    assert snapshot(stored(stack, job.id)) == before
    assert events(stack, job.id) == []
    assert take_messages(stack.queue) == []


@pytest.mark.parametrize("lost_workers", [0, MAX_ATTEMPTS - 1], ids=["requeued", "failed"])
def test_two_reconcilers_at_once_take_a_job_back_once(
    stack: Stack, tmp_path: Path, lost_workers: int
):
    """Two API processes: both find the job lost before either takes it back."""
    job = running_job(stack, lost_workers=lost_workers)
    keep_resume_state(stack, tmp_path, job.id, 10)
    both_found_it = threading.Barrier(2, timeout=30)

    class Racing(Reconciler):
        def _take_back(self, *args: Any) -> bool:
            both_found_it.wait()
            return super()._take_back(*args)

    reconcilers = [stack.reconciler(Racing) for _ in range(2)]
    failures: list[BaseException] = []

    def run(reconciler: Reconciler) -> None:
        try:
            reconciler.reconcile()
        except BaseException as error:  # pragma: no cover - reported below
            failures.append(error)

    threads = [threading.Thread(target=run, args=(r,)) for r in reconcilers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []

    row = stored(stack, job.id)
    assert row.lost_workers == lost_workers + 1
    (event,) = events(stack, job.id)
    if lost_workers + 1 < MAX_ATTEMPTS:
        assert row.status == JobStatus.QUEUED
        assert event.message.startswith("Worker lost")
        assert take_messages(stack.queue) == [job.id]
    else:
        assert row.status == JobStatus.FAILED
        assert event.message.startswith("Job failed")
        assert take_messages(stack.queue) == []


def test_a_job_taken_back_while_the_broker_is_down_gets_its_message_later(stack: Stack):
    job = running_job(stack)
    # Nothing listens on port 1: the message cannot be sent.
    stack.reconciler(broker_url="redis://127.0.0.1:1/0").reconcile()

    row = stored(stack, job.id)
    assert row.status == JobStatus.QUEUED
    assert row.enqueued_at is None  # still to be sent
    assert len(events(stack, job.id)) == 1

    reconciler = stack.reconciler()
    reconciler.reconcile()  # within the grace a new job's sender has: not yet
    assert take_messages(stack.queue) == []
    long_ago = utcnow() - timedelta(seconds=UNSENT_GRACE_SECONDS + 5)
    with stack.session_factory.begin() as session:
        session.execute(update(Job).where(Job.id == job.id).values(updated_at=long_ago))
    reconciler.reconcile()

    assert take_messages(stack.queue) == [job.id]
    row = stored(stack, job.id)
    assert (row.status, row.lost_workers) == (JobStatus.QUEUED, 1)
    assert row.enqueued_at is not None
    assert len(events(stack, job.id)) == 1


# --- a run whose job was taken back -----------------------------------------------------------


def test_a_run_whose_job_was_taken_back_changes_nothing(stack: Stack, tmp_path: Path):
    old = running_job(stack)  # the job as the lost run knows it
    old_run = JobRecorder(stack.session_factory, stack.storage, run_of(old))
    old_heartbeat = Heartbeat.of_run(
        stack.session_factory, run_of(old), stack.settings.heartbeat_seconds
    )
    keep_resume_state(stack, tmp_path, old.id, 10)

    stack.reconciler().reconcile()
    assert stored(stack, old.id).status == JobStatus.QUEUED
    assert old_run.progress(16, 40, 0.4, None) is False
    assert take_messages(stack.queue) == [old.id]

    # The next worker takes the message: a new run holds the job.
    claimed = claim(stack.context(), old.id)
    assert claimed is not None
    new, run = claimed
    assert run.run_id == new.run_id != old.run_id
    assert new.attempts == 2
    new_run = JobRecorder(stack.session_factory, stack.storage, run_of(new))
    assert new_run.progress(11, 40, 0.3, None) is True
    new_run.metric(11, {"loss": 1.0})
    before = snapshot(stored(stack, old.id))
    events_before = {event.id for event in events(stack, old.id)}

    # The lost run comes back (a frozen process, a database it could not reach) and goes on.
    assert old_run.progress(17, 40, 0.45, utcnow()) is False
    assert old_heartbeat.beat() is False
    old_run.event("Step 17: eval_loss 1.2345")
    old_run.metric(11, {"loss": 9.0})
    old_run.metric(17, {"loss": 9.0})
    old_run.checkpoint(20, str(trainer_state(tmp_path, 20)), {"step": 20})
    fail(stack.context(), run_of(old), TrainingFailure("training_error", "the lost run failed"))
    outcome = trained(tmp_path / "old", "the lost run's adapter")
    assert finish(stack.context(), old, old_run, outcome) is False

    assert snapshot(stored(stack, old.id)) == before  # heartbeat_at included
    with stack.session_factory() as session:
        metrics = list(session.scalars(select(JobMetric).where(JobMetric.job_id == old.id)))
        checkpoints = list(session.scalars(select(JobCheckpoint)))
    assert [(m.step, m.loss) for m in metrics] == [(11, 1.0)]
    assert checkpoints == []
    assert resume_steps(stack, old.id) == ["step-10"]  # what the new run resumes from
    assert not stack.storage.exists(checkpoint_key(old.id, 20))
    assert not stack.storage.exists(adapter_key(old.id))
    # Its one word: why it stopped.
    (said,) = [event for event in events(stack, old.id) if event.id not in events_before]
    assert said.message == (
        "Training stopped at step 40: the job was taken from this run, whose worker's "
        "heartbeat was late"
    )
    assert said.level == "warn"

    # The run that holds the job writes as before.
    new_run.checkpoint(20, str(trainer_state(tmp_path / "new", 20)), {"step": 20})
    assert resume_steps(stack, old.id) == ["step-20"]
    assert stack.storage.exists(checkpoint_key(old.id, 20))
    assert Heartbeat.of_run(stack.session_factory, run_of(new), 5).beat() is True


def test_a_stopping_worker_s_job_gets_a_message_should_the_worker_die_before_handing_its_back(
    stack: Stack, tmp_path: Path
):
    job = running_job(stack, silent=timedelta(0))
    keep_resume_state(stack, tmp_path, job.id, 10)
    shutdown_requested.set()
    try:
        assert stopped(stack.context(), recorder_of(stack, job), STEPS_DONE) is True
    finally:
        shutdown_requested.clear()
    row = stored(stack, job.id)
    assert (row.status, row.run_id, row.steps_done) == (JobStatus.QUEUED, None, 10)
    assert row.enqueued_at is None
    assert row.lost_workers == 0
    # The worker was killed before its message went back to the broker.
    with stack.session_factory.begin() as session:
        long_ago = utcnow() - timedelta(seconds=UNSENT_GRACE_SECONDS + 5)
        session.execute(update(Job).where(Job.id == job.id).values(updated_at=long_ago))

    stack.reconciler().reconcile()

    assert take_messages(stack.queue) == [job.id]
    assert stored(stack, job.id).enqueued_at is not None


def test_a_stopping_worker_leaves_a_job_taken_back_from_it_where_it_is(
    stack: Stack, tmp_path: Path
):
    job = running_job(stack)
    stack.reconciler().reconcile()
    taken_back = snapshot(stored(stack, job.id))
    shutdown_requested.set()
    try:
        assert (
            stopped(stack.context(), recorder_of(stack, job), STEPS_DONE) is False
        )  # its message is acked
    finally:
        shutdown_requested.clear()
    assert snapshot(stored(stack, job.id)) == taken_back


def next_run_succeeds(stack: Stack, job_id: str, tmp_path: Path) -> Job:
    """The job's next run, claimed once the job was taken back, ends with its own adapter."""
    claimed = claim(stack.context(), job_id)
    assert claimed is not None
    new, _ = claimed
    new_run = JobRecorder(stack.session_factory, stack.storage, run_of(new))
    outcome = trained(tmp_path / "new", "the next run's adapter")
    assert finish(stack.context(), new, new_run, outcome) is False
    return new


def test_a_lost_run_that_ends_after_the_next_run_succeeded_leaves_the_job_as_it_is(
    stack: Stack, tmp_path: Path
):
    old = running_job(stack)
    old_run = JobRecorder(stack.session_factory, stack.storage, run_of(old))
    stack.reconciler().reconcile()
    new = next_run_succeeds(stack, old.id, tmp_path)
    succeeded = snapshot(stored(stack, old.id))
    assert succeeded["status"] == JobStatus.SUCCEEDED
    assert succeeded["fine_tuned_model"] == new.fine_tuned_model_name()

    outcome = trained(tmp_path / "old", "the lost run's adapter")
    assert finish(stack.context(), old, old_run, outcome) is False
    fail(stack.context(), run_of(old), TrainingFailure("training_error", "the lost run failed"))

    assert snapshot(stored(stack, old.id)) == succeeded
    saved = Path(stack.storage.path(adapter_key(old.id))) / "adapter_model.safetensors"
    assert saved.read_text() == "the next run's adapter"  # neither replaced nor deleted


def test_a_run_that_loses_its_job_while_saving_its_adapter_leaves_the_next_run_s(
    stack: Stack, tmp_path: Path
):
    old = running_job(stack, silent=timedelta(0))
    old_run = JobRecorder(stack.session_factory, stack.storage, run_of(old))

    def next_run_finishes_the_job() -> None:
        """The lost run's process freezes (just before its adapter upload) long enough for
        the reconciler to take its job back and for the next run to finish it."""
        with stack.session_factory.begin() as session:
            stale = utcnow() - SILENT
            session.execute(update(Job).where(Job.id == old.id).values(heartbeat_at=stale))
        stack.reconciler().reconcile()
        next_run_succeeds(stack, old.id, tmp_path)

    class FreezesBeforeUpload(ArtifactStorage):
        frozen = False

        def put_directory(self, local: Path, key: str, **kwargs: Any) -> None:
            if key.startswith(f"jobs/{old.id}/") and not self.frozen:  # its adapter's upload
                self.frozen = True
                next_run_finishes_the_job()
            super().put_directory(local, key, **kwargs)

    storage = FreezesBeforeUpload(stack.settings.storage_url)
    context = WorkerContext(stack.settings, stack.session_factory, storage)
    outcome = trained(tmp_path / "old", "the lost run's adapter")
    assert finish(context, old, old_run, outcome) is False

    row = stored(stack, old.id)
    assert row.status == JobStatus.SUCCEEDED
    assert (row.attempts, row.lost_workers) == (2, 1)
    saved = Path(stack.storage.path(adapter_key(old.id))) / "adapter_model.safetensors"
    assert saved.read_text() == "the next run's adapter"  # not the lost run's, uploaded after
    assert not stack.storage.exists(staged_adapter_key(old.id, run_of(old).run_id))  # nor left


def test_a_run_that_loses_its_job_while_uploading_a_checkpoint_keeps_the_next_run_s_state(
    stack: Stack, tmp_path: Path
):
    old = running_job(stack, silent=timedelta(0))
    keep_resume_state(stack, tmp_path, old.id, 10)

    def taken_back() -> None:
        """The run's process freezes in the middle of its upload, long enough for the
        reconciler to take its job back and for the next run to start from step 10."""
        with stack.session_factory.begin() as session:
            stale = utcnow() - SILENT
            session.execute(update(Job).where(Job.id == old.id).values(heartbeat_at=stale))
        stack.reconciler().reconcile()
        assert claim(stack.context(), old.id) is not None

    class FreezesWhileUploading(ArtifactStorage):
        def put_directory(self, local: Path, key: str, **kwargs: Any) -> None:
            if key == resume_key(old.id, 20):
                taken_back()
            super().put_directory(local, key, **kwargs)

    storage = FreezesWhileUploading(stack.settings.storage_url)
    old_run = JobRecorder(stack.session_factory, storage, run_of(old))
    old_run.checkpoint(20, str(trainer_state(tmp_path, 20)), {"step": 20})

    assert "step-10" in resume_steps(stack, old.id)  # what the next run resumes from
    with stack.session_factory() as session:
        assert list(session.scalars(select(JobCheckpoint))) == []
    assert not any(e.message.startswith("Checkpoint saved") for e in events(stack, old.id))


# --- a database that stalls or goes away for a while -----------------------------------------


class Stalls:
    """A session factory that first makes a transaction wait `seconds` (the database took
    no writes meanwhile), then works as `factory` does."""

    def __init__(self, factory: sessionmaker[Session], seconds: float) -> None:
        self.factory = factory
        self.seconds = seconds

    def begin(self) -> Any:
        if self.seconds:
            time.sleep(self.seconds)
            self.seconds = 0
        return self.factory.begin()

    def __call__(self) -> Session:
        return self.factory()


class Fails:
    """A session factory whose first `times` transactions (None: all) fail as with the
    database restarting, then works as `factory` does."""

    def __init__(self, factory: sessionmaker[Session], times: int | None) -> None:
        self.factory = factory
        self.times = times
        self.calls = 0

    def _fail(self) -> None:
        self.calls += 1
        if self.times is None or self.calls <= self.times:
            raise OperationalError("SELECT 1", {}, Exception("the database system is starting up"))

    def begin(self) -> Any:
        self._fail()
        return self.factory.begin()

    def __call__(self) -> Session:
        self._fail()
        return self.factory()


def test_heartbeats_count_only_once_the_database_has_taken_writes_for_a_timeout(stack: Stack):
    """The database was away: no worker could stamp its heartbeat, so an old stamp says
    nothing until the workers have had a whole timeout to stamp again. A worker seen to
    die is lost all the same."""
    stale = running_job(stack)
    dead = running_job(stack, silent=timedelta(0), worker="afina-serve-dead")
    reconciler = stack.reconciler()
    failing = Fails(reconciler.session_factory, times=1)
    working = reconciler.session_factory
    reconciler.session_factory = failing  # type: ignore[assignment]
    with pytest.raises(OperationalError):
        reconciler.reconcile()  # the database is away
    reconciler.session_factory = working

    reconciler.reconcile(dead_worker="afina-serve-dead")  # back, and a worker died

    assert stored(stack, stale.id).status == JobStatus.RUNNING
    assert events(stack, stale.id) == []
    assert stored(stack, dead.id).status == JobStatus.QUEUED
    assert take_messages(stack.queue) == [dead.id]

    reconciler.healthy_since -= TIMEOUT  # the database has taken writes for a timeout since
    reconciler.reconcile()

    assert stored(stack, stale.id).status == JobStatus.QUEUED
    assert take_messages(stack.queue) == [stale.id]


def test_a_stalled_write_probe_holds_heartbeat_take_backs_for_a_timeout(stack: Stack):
    timeout = 3.0
    stale = running_job(stack)
    reconciler = stack.reconciler(worker_timeout_seconds=timeout)
    working = reconciler.session_factory
    # The pass's first write, its probe, waits for longer than a pass lasts.
    reconciler.session_factory = Stalls(working, reconciler.interval + 0.2)  # type: ignore[assignment]

    reconciler.reconcile()

    assert stored(stack, stale.id).status == JobStatus.RUNNING
    assert take_messages(stack.queue) == []
    reconciler.healthy_since -= timeout
    reconciler.reconcile()
    assert stored(stack, stale.id).status == JobStatus.QUEUED
    assert take_messages(stack.queue) == [stale.id]


@pytest.fixture
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retry, "RETRY_FIRST_WAIT_SECONDS", 0.01)
    monkeypatch.setattr(retry, "RETRY_LONGEST_WAIT_SECONDS", 0.01)
    monkeypatch.setattr(retry, "RETRY_SECONDS", 1.0)


def test_a_run_s_writes_go_through_once_the_database_is_back(
    stack: Stack, tmp_path: Path, quick_retries: None
):
    job = running_job(stack, silent=timedelta(0))
    flaky = Fails(stack.session_factory, times=0)
    run = JobRecorder(flaky, stack.storage, run_of(job))  # type: ignore[arg-type]

    flaky.times, flaky.calls = 3, 0
    assert run.progress(16, 40, 0.4, None) is True
    flaky.times, flaky.calls = 3, 0
    run.metric(16, {"loss": 1.5})
    flaky.times, flaky.calls = 3, 0
    run.event("Step 16: eval_loss 1.25")
    flaky.times, flaky.calls = 3, 0
    assert run.held() is True
    flaky.times, flaky.calls = 3, 0
    run.checkpoint(20, str(trainer_state(tmp_path, 20)), {"step": 20})

    row = stored(stack, job.id)
    assert (row.status, row.steps_done) == (JobStatus.RUNNING, 16)
    with stack.session_factory() as session:
        metrics = list(session.scalars(select(JobMetric).where(JobMetric.job_id == job.id)))
        checkpoints = list(session.scalars(select(JobCheckpoint)))
    assert [(m.step, m.loss) for m in metrics] == [(16, 1.5)]
    assert [c.step for c in checkpoints] == [20]
    assert [e.message for e in events(stack, job.id)] == [
        "Step 16: eval_loss 1.25",
        "Checkpoint saved at step 20",
    ]


def test_a_run_s_write_fails_when_the_database_stays_away(stack: Stack, quick_retries: None):
    job = running_job(stack, silent=timedelta(0))
    down = Fails(stack.session_factory, times=None)
    run = JobRecorder(down, stack.storage, run_of(job))  # type: ignore[arg-type]

    with pytest.raises(OperationalError):
        run.progress(16, 40, 0.4, None)

    assert down.calls > 1  # tried again before giving up
    assert stored(stack, job.id).steps_done == STEPS_DONE


def test_a_job_that_ends_leaves_no_scratch_folder_behind(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The run that was killed left its scratch folder; the run that ends the job removes
    the job's whole scratch space."""
    job = running_job(stack)
    scratch = stack.settings.data_dir / "work" / job.id
    (scratch / run_of(job).run_id).mkdir(parents=True)
    (scratch / run_of(job).run_id / "tokenized.bin").write_text("the killed run's")
    stack.reconciler().reconcile()
    assert take_messages(stack.queue) == [job.id]

    def trains(context: WorkerContext, job: Job, recorder: JobRecorder) -> TrainingOutcome:
        assert job_runner.workdir(context, recorder.run).parent == scratch
        return trained(job_runner.workdir(context, recorder.run) / "adapter", "adapter")

    monkeypatch.setattr(job_runner, "_train", trains)
    assert run_job(stack.context(), job.id) is False

    assert stored(stack, job.id).status == JobStatus.SUCCEEDED
    assert not scratch.exists()
