"""The Celery app, configured from settings.

Embedded default: kombu's SQLAlchemy transport on a SQLite file, so no Redis is needed; set
`AFINA_BROKER_URL=redis://...` for production. A training job's message goes to the queue
the sender names (the job's own: `jobs.queue.send`); a worker takes the queues of
`AFINA_WORKER_QUEUES` (`afina worker --queues`). Training tasks are long and hold a GPU, so:
acknowledge a task only when it has finished (`acks_late`, so a worker that dies leaves its
message unacknowledged; `reject_on_worker_lost` does the same for pools with child
processes), take one message at a time (prefetch 1), and run in the worker's own process
(`--pool solo`), which never forks after CUDA is initialised. A message delivered twice is
harmless: the runner starts a job only while the database says it is queued.
"""

import os
from pathlib import Path

from celery import Celery
from sqlalchemy.engine import make_url

from afina.core.settings import Settings, get_settings
from afina.jobs.queue import EXPORT_QUEUE, EXPORT_TASK, TRAIN_QUEUE
from afina.worker.broker import embedded_broker_url


def _ensure_sqlite_directory(broker_url: str) -> None:
    if broker_url.startswith("sqla+sqlite:///"):
        database = make_url(broker_url.removeprefix("sqla+")).database
        if database:
            Path(database).parent.mkdir(parents=True, exist_ok=True)


def create_celery(settings: Settings) -> Celery:
    _ensure_sqlite_directory(settings.broker_url)
    # The SQLite broker through afina's channel, which gets over a full disk (worker.broker).
    broker = embedded_broker_url(settings.broker_url)
    app = Celery("afina", broker=broker, include=["afina.worker.tasks"])
    app.conf.update(
        # A training task goes where its sender says (the job's queue: a worker class), or
        # to the default training queue; no route pins it, so that a send's queue (and a
        # retry's, which keeps the queue its message came from) always wins.
        task_default_queue=TRAIN_QUEUE,
        task_routes={EXPORT_TASK: {"queue": EXPORT_QUEUE}},
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        worker_pool="solo",
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        # A request that queues a job waits a few seconds at most for a broker that is down.
        broker_connection_timeout=3,
        task_publish_retry_policy={
            "max_retries": 2,
            "interval_start": 0,
            "interval_step": 0.5,
            "interval_max": 1,
        },
    )
    return app


def run_worker() -> None:
    """Run one worker in this process until it is told to stop: one task at a time (a
    training job or a merged export, from the queues of `AFINA_WORKER_QUEUES`, which
    `afina worker --queues` sets), in the worker's own process."""
    settings = get_settings()
    # A neutral working directory: a model name given as a hub id must never resolve to a
    # directory that happens to sit where the worker was started.
    workdir = settings.data_dir / "work"
    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)
    create_celery(settings).worker_main(
        [
            "worker",
            "--pool=solo",
            "--concurrency=1",
            f"--queues={','.join(settings.worker_queues)}",
            f"--loglevel={settings.log_level.upper()}",
            "--without-gossip",
            "--without-mingle",
            "--hostname=afina-train@%h",
        ]
    )
