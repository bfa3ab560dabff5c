"""The Celery task that runs a job, when the database fails as the worker takes its message.

The task is retried (Celery's retry) until the claim goes through; a worker that stops
meanwhile hands the message back, marking the job as without one for the reconciler."""

from typing import Any

import pytest
from celery.exceptions import Reject
from sqlalchemy.exc import OperationalError

from afina.core.settings import Settings
from afina.core.storage import ArtifactStorage
from afina.models.session import make_engine, make_session_factory
from afina.worker import tasks
from afina.worker.job_runner import WorkerContext
from afina.worker.process import shutdown_requested


def test_a_job_that_cannot_be_claimed_is_tried_again_until_the_database_answers(
    make_settings, monkeypatch: pytest.MonkeyPatch
):
    settings: Settings = make_settings()
    engine = make_engine(settings.database_url)
    context = WorkerContext(
        settings, make_session_factory(engine), ArtifactStorage(settings.storage_url)
    )
    monkeypatch.setattr(tasks, "_context", lambda: context)
    monkeypatch.setattr(tasks, "CLAIM_RETRY_DELAY_SECONDS", 0.01)
    tries: list[str] = []
    run_job = tasks.run_job

    def fails_twice(context: WorkerContext, job_id: str, **kwargs: Any) -> bool:
        tries.append(job_id)
        if len(tries) <= 2:  # "database or disk is full", as SQLite says on a full disk
            raise OperationalError("UPDATE jobs ...", {}, Exception("database or disk is full"))
        return run_job(context, job_id, **kwargs)

    monkeypatch.setattr(tasks, "run_job", fails_twice)
    try:
        # Run here, retries included: no such job, so skipped once claimed; no Reject.
        result = tasks.train_job.apply(args=["ftjob-abc"])
    finally:
        engine.dispose()

    assert result.successful()

    assert tries == ["ftjob-abc"] * 3


def test_a_stopping_worker_hands_back_the_message_of_a_job_it_could_not_claim(
    make_settings, monkeypatch: pytest.MonkeyPatch
):
    settings: Settings = make_settings()
    # Nothing listens on port 1: every query fails as with the database restarting.
    engine = make_engine("postgresql+psycopg://afina:afina@127.0.0.1:1/afina?connect_timeout=2")
    context = WorkerContext(
        settings, make_session_factory(engine), ArtifactStorage(settings.storage_url)
    )
    monkeypatch.setattr(tasks, "_context", lambda: context)
    run_job = tasks.run_job

    def stop_after_the_first_try(*args: Any, **kwargs: Any) -> bool:
        shutdown_requested.set()  # SIGTERM, while the claim waits on the database
        return run_job(*args, **kwargs)

    monkeypatch.setattr(tasks, "run_job", stop_after_the_first_try)
    try:
        with pytest.raises(Reject) as rejected:
            tasks.train_job.run("ftjob-abc")
    finally:
        shutdown_requested.clear()
        engine.dispose()

    assert rejected.value.requeue is True
