"""Chaos: jobs trained through kill -9s of their workers and restarts of Redis and PostgreSQL,
and whether each kept everything it should.

Runs the production stack on this machine as processes, without Docker: a database of its
own (`afina_chaos_<random>`, dropped at the end) on the machine's PostgreSQL at
127.0.0.1:5432, a Redis of its own (--redis-port, its append-only file on, so the queued
messages outlive its restart), moto's S3 server (the artifacts, in a bucket of their own),
`afina serve --no-worker` (the API and its reconciler) and three `afina worker` processes
(one torch thread each). It uploads a chat dataset (`train_job.dataset`'s sums, each after
a system message of --context-words words, so that the jobs train long enough for the
schedule), submits 12 jobs of the demo model (30 steps of batch 4, a checkpoint every 5
steps: a metric row each step, the same seed), and while they run it goes through the chaos
schedule, one event at a time, each once a job is training mid-run and --spacing seconds
after the last one:

    kill      SIGKILL to a worker training a job past its first checkpoint, between two
              (steps done not a multiple of save_steps), started again at once (a new
              process), as a supervisor would
    redis     Redis stopped (SIGTERM), --redis-down seconds later started again on its port
              and append-only file
    postgres  `pg_ctlcluster ... main restart`: every other user of the server sees it

(default: kill, redis, kill, postgres, kill). Then it waits for every job to end, printing a
progress line every 10 s, and prints the figures, from the database and the bucket:

    jobs succeeded                      N of 12 (target: all)
    workers lost                        each job's, and for each loss: the step it was lost
                                        at, the newest checkpoint then, the step the next
                                        run resumed from, seconds from the kill to the job
                                        taken back and to its next run; losses no kill made
    steps redone beyond the checkpoint  steps trained again that lay at or before the newest
                                        checkpoint when the worker was lost (max over jobs,
                                        target 0: a run resumes from the newest checkpoint)
    metric rows duplicated / lost       each job must have one row for each of steps
                                        1..total_steps (target 0 / 0); the table's key (job,
                                        step) makes a duplicate impossible: a resumed run's
                                        step overwrites its row, so 0 duplicated holds by
                                        construction, and "lost" is the figure that tests
    artifacts missing                   each succeeded job's adapter and every checkpoint
                                        job_checkpoints lists, whole in the bucket (target 0)
    loss curves, leftovers, log errors  distinct curves among the jobs (same seed, data and
                                        settings: one expected on the CPU), trainer states and
                                        staged adapters left in the bucket, ERROR records logged
    wall time                           first job created -> last job ended

and exits non-zero if a target is missed, or the schedule could not be gone through. The
logs stay in the temp dir it names. PostgreSQL's restart breaks whatever else uses that
server at the time.

    .venv/bin/python bench/chaos.py
    .venv/bin/python bench/chaos.py --schedule kill redis kill   # PostgreSQL left alone
"""

import argparse
import json
import os
import random
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
import redis
import s3fs
from sqlalchemy import Engine, create_engine, func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from train_job import AFINA, dataset, wait_until_up

from afina.core.storage import (
    ArtifactStorage,
    adapter_key,
    checkpoint_key,
    job_key,
    resume_key,
    tokenized_key,
)
from afina.models import Job, JobCheckpoint, JobEvent, JobMetric

T = TypeVar("T")
MOTO_SERVER = Path(sys.executable).with_name("moto_server")
FINAL = ("succeeded", "failed", "cancelled")
S3_KEY = S3_SECRET = "testing"
S3_REGION = "us-east-1"
# A job counts as training while its steps went up this recently.
TRAINING_SECONDS = 2.0
RESUME_FROM = re.compile(r"to resume from step (\d+)")
ERROR_RECORD = re.compile(r"(?:^|: )(?:ERROR|CRITICAL)[ /]")
CLOCK = time.monotonic()


def say(message: str) -> None:
    print(f"{time.monotonic() - CLOCK:7.1f} s  {message}", flush=True)


def chats(count: int, words: int) -> str:
    """`train_job.dataset`'s sums, each after a system message of `words` words (the same
    for all): longer examples, so that a job trains long enough for the schedule."""
    if not words:
        return dataset(count)
    generator = random.Random(1)
    vocabulary = ("the", "sum", "of", "two", "digits", "is", "asked", "and", "answered")
    system = {"role": "system", "content": " ".join(generator.choices(vocabulary, k=words))}
    lines = []
    for line in dataset(count).splitlines():
        example = json.loads(line)
        example["messages"].insert(0, system)
        lines.append(json.dumps(example) + "\n")
    return "".join(lines)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_taken(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def wait_for(check: Callable[[], bool], seconds: float, what: str) -> float:
    """Wait until `check()` is true (exceptions count as false); the seconds it took."""
    started = time.monotonic()
    while True:
        with suppress(Exception):
            if check():
                return time.monotonic() - started
        if time.monotonic() - started > seconds:
            raise SystemExit(f"{what} after {seconds:.0f} s")
        time.sleep(0.1)


def patiently(call: Callable[[], T], seconds: float = 300) -> T:
    """`call()`, tried again while the database is away (restarting)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return call()
        except DBAPIError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


class Service:
    """A process of the stack, its output appended to `log`, in a session of its own (a
    Ctrl-C reaches the bench, which stops them in order)."""

    def __init__(
        self, name: str, command: list[str], log: Path, env: dict[str, str], cwd: Path
    ) -> None:
        self.name, self.command, self.log, self.env, self.cwd = name, command, log, env, cwd
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                self.command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, seconds: float = 30) -> None:
        """SIGTERM, and SIGKILL if it has not ended after `seconds`."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(seconds)
        except subprocess.TimeoutExpired:
            say(f"{self.name} (pid {self.pid}) did not stop in {seconds:.0f} s: killed")
            self.process.kill()
            self.process.wait()


@contextmanager
def running(service: Service, seconds: float = 30) -> Iterator[Service]:
    service.start()
    try:
        yield service
    finally:
        service.stop(seconds)


@contextmanager
def database(admin_url: str) -> Iterator[str]:
    """A new database on the server of `admin_url`, dropped at the end: its URL."""
    name = f"afina_chaos_{secrets.token_hex(4)}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        admin.dispose()  # its connection died with PostgreSQL's restart
        try:
            with admin.connect() as connection:
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        except DBAPIError as error:
            print(f"could not drop database {name}: {error}", flush=True)
        admin.dispose()


@dataclass
class Redis:
    """The bench's own Redis, with its append-only file in `directory`."""

    service: Service
    port: int

    @classmethod
    def at(cls, port: int, directory: Path, env: dict[str, str]) -> "Redis":
        directory.mkdir(parents=True, exist_ok=True)
        command = [
            "redis-server",
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "yes",
            "--dir",
            str(directory),
        ]
        return cls(Service("redis", command, directory / "redis.log", env, directory), port)

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)

    def up(self) -> float:
        return wait_for(lambda: bool(self.client().ping()), 30, "Redis did not answer")

    def queued(self, queue: str) -> int | None:
        try:
            return int(self.client().llen(queue))
        except redis.RedisError:
            return None


@dataclass
class Slot:
    """One of the worker processes, started again when it ends."""

    number: int
    service: Service
    killed: bool = False  # by the bench: expected to have ended


@dataclass
class Kill:
    job_id: str
    step: int  # steps done as the bench last read them, just before the kill
    worker: int
    pid: int
    at: datetime


@dataclass
class Loss:
    """A lost worker as the job's events tell it."""

    step: int  # steps done when the reconciler took the job back
    said: int | None  # the step the reconciler said it resumes from
    checkpoint: int  # the newest checkpoint saved before then
    at: datetime  # when the job was taken back
    resumed: int | None = None  # the step the next run went on from (0: from scratch)
    started: datetime | None = None  # when the next run started

    @property
    def redone(self) -> int:
        """Steps trained again by the next run (none without one)."""
        return 0 if self.resumed is None else max(0, self.step - self.resumed)

    @property
    def beyond(self) -> int:
        """Steps redone that lay at or before the newest checkpoint."""
        return 0 if self.resumed is None else max(0, self.checkpoint - self.resumed)


@dataclass
class Outcome:
    job_id: str
    status: str
    attempts: int
    lost_workers: int
    total_steps: int
    losses: list[Loss] = field(default_factory=list)
    metric_rows: int = 0
    duplicated: int = 0
    lost_rows: int = 0
    extra_rows: int = 0
    checkpoints: list[int] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    curve: tuple = ()


class Stack:
    """What the bench reads of the running stack: the jobs' rows, from the database."""

    def __init__(self, engine: Engine, job_ids: list[str]) -> None:
        self.engine = engine
        self.job_ids = job_ids
        self.progress: dict[str, tuple[int, float]] = {}  # steps done, when they last changed

    def jobs(self) -> list[Any]:
        def read() -> list[Any]:
            with self.engine.connect() as connection:
                return list(
                    connection.execute(
                        select(
                            Job.id,
                            Job.status,
                            Job.steps_done,
                            Job.total_steps,
                            Job.worker,
                            Job.lost_workers,
                        ).where(Job.id.in_(self.job_ids))
                    )
                )

        rows = patiently(read)
        now = time.monotonic()
        for row in rows:
            steps, _ = self.progress.get(row.id, (-1, now))
            if row.steps_done != steps:
                self.progress[row.id] = (row.steps_done, now)
        return rows

    def training(self, row: Any, save_steps: int, between: bool) -> bool:
        """Whether the job is training (its steps went up just now) mid-run; `between`: and
        past its first checkpoint, its last step not a checkpoint's."""
        total = row.total_steps or 0
        if row.status != "running" or not 2 <= row.steps_done <= total - 3:
            return False
        if between and (row.steps_done < save_steps or row.steps_done % save_steps == 0):
            return False
        return time.monotonic() - self.progress[row.id][1] < TRAINING_SECONDS


def worker_pid(worker: str | None) -> int | None:
    """The process id in a job's `worker` (`host:pid` for `afina worker`)."""
    if not worker or ":" not in worker:
        return None
    host, _, pid = worker.rpartition(":")
    return int(pid) if host == socket.gethostname() and pid.isdigit() else None


class Chaos:
    """The schedule, gone through one event at a time."""

    def __init__(
        self,
        args: argparse.Namespace,
        stack: Stack,
        slots: list[Slot],
        own_redis: Redis,
        postgres_version: str,
    ) -> None:
        self.args = args
        self.stack = stack
        self.slots = slots
        self.redis = own_redis
        self.postgres_version = postgres_version
        self.pending = list(args.schedule)
        self.last_event = time.monotonic()
        self.kills: list[Kill] = []
        self.unexpected_exits = 0
        self.restarts: dict[str, float] = {}  # what was restarted: how long it was away

    def supervise(self) -> None:
        """Start again a worker that ended; one that the bench did not kill is news."""
        for slot in self.slots:
            if slot.service.alive():
                continue
            assert slot.service.process is not None
            code = slot.service.process.returncode
            if not slot.killed:
                self.unexpected_exits += 1
                say(
                    f"worker {slot.number} (pid {slot.service.pid}) ended by itself (code "
                    f"{code}): started again"
                )
            slot.killed = False
            slot.service.start()

    def step(self, rows: list[Any]) -> None:
        """Fire the next event if its moment has come."""
        if not self.pending or time.monotonic() - self.last_event < self.args.spacing:
            return
        event = self.pending[0]
        if event == "kill":
            done = self._kill(rows)
        else:
            save = self.args.save_steps
            if not any(self.stack.training(row, save, between=False) for row in rows):
                return
            done = self._restart_redis() if event == "redis" else self._restart_postgres()
        if done:
            self.pending.pop(0)
            self.last_event = time.monotonic()

    def _kill(self, rows: list[Any]) -> bool:
        by_pid = {slot.service.pid: slot for slot in self.slots if slot.service.alive()}
        # Spread over the jobs, then the workers.
        killed_jobs = Counter(kill.job_id for kill in self.kills)
        killed_slots = Counter(kill.worker for kill in self.kills)
        candidates = []
        for row in rows:
            slot = by_pid.get(worker_pid(row.worker) or -1)
            if slot is not None and self.stack.training(row, self.args.save_steps, True):
                rank = (killed_jobs[row.id], killed_slots[slot.number], slot.number)
                candidates.append((rank, row, slot))
        if not candidates:
            return False
        _, row, slot = min(candidates, key=lambda candidate: candidate[0])
        pid = slot.service.pid
        os.kill(pid, signal.SIGKILL)
        at = datetime.now(UTC)
        slot.killed = True
        assert slot.service.process is not None
        slot.service.process.wait()
        self.kills.append(Kill(row.id, row.steps_done, slot.number, pid, at))
        say(
            f"kill -9 worker {slot.number} (pid {pid}), training {row.id} at step "
            f"{row.steps_done} of {row.total_steps} ({len(self.kills)} of "
            f"{self.args.schedule.count('kill')}): starting another"
        )
        self.supervise()
        return True

    def _restart_redis(self) -> bool:
        before = self.redis.queued(self.args.queue)
        stopped = time.monotonic()
        self.redis.service.stop()
        time.sleep(self.args.redis_down)
        self.redis.service.start()
        self.redis.up()
        away = time.monotonic() - stopped
        self.restarts["redis"] = away
        after = self.redis.queued(self.args.queue)
        say(
            f"Redis restarted (SIGTERM, {self.args.redis_down:g} s, started again): away "
            f"{away:.1f} s; messages in queue "
            f"{self.args.queue!r}: {before} before, {after} after"
        )
        return True

    def _restart_postgres(self) -> bool:
        say("PostgreSQL restarting (pg_ctlcluster restart)")
        stopped = time.monotonic()
        subprocess.run(
            [
                "pg_ctlcluster",
                "--skip-systemctl-redirect",
                self.postgres_version,
                "main",
                "restart",
            ],
            check=True,
            capture_output=True,
        )
        url = make_url(self.args.postgres_url)
        where = [url.host or "127.0.0.1", str(url.port or 5432)]
        ready = ["pg_isready", "-q", "-h", where[0], "-p", where[1]]
        wait_for(
            lambda: subprocess.run(ready, check=False).returncode == 0,
            120,
            "PostgreSQL did not come back",
        )
        away = time.monotonic() - stopped
        self.restarts["postgres"] = away
        say(f"PostgreSQL restarted: answering again {away:.1f} s after the restart began")
        return True


def the_losses(events: list[Any]) -> list[Loss]:
    """Each lost worker of a job, from its events (oldest first): the step it was lost at,
    the newest checkpoint saved before, and the step the next run went on from."""
    losses: list[Loss] = []
    checkpoint = 0
    waiting: Loss | None = None  # the last loss, until its next run says where it resumed
    for event in events:
        message, data = event.message, event.data or {}
        if message.startswith("Checkpoint saved at step"):
            checkpoint = int(data["step"])
        elif message.startswith("Worker lost"):
            said = RESUME_FROM.search(message)
            step = int(data["step"])
            waiting = Loss(step, int(said[1]) if said else None, checkpoint, event.created_at)
            losses.append(waiting)
        elif message.startswith("Job started (attempt") and waiting is not None:
            waiting.resumed = 0  # from scratch, unless it says otherwise
            waiting.started = event.created_at
        elif (
            message.startswith("Resuming from the checkpoint saved at step")
            and waiting is not None
            and waiting.resumed == 0
        ):
            waiting.resumed = int(data["step"])
            waiting = None
    return losses


def outcome(engine: Engine, storage: ArtifactStorage, row: Any) -> Outcome:
    with engine.connect() as connection:
        events = connection.execute(
            select(JobEvent.message, JobEvent.data, JobEvent.created_at)
            .where(JobEvent.job_id == row.id)
            .order_by(JobEvent.created_at, JobEvent.id)
        ).all()
        curve = tuple(
            tuple(point)
            for point in connection.execute(
                select(JobMetric.step, JobMetric.loss, JobMetric.grad_norm)
                .where(JobMetric.job_id == row.id)
                .order_by(JobMetric.step)
            ).all()
        )
        # Rows by step (the table's key is (job, step): a step written twice is a row
        # overwritten, so what is counted here are steps lost).
        steps = Counter(step for step, *_ in curve)
        checkpoints = list(
            connection.scalars(
                select(JobCheckpoint.step)
                .where(JobCheckpoint.job_id == row.id)
                .order_by(JobCheckpoint.step)
            )
        )
    total = row.total_steps or 0
    expected = set(range(1, total + 1))
    result = Outcome(
        row.id,
        str(row.status),
        row.attempts,
        row.lost_workers,
        total,
        losses=the_losses(events),
        metric_rows=sum(steps.values()),
        duplicated=sum(count - 1 for count in steps.values()),
        lost_rows=len(expected - set(steps)),
        extra_rows=len(set(steps) - expected),
        checkpoints=checkpoints,
        curve=curve,
    )
    if result.status == "succeeded":
        wanted = {adapter_key(row.id): ("adapter_config.json", "adapter_model.safetensors")}
        for step in checkpoints:
            wanted[checkpoint_key(row.id, step)] = ("adapter_model.safetensors",)
        for key, names in wanted.items():
            found = set(storage.names(key))
            result.missing.extend(f"{key}/{name}" for name in names if name not in found)
    return result


def leftovers(storage: ArtifactStorage, job_ids: list[str]) -> Counter[str]:
    """What a job that ended should no longer keep in the bucket."""
    left: Counter[str] = Counter()
    for job_id in job_ids:
        left["trainer states"] += len(storage.names(resume_key(job_id)))
        left["tokenized datasets"] += len(storage.names(tokenized_key(job_id)))
        staged = [name for name in storage.names(job_key(job_id)) if name.startswith("adapter-")]
        left["staged adapters"] += len(staged)
    return left


def log_errors(paths: list[Path]) -> dict[str, int]:
    """The ERROR and CRITICAL records of each log: afina's (`ERROR name: ...`) and Celery's
    (`[time: ERROR/MainProcess] ...`)."""
    counts = {}
    for path in paths:
        lines = path.read_text(errors="replace").splitlines() if path.exists() else []
        counts[path.name] = sum(bool(ERROR_RECORD.search(line)) for line in lines)
    return counts


def wall_time(engine: Engine, job_ids: list[str]) -> float | None:
    with engine.connect() as connection:
        first, last = connection.execute(
            select(func.min(Job.created_at), func.max(Job.finished_at)).where(Job.id.in_(job_ids))
        ).one()
    if not (isinstance(first, datetime) and isinstance(last, datetime)):
        return None
    return (last - first).total_seconds()


def report(
    outcomes: list[Outcome],
    chaos: Chaos,
    left: Counter[str],
    errors: dict[str, int],
    wall: float | None,
) -> list[str]:
    """Print the figures; the targets missed."""
    count = len(outcomes)
    print("\njob                            status     attempts  lost  metric rows  checkpoints")
    for job in outcomes:
        print(
            f"{job.job_id:<30} {job.status:<10} {job.attempts:>8}  {job.lost_workers:>4}  "
            f"{job.metric_rows:>5} of {job.total_steps:<3}  {','.join(map(str, job.checkpoints))}"
        )
        kills = [kill for kill in chaos.kills if kill.job_id == job.job_id]
        for number, loss in enumerate(job.losses):
            resumed = "no new run" if loss.resumed is None else f"resumed from {loss.resumed}"
            timing = ""
            if number < len(kills):
                timing = f"; taken back {(loss.at - kills[number].at).total_seconds():.1f} s "
                timing += f"after the kill (at step {kills[number].step})"
            if loss.started is not None:
                timing += f", running again {(loss.started - loss.at).total_seconds():.1f} s later"
            print(
                f"{'':<30}   lost at step {loss.step}, newest checkpoint {loss.checkpoint}, "
                f"{resumed} (the reconciler said {loss.said}): {loss.redone} redone, "
                f"{loss.beyond} beyond the checkpoint{timing}"
            )
        for key in job.missing:
            print(f"{'':<30}   missing from the bucket: {key}")
    succeeded = sum(job.status == "succeeded" for job in outcomes)
    losses = [loss for job in outcomes for loss in job.losses]
    lost = sum(job.lost_workers for job in outcomes)
    killed = Counter(kill.job_id for kill in chaos.kills)
    otherwise = sum(max(0, job.lost_workers - killed[job.job_id]) for job in outcomes)
    beyond = max((loss.beyond for loss in losses), default=0)
    redone = [loss.redone for loss in losses]
    duplicated = sum(job.duplicated for job in outcomes)
    lost_rows = sum(job.lost_rows + job.extra_rows for job in outcomes)
    expected_artifacts = sum(
        2 + len(job.checkpoints) for job in outcomes if job.status == "succeeded"
    )
    missing = sum(len(job.missing) for job in outcomes)
    said_otherwise = sum(
        loss.said is not None and loss.resumed is not None and loss.said != loss.resumed
        for loss in losses
    )
    curves = Counter(job.curve for job in outcomes if job.status == "succeeded")
    restarts = ", ".join(f"{name} away {away:.1f} s" for name, away in chaos.restarts.items())
    print(
        f"\nchaos: {len(chaos.kills)} workers killed, restarts: {restarts or 'none'}; "
        f"schedule {'done' if not chaos.pending else 'NOT done: ' + ' '.join(chaos.pending)}"
    )
    print(f"jobs succeeded                        {succeeded} of {count}  (target {count})")
    print(
        f"workers lost                          {lost}: {len(chaos.kills)} killed, "
        f"{otherwise} otherwise; per job "
        f"{' '.join(str(job.lost_workers) for job in outcomes)}"
    )
    print(
        f"workers that ended by themselves      {chaos.unexpected_exits} (started again by "
        "the bench)"
    )
    print(
        f"steps redone after a loss             {sum(redone)} in all, at most "
        f"{max(redone, default=0)} after one loss (save_steps {chaos.args.save_steps})"
    )
    print(f"steps redone beyond the checkpoint    {beyond}  (max over jobs; target 0)")
    print(
        f"resume step the reconciler named     {said_otherwise} of {len(losses)} losses "
        "resumed elsewhere"
    )
    print(
        f"metric rows duplicated / lost         {duplicated} / {lost_rows}  (target 0 / 0; "
        f"{sum(job.metric_rows for job in outcomes)} rows)"
    )
    print(
        f"artifacts missing from the bucket     {missing} of {expected_artifacts}  "
        "(adapter config and weights, checkpoint weights; target 0)"
    )
    print(
        f"loss curves                           {len(curves)} distinct among {succeeded} "
        "succeeded jobs (same seed, data and settings: 1 on the CPU)"
    )
    print(
        "left in the bucket after the end      "
        + ", ".join(f"{name} {number}" for name, number in left.items())
    )
    print(
        "ERROR records in the logs             "
        + ", ".join(f"{name} {number}" for name, number in errors.items())
        + "  (retries while a server restarts among them)"
    )
    wall_text = "unknown" if wall is None else f"{wall:.1f} s"
    print(f"wall time                             {wall_text} (first job created -> last ended)")
    missed = []
    if succeeded < count:
        missed.append(f"{count - succeeded} jobs did not succeed")
    if beyond:
        missed.append(f"{beyond} steps redone beyond a checkpoint")
    if duplicated or lost_rows:
        missed.append(f"metric rows {duplicated} duplicated, {lost_rows} lost or extra")
    if missing:
        missed.append(f"{missing} artifacts missing")
    if chaos.pending:
        missed.append(f"the schedule was not gone through ({' '.join(chaos.pending)} left)")
    return missed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=12)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument(
        "--context-words",
        type=int,
        default=100,
        help="a system message this long in each example (100 words: about 300 tokens)",
    )
    parser.add_argument("--steps", type=int, default=30, help="max_steps (up to 50: a row a step)")
    parser.add_argument("--save-steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--schedule",
        nargs="+",
        choices=("kill", "redis", "postgres"),
        default=["kill", "redis", "kill", "postgres", "kill"],
    )
    parser.add_argument("--spacing", type=float, default=4, help="seconds between events")
    parser.add_argument("--redis-down", type=float, default=2, help="seconds Redis stays stopped")
    parser.add_argument("--worker-timeout", type=float, default=6)
    parser.add_argument("--max-attempts", type=int, default=10)
    parser.add_argument("--redis-port", type=int, default=6390)
    parser.add_argument(
        "--postgres-url",
        default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
        help="a database on the server to create the bench's own from (trust auth)",
    )
    parser.add_argument("--timeout", type=float, default=1200, help="for the jobs to end")
    parser.add_argument("--queue", default="train", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps > 50:
        parser.error("--steps above 50 logs a metric row every few steps only")
    postgres_version = sorted(os.listdir("/etc/postgresql"))[0]
    if port_taken(args.redis_port):
        parser.error(f"port {args.redis_port} is taken: give --redis-port another")
    # SIGTERM (`timeout`) stops the stack and drops the database, as Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))

    workdir = Path(tempfile.mkdtemp(prefix="afina-chaos-"))
    model = workdir / "demo"
    subprocess.run([AFINA, "demo-model", str(model)], check=True, capture_output=True)
    (workdir / "train.jsonl").write_text(chats(args.examples, args.context_words))
    bucket = f"afina-chaos-{secrets.token_hex(4)}"
    s3_port, api_port = free_port(), free_port()
    endpoint = f"http://127.0.0.1:{s3_port}"
    plain = {name: value for name, value in os.environ.items() if not name.startswith("AFINA_")}
    plain |= {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    print(
        f"{args.jobs} jobs ({args.examples} chat examples with a {args.context_words}-word "
        f"system message, {args.steps} steps of batch "
        f"{args.batch_size}, a checkpoint every {args.save_steps}), {args.workers} workers, "
        f"AFINA_WORKER_TIMEOUT_SECONDS={args.worker_timeout:g}, AFINA_MAX_ATTEMPTS="
        f"{args.max_attempts}; schedule: {' '.join(args.schedule)}, {args.spacing:g} s apart; "
        f"logs in {workdir}",
        flush=True,
    )

    with ExitStack() as stack:
        database_url = stack.enter_context(database(args.postgres_url))
        own_redis = Redis.at(args.redis_port, workdir / "redis", plain)
        stack.enter_context(running(own_redis.service))
        own_redis.up()
        moto = Service(
            "moto",
            [str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(s3_port)],
            workdir / "moto.log",
            plain,
            workdir,
        )
        stack.enter_context(running(moto))
        wait_for(lambda: port_taken(s3_port), 60, "moto's S3 server did not come up")
        options = {
            "key": S3_KEY,
            "secret": S3_SECRET,
            "client_kwargs": {"endpoint_url": endpoint, "region_name": S3_REGION},
        }
        # In us-east-1 a bucket is made with no location constraint: no region named here.
        client_kwargs = {"endpoint_url": endpoint}
        s3 = s3fs.S3FileSystem(key=S3_KEY, secret=S3_SECRET, client_kwargs=client_kwargs)
        s3.mkdir(bucket)
        storage_url = f"s3://{bucket}/artifacts"
        env = plain | {
            "AFINA_DATABASE_URL": database_url,
            "AFINA_BROKER_URL": f"redis://127.0.0.1:{args.redis_port}/0",
            "AFINA_STORAGE_URL": storage_url,
            "AFINA_S3_ENDPOINT_URL": endpoint,
            "AFINA_S3_ACCESS_KEY_ID": S3_KEY,
            "AFINA_S3_SECRET_ACCESS_KEY": S3_SECRET,
            "AFINA_S3_REGION": S3_REGION,
            "AFINA_API_KEYS": "",
            "AFINA_WORKER_TIMEOUT_SECONDS": f"{args.worker_timeout:g}",
            "AFINA_MAX_ATTEMPTS": str(args.max_attempts),
        }
        (workdir / "api").mkdir()
        api = Service(
            "afina serve",
            [str(AFINA), "serve", "--no-worker", "--port", str(api_port)],
            workdir / "api.log",
            env | {"AFINA_DATA_DIR": str(workdir / "api")},
            workdir,
        )
        stack.enter_context(running(api, 60))
        base = f"http://127.0.0.1:{api_port}"
        assert api.process is not None
        wait_until_up(base, api.process)
        slots = []
        for number in range(1, args.workers + 1):
            data_dir = workdir / f"worker-{number}"
            data_dir.mkdir()
            service = Service(
                f"worker {number}",
                [str(AFINA), "worker"],
                workdir / f"worker-{number}.log",
                env | {"AFINA_DATA_DIR": str(data_dir)},
                workdir,
            )
            slots.append(Slot(number, service))
            # Stopped (warm shutdown) when the bench ends; the last process of the slot.
            stack.callback(lambda service=service: service.stop(60))
            service.start()
        say(f"stack up: PostgreSQL database, Redis :{args.redis_port}, S3 {endpoint}, API {base}")

        client = stack.enter_context(httpx.Client(base_url=base, timeout=60))
        with (workdir / "train.jsonl").open("rb") as data:
            uploaded = client.post(
                "/v1/files", files={"file": ("train.jsonl", data)}, data={"purpose": "fine-tune"}
            )
        uploaded.raise_for_status()
        body = {
            "model": str(model),
            "training_file": uploaded.json()["id"],
            "seed": args.seed,
            "hyperparameters": {"batch_size": args.batch_size},
            "training": {"max_steps": args.steps, "save_steps": args.save_steps},
        }
        job_ids = []
        for number in range(1, args.jobs + 1):
            created = client.post("/v1/fine_tuning/jobs", json=body | {"suffix": f"c{number}"})
            if created.status_code != 200:
                raise SystemExit(f"creating job {number}: {created.status_code} {created.text}")
            job_ids.append(created.json()["id"])
        say(f"{args.jobs} jobs created")

        engine = create_engine(database_url, pool_pre_ping=True, pool_size=2)
        stack.callback(engine.dispose)
        watched = Stack(engine, job_ids)
        chaos = Chaos(args, watched, slots, own_redis, postgres_version)
        deadline = time.monotonic() + args.timeout
        next_line = 0.0
        while True:
            rows = watched.jobs()
            chaos.supervise()
            chaos.step(rows)
            statuses = Counter(str(row.status) for row in rows)
            if time.monotonic() >= next_line or all(s in FINAL for s in statuses):
                next_line = time.monotonic() + 10
                say(
                    "  ".join(f"{name} {statuses[name]}" for name in sorted(statuses))
                    + f"; steps done {sum(row.steps_done for row in rows)}; workers lost "
                    f"{sum(row.lost_workers for row in rows)}"
                )
            if all(status in FINAL for status in statuses.elements()):
                break
            if time.monotonic() > deadline:
                say(f"not every job ended within {args.timeout:.0f} s: reading them as they are")
                break
            time.sleep(0.2)

        storage = ArtifactStorage(storage_url, options)
        # A job's end removes its trainer state and staged adapter; give that a moment.
        for _ in range(30):
            left = leftovers(storage, job_ids)
            if not +left:
                break
            time.sleep(1)

        def read() -> list[Outcome]:
            with engine.connect() as connection:
                rows = connection.execute(
                    select(
                        Job.id, Job.status, Job.attempts, Job.lost_workers, Job.total_steps
                    ).where(Job.id.in_(job_ids))
                ).all()
            order = {job_id: number for number, job_id in enumerate(job_ids)}
            rows = sorted(rows, key=lambda row: order[row.id])
            return [outcome(engine, storage, row) for row in rows]

        outcomes = patiently(read)
        logs = [workdir / "api.log"] + [slot.service.log for slot in slots]
        errors = log_errors(logs)
        missed = report(
            outcomes, chaos, left, errors, patiently(lambda: wall_time(engine, job_ids))
        )
    if missed:
        raise SystemExit("targets missed: " + "; ".join(missed))
    print("every target met")


if __name__ == "__main__":
    main()
