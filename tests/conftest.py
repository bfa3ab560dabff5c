"""Fixtures shared by all tests: settings on a temp data dir, a migrated database (SQLite;
also the real PostgreSQL server for tests marked `both_backends`), the app, clients, a live
server, the demo model."""

import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from afina.api.app import create_app
from afina.core.settings import Settings
from afina.models import Base
from afina.models.schema import upgrade_database
from afina.models.session import make_engine
from tests.support import (
    LOCAL,
    S3_ENDPOINT,
    S3Bucket,
    demo_model_in,
    s3_reachable,
    serve_in_thread,
)


def pytest_configure(config: pytest.Config) -> None:
    """torch on one thread in this process and in those the tests start (workers, `afina
    serve`), unless OMP_NUM_THREADS says otherwise: xdist already runs a process a core, and
    the tiny demo model gains nothing from more threads but their spinning."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


# Test modules that share costly session and module fixtures (the training stack's worker
# process, the trained adapters): `make test` (--dist loadgroup) runs a group in one worker.
XDIST_GROUPS = {
    "tests/e2e/test_training.py": "stack",
    "tests/e2e/test_inference.py": "stack",
    "tests/e2e/test_preference_and_evaluation.py": "stack",
    "tests/e2e/test_take_away.py": "stack",
    "tests/e2e/test_cli_client_generation.py": "stack",
    "tests/browser/test_dashboard.py": "browser",
}


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """--dist loadgroup with the groups of XDIST_GROUPS. (xdist 3.8 groups the tests marked
    xdist_group by renaming them, which pytest 9 no longer sees.) The largest group goes
    first, then every other test alone, in collection order: the slow e2e tests first."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return XDIST_GROUPS.get(nodeid.split("::", 1)[0], nodeid)

    return GroupScheduling(config, log)


POSTGRES_URL = os.environ.get(
    "AFINA_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REQUIRE_POSTGRES = os.environ.get("AFINA_TEST_REQUIRE_POSTGRES") == "1"


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A database of its own for this run (for each xdist worker), created on the server and
    dropped after it. Without a server the PostgreSQL cases skip, unless
    AFINA_TEST_REQUIRE_POSTGRES=1 (CI)."""
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    try:
        admin.connect().close()
    except OperationalError as error:
        admin.dispose()
        message = f"PostgreSQL not reachable at {POSTGRES_URL}: {error.orig}"
        if REQUIRE_POSTGRES:
            pytest.fail(message)
        pytest.skip(message)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    name = f"afina_test_{worker}_{secrets.token_hex(4)}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test marked `both_backends` (SQL behaviour under test) runs on SQLite and on
    PostgreSQL; every other test that needs a database gets SQLite."""
    if "database_url" in metafunc.fixturenames and metafunc.definition.get_closest_marker(
        "both_backends"
    ):
        metafunc.parametrize("database_url", BACKENDS, indirect=True, scope="session")


@pytest.fixture(scope="session")
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A database migrated to head once per backend and test run (per xdist worker)."""
    if getattr(request, "param", "sqlite") == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'afina.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    upgrade_database(url)
    return url


@pytest.fixture
def clean_database(database_url: str) -> str:
    """The migrated database with every table emptied before the test."""
    engine = make_engine(database_url)
    with engine.begin() as connection:
        for table in reversed(Base.metadata.sorted_tables):
            connection.execute(table.delete())
    engine.dispose()
    return database_url


SettingsFactory = Callable[..., Settings]


@pytest.fixture
def make_settings(tmp_path: Path, clean_database: str) -> SettingsFactory:
    """Settings on a temp data dir and the clean database, isolated from the environment's
    AFINA_* keys and .env; keyword arguments override fields."""

    def make(**overrides: object) -> Settings:
        fields = {"data_dir": tmp_path / "data", "database_url": clean_database, "api_keys": []}
        return Settings(_env_file=None, **{**fields, **overrides})

    return make


@pytest.fixture
def settings(make_settings: SettingsFactory) -> Settings:
    return make_settings()


class NoReconciler:
    """What the app starts and stops in place of its reconciler thread, in tests that do not
    test it: no pass runs beside the test (one costs a write and a few queries at start-up),
    and none changes the jobs a test writes. Tests of the reconciler build their own."""

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


@pytest.fixture
def app(settings: Settings) -> FastAPI:
    app = create_app(settings)
    app.state.reconciler = NoReconciler()
    return app


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app, base_url=LOCAL) as test_client:
        yield test_client


@pytest.fixture
def live_server(app: FastAPI) -> Iterator[str]:
    """The app served by uvicorn on a free loopback port, for clients that need a socket."""
    with serve_in_thread(app) as url:
        yield url


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny demo model, built once for the whole run: xdist workers share the run's
    base temp dir (theirs are folders of it)."""
    root = tmp_path_factory.getbasetemp()
    return demo_model_in(root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root)


REQUIRE_S3 = os.environ.get("AFINA_TEST_REQUIRE_S3") == "1"


@pytest.fixture(scope="session")
def s3_bucket() -> Iterator[S3Bucket]:
    """A bucket of its own for this run (for each xdist worker) on the S3 server named by
    AFINA_TEST_S3_URL, emptied and removed after it. Without a server the S3 cases skip,
    unless AFINA_TEST_REQUIRE_S3=1 (CI)."""
    unreachable = s3_reachable(S3_ENDPOINT)
    if unreachable:
        if REQUIRE_S3:
            pytest.fail(unreachable)
        pytest.skip(unreachable)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    bucket = S3Bucket(f"afina-test-{worker}-{secrets.token_hex(4)}")
    filesystem = bucket.filesystem()
    filesystem.mkdir(bucket.name)
    try:
        yield bucket
    finally:
        filesystem.rm(bucket.name, recursive=True)
