"""A real training stack for the end-to-end tests: a Celery worker process beside the app.
Embedded: SQLite and kombu's SQLAlchemy broker on it. Production (tests marked
`both_backends`): the real PostgreSQL and Redis servers."""

import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from afina.api.app import create_app
from afina.core.settings import Settings
from tests.support import LOCAL, broker_url_for

FINAL = ("succeeded", "failed", "cancelled")


def stack_settings(database_url: str, data_dir: Path, **overrides: object) -> Settings:
    return Settings(
        _env_file=None,
        data_dir=data_dir,
        database_url=database_url,
        broker_url=broker_url_for(database_url, data_dir),
        **{"api_keys": [], **overrides},
    )


@contextmanager
def worker_process(
    settings: Settings, queues: Sequence[str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """`python -m afina.worker` on these settings (their database, broker and storage, an
    object store's endpoint and credentials too, the queues it takes: `queues`, else the
    settings'), logging to `{data dir}/worker.log`; stopped (SIGTERM, then SIGKILL after
    30 s) at the end if still running."""
    secret = settings.s3_secret_access_key
    s3 = {
        "AFINA_S3_ENDPOINT_URL": settings.s3_endpoint_url,
        "AFINA_S3_ACCESS_KEY_ID": settings.s3_access_key_id,
        "AFINA_S3_SECRET_ACCESS_KEY": secret.get_secret_value() if secret else None,
        "AFINA_S3_REGION": settings.s3_region,
    }
    env = {
        **{name: value for name, value in os.environ.items() if name not in s3},
        "AFINA_DATA_DIR": str(settings.data_dir),
        "AFINA_DATABASE_URL": settings.database_url,
        "AFINA_BROKER_URL": settings.broker_url,
        "AFINA_STORAGE_URL": settings.storage_url,
        "AFINA_API_KEYS": "",
        "AFINA_WORKER_TIMEOUT_SECONDS": str(settings.worker_timeout_seconds),
        "AFINA_WORKER_QUEUES": ",".join(queues or settings.worker_queues),
        **{name: value for name, value in s3.items() if value is not None},
    }
    with (settings.data_dir / "worker.log").open("ab") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "afina.worker"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            yield worker
        finally:
            worker.terminate()
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()


@pytest.fixture(scope="session")
def stack(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """Settings shared by the app under test and a worker process started on them."""
    settings = stack_settings(database_url, tmp_path_factory.mktemp("stack"))
    with worker_process(settings):
        yield settings


@pytest.fixture
def api(stack: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(stack), base_url=LOCAL) as client:
        yield client


def worker_log(settings: Settings) -> str:
    return (settings.data_dir / "worker.log").read_text(errors="replace")[-4000:]


def wait_for_job(
    client: TestClient, settings: Settings, job_id: str, until: tuple[str, ...] = FINAL, timeout=120
) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
        if job["status"] in until:
            return job
        if time.monotonic() > deadline:
            pytest.fail(
                f"job {job_id} is {job['status']} after {timeout} s:\n{worker_log(settings)}"
            )
        time.sleep(0.2)


def loss_curve(client: TestClient, job_id: str) -> dict[int, float]:
    """The job's loss by step, as `/metrics` has it."""
    series = client.get(f"/v1/fine_tuning/jobs/{job_id}/metrics").json()["data"]
    return {point["step"]: point["loss"] for point in series}
