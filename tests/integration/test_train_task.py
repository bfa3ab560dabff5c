"""The Celery task that runs a job, when the database fails as the worker takes its message."""

import pytest
from celery.exceptions import Reject

from afina.core.settings import Settings
from afina.core.storage import ArtifactStorage
from afina.models.session import make_engine, make_session_factory
from afina.worker import tasks
from afina.worker.job_runner import WorkerContext


def test_a_message_taken_while_the_database_is_away_goes_back_to_the_queue(
    make_settings, monkeypatch: pytest.MonkeyPatch
):
    """Acknowledged, it would be dropped: the job would stay `queued`, its message sent, and
    nothing would send another."""
    settings: Settings = make_settings()
    # Nothing listens on port 1: every query fails as with the database restarting.
    engine = make_engine("postgresql+psycopg://afina:afina@127.0.0.1:1/afina?connect_timeout=2")
    context = WorkerContext(
        settings, make_session_factory(engine), ArtifactStorage(settings.storage_url or "")
    )
    monkeypatch.setattr(tasks, "_context", lambda: context)
    monkeypatch.setattr(tasks, "CLAIM_RETRY_DELAY_SECONDS", 0)

    try:
        with pytest.raises(Reject) as rejected:
            tasks.train_job.run("ftjob-abc")
    finally:
        engine.dispose()

    assert rejected.value.requeue is True
