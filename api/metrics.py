"""`GET /metrics`: the service's Prometheus metrics, in the Prometheus text format.

Open like `/healthz` and `/readyz` (Prometheus scrapes without a key): it shows aggregates
only, and names no object of any project (no job, file or model id, no project); the only
names in it are the operator's: worker ids, their hosts and devices, queue names, and route
templates. Like any request it counts against AFINA_MAX_CONCURRENT_REQUESTS.

Families (the HTTP ones are `api.http_metrics`', the generation ones `serving.metrics`'):

- `afina_http_requests_total`, `afina_http_request_duration_seconds` (by route template,
  method and status);
- `afina_jobs{status}`: jobs in each status;
- `afina_queue_messages{queue}`: messages waiting on the broker, for the training queue, the
  exports' queue and every queue a live worker takes;
- `afina_jobs_finished_total{outcome}`: jobs that ended: succeeded, failed, cancelled;
- `afina_job_duration_seconds{outcome}`: a histogram of finished jobs' run time, from their
  first start to their end (jobs cancelled before they started are left out);
- `afina_training_tokens_per_second{worker}`: for each running job's worker, the training
  rate its last metric point recorded;
- `afina_training_step_seconds{worker}`: its time per step, between its last two points;
- `afina_worker_up{worker, hostname, queues, device_kind, device_name}`: 1 for each live
  worker (stamped within AFINA_WORKER_TIMEOUT_SECONDS; one silent longer drops out);
- `afina_worker_memory_total_bytes`, `afina_worker_memory_free_bytes{worker, device_kind}`:
  its device's memory as it last reported it;
- `afina_database_up`, `afina_broker_up`: whether this scrape could read them (the families
  read from one are left out while it is down);
- the generation families (requests by outcome, tokens, time to first token, time per
  output token, batch sizes, adapter cache hits, misses and evictions) and
  prometheus_client's process families.

The training workers expose theirs through the database: they already write what the API
shows (their registry rows with device memory, a metric point per logging step, the job's
status and times), so the families about jobs and workers are read from it when Prometheus
scrapes, by a custom collector, in a few aggregate queries on the scraping request's thread,
and a queue count each on one broker connection; no worker is scraped itself. Every API
process answers the same for them: scrape one, or aggregate them with `max`.
"""

import logging
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from typing import Any

from celery import Celery
from fastapi import APIRouter, Request, Response
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.utils import floatToGoString
from sqlalchemy import ColumnElement, Connection, Engine, and_, case, func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, aliased

from afina.jobs import workers
from afina.jobs.queue import EXPORT_QUEUE, TRAIN_QUEUE, message_counts
from afina.models import FINAL, Job, JobMetric, JobStatus, Worker

logger = logging.getLogger(__name__)

router = APIRouter()

# Job run times: a minute to three days.
DURATION_BUCKETS = (60, 300, 900, 1800, 3600, 7200, 14400, 28800, 86400, 259200)
# A broker that does not answer at once leaves its families out of this scrape.
BROKER_TIMEOUT_SECONDS = 2


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    """On a request thread: the collector reads the database and the broker."""
    body = generate_latest(request.app.state.metrics) + generate_latest(REGISTRY)
    return Response(body, media_type=CONTENT_TYPE_PLAIN_0_0_4)


class ServiceCollector:
    """The families read from the database and the broker at scrape time."""

    def __init__(self, engine: Engine, celery: Celery, worker_timeout_seconds: float) -> None:
        self.engine = engine
        self.celery = celery
        self.worker_timeout_seconds = worker_timeout_seconds

    def collect(self) -> Iterator[Metric]:
        queues = {TRAIN_QUEUE, EXPORT_QUEUE}
        try:
            with self.engine.connect() as connection:
                statuses = _statuses(connection)
                durations = _durations(connection)
                training = _training(connection)
                with Session(connection) as session:
                    live = workers.live(session, self.worker_timeout_seconds)
        except SQLAlchemyError as error:
            logger.warning("metrics: could not read the database (%r)", error)
            yield _up("afina_database_up", "Whether this scrape could read the database", 0)
        else:
            yield _up("afina_database_up", "Whether this scrape could read the database", 1)
            yield from _job_families(statuses, durations)
            yield from _training_families(training)
            yield from _worker_families(live)
            queues.update(name for worker in live for name in workers.queues_of(worker))
        try:
            depths = message_counts(self.celery, sorted(queues), timeout=BROKER_TIMEOUT_SECONDS)
        except Exception as error:
            logger.warning("metrics: could not count the broker's messages (%r)", error)
            yield _up("afina_broker_up", "Whether this scrape could count the queues", 0)
        else:
            yield _up("afina_broker_up", "Whether this scrape could count the queues", 1)
            family = GaugeMetricFamily(
                "afina_queue_messages", "Messages waiting on the broker, by queue", labels=["queue"]
            )
            for name, depth in depths.items():
                family.add_metric([name], depth)
            yield family


def _up(name: str, documentation: str, value: int) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _statuses(connection: Connection) -> dict[JobStatus, int]:
    query = select(Job.status, func.count()).group_by(Job.status)
    return {JobStatus(status): count for status, count in connection.execute(query)}


def _seconds(connection: Connection) -> ColumnElement[float]:
    """A job's run time in seconds, in the database's own date arithmetic."""
    if connection.dialect.name == "postgresql":
        return func.extract("epoch", Job.finished_at - Job.started_at)
    return (func.julianday(Job.finished_at) - func.julianday(Job.started_at)) * 86400.0


def _durations(connection: Connection) -> dict[JobStatus, tuple[int, float, list[int]]]:
    """For each final status: the jobs that ran, their run times' sum, and how many took at
    most each of DURATION_BUCKETS."""
    seconds = _seconds(connection)
    query = (
        select(
            Job.status,
            func.count(),
            func.coalesce(func.sum(seconds), 0.0),
            *(func.sum(case((seconds <= bound, 1), else_=0)) for bound in DURATION_BUCKETS),
        )
        .where(Job.status.in_(FINAL), Job.started_at.is_not(None), Job.finished_at.is_not(None))
        .group_by(Job.status)
    )
    return {
        JobStatus(status): (count, float(total), [int(n or 0) for n in buckets])
        for status, count, total, *buckets in connection.execute(query)
    }


def _job_families(
    statuses: dict[JobStatus, int], durations: dict[JobStatus, tuple[int, float, list[int]]]
) -> Iterator[Metric]:
    jobs = GaugeMetricFamily("afina_jobs", "Fine-tuning jobs by status", labels=["status"])
    for status in JobStatus:
        jobs.add_metric([status.value], statuses.get(status, 0))
    yield jobs
    finished = CounterMetricFamily(
        "afina_jobs_finished",
        "Fine-tuning jobs that ended, by outcome (succeeded, failed, cancelled)",
        labels=["outcome"],
    )
    for status in FINAL:
        finished.add_metric([status.value], statuses.get(status, 0))
    yield finished
    histogram = HistogramMetricFamily(
        "afina_job_duration_seconds",
        "Run time of finished jobs, from their first start to their end, by outcome",
        labels=["outcome"],
    )
    for status in FINAL:
        count, total, within = durations.get(status, (0, 0.0, [0] * len(DURATION_BUCKETS)))
        buckets = [
            (floatToGoString(bound), n) for bound, n in zip(DURATION_BUCKETS, within, strict=True)
        ]
        histogram.add_metric([status.value], [*buckets, ("+Inf", count)], total)
    yield histogram


def _training(connection: Connection) -> list[Any]:
    """For each running job with a worker: its worker, and its last two metric points (step,
    tokens a second, time), or None where it has fewer. By the metric table's primary key,
    a few index look-ups a running job, whatever the length of its series."""
    point = JobMetric
    running = (
        select(
            Job.id,
            Job.worker,
            select(func.max(point.step))
            .where(point.job_id == Job.id)
            .scalar_subquery()
            .label("last"),
        )
        .where(Job.status == JobStatus.RUNNING, Job.worker.is_not(None))
        .subquery()
    )
    pairs = select(
        running.c.id,
        running.c.worker,
        running.c.last,
        select(func.max(point.step))
        .where(point.job_id == running.c.id, point.step < running.c.last)
        .scalar_subquery()
        .label("previous"),
    ).subquery()
    last, previous = aliased(JobMetric), aliased(JobMetric)
    query = (
        select(
            pairs.c.worker,
            pairs.c.last,
            last.tokens_per_second,
            last.at,
            pairs.c.previous,
            previous.at,
        )
        .select_from(pairs)
        .join(last, and_(last.job_id == pairs.c.id, last.step == pairs.c.last))
        .outerjoin(previous, and_(previous.job_id == pairs.c.id, previous.step == pairs.c.previous))
    )
    return list(connection.execute(query))


def _training_families(rows: Iterable[Any]) -> Iterator[Metric]:
    newest: dict[str, tuple[datetime, float | None, float | None]] = {}
    for worker, step, rate, at, previous_step, previous_at in rows:
        step_seconds = None
        if previous_at is not None and at > previous_at:
            step_seconds = (at - previous_at).total_seconds() / (step - previous_step)
        if worker not in newest or at > newest[worker][0]:  # a worker runs one job at a time
            newest[worker] = (at, rate, step_seconds)
    rates = GaugeMetricFamily(
        "afina_training_tokens_per_second",
        "Training tokens a second of each running job's worker, at its last metric point",
        labels=["worker"],
    )
    steps = GaugeMetricFamily(
        "afina_training_step_seconds",
        "Time per training step of each running job's worker, between its last two points",
        labels=["worker"],
    )
    for worker, (_, rate, step_seconds) in sorted(newest.items()):
        if rate is not None:
            rates.add_metric([worker], rate)
        if step_seconds is not None:
            steps.add_metric([worker], step_seconds)
    yield rates
    yield steps


def _worker_families(live: Sequence[Worker]) -> Iterator[Metric]:
    up = GaugeMetricFamily(
        "afina_worker_up",
        "Live training workers (stamped within AFINA_WORKER_TIMEOUT_SECONDS), with their "
        "host, queues and device",
        labels=["worker", "hostname", "queues", "device_kind", "device_name"],
    )
    total = GaugeMetricFamily(
        "afina_worker_memory_total_bytes",
        "Device memory of each live training worker",
        labels=["worker", "device_kind"],
    )
    free = GaugeMetricFamily(
        "afina_worker_memory_free_bytes",
        "Free device memory of each live training worker, as it last reported it",
        labels=["worker", "device_kind"],
    )
    for worker in live:
        up.add_metric(
            [worker.id, worker.hostname, worker.queue, worker.device_kind, worker.device_name], 1
        )
        total.add_metric([worker.id, worker.device_kind], worker.memory_total)
        free.add_metric([worker.id, worker.device_kind], worker.memory_free)
    yield up
    yield total
    yield free


def metrics_registry(
    engine: Engine, celery: Celery, worker_timeout_seconds: float
) -> CollectorRegistry:
    """The app's own registry: its HTTP families (added by `api.http_metrics`) and the
    families read at scrape time. The generation and process families stay in
    prometheus_client's default registry, which `/metrics` shows beside it."""
    registry = CollectorRegistry()
    registry.register(ServiceCollector(engine, celery, worker_timeout_seconds))
    return registry
