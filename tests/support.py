"""Helpers the tests share: uploads, error-body checks, reading rows back, running
`afina serve` as a process, a small disk of its own to fill, the demo model built once."""

import errno
import hashlib
import itertools
import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from filelock import FileLock
from sqlalchemy import select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from afina.api.server import Server, server_config
from afina.core.ids import new_id
from afina.core.job_config import (
    JobConfig,
    LoraSettings,
    QuantizationSettings,
    ResolvedHyperparameters,
    ResolvedTraining,
)
from afina.core.settings import Settings
from afina.jobs import workers
from afina.jobs.queue import TRAIN_QUEUE, TRAIN_TASK
from afina.models import Job, JobStatus, Worker
from afina.models.session import make_engine, make_session_factory
from afina.worker.demo_model import ModelShape, build_demo_model

# A resolved job configuration, for the job rows a test writes itself.
JOB_CONFIG = JobConfig(
    hyperparameters=ResolvedHyperparameters(n_epochs=1, batch_size=1, learning_rate_multiplier=1),
    lora=LoraSettings(),
    quantization=QuantizationSettings(),
    training=ResolvedTraining(learning_rate=1e-4, max_seq_length=None),
)

# Where the test clients send requests: an afina with no key answers only its loopback.
LOCAL = "http://localhost"


def job_row(**values: Any) -> Job:
    """A job row as the API stores one (a new id, `JOB_CONFIG`), for a test that writes its
    own; `values` set or replace its columns."""
    defaults = {
        "id": new_id("ftjob"),
        "project": "proj",
        "status": JobStatus.QUEUED,
        "model": "org/base-model",
        "training_file_id": "file-abc",
        "seed": 1,
        "config": JOB_CONFIG.model_dump(mode="json"),
    }
    return Job(**{**defaults, **values})


def http_scope(method: str, path: str, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    """The ASGI scope of a request to this path, for a test that calls the app itself."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
        "headers": headers,
    }


def jsonl(*examples: dict[str, Any]) -> bytes:
    return b"".join(json.dumps(example).encode() + b"\n" for example in examples)


def upload(
    client: TestClient,
    content: bytes,
    name: str = "train.jsonl",
    headers: dict[str, str] | None = None,
    **form: str,
):
    return client.post(
        "/v1/files",
        data={"purpose": "fine-tune", **form},
        files={"file": (name, content, "application/jsonl")},
        headers=headers,
    )


def assert_error(response, status: int, param: str | None, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    assert error["message"]
    return error


def register_worker(
    db: Session,
    worker_id: str,
    *,
    memory_total: int = 24 * 2**30,
    kind: str = "cuda",
    name: str = "NVIDIA L4",
    throughput: dict[str, float] | None = None,
    queues: Sequence[str] = ("train",),
    ranks: int = 1,
) -> None:
    """A worker in the registry, as one that just started would write itself, taking the
    training `queues`, on a node where a job may train on `ranks` GPUs."""
    device = workers.Device(kind, name, memory_total, memory_total // 2, cpu_cores=8, ranks=ranks)
    workers.register(db, worker_id, "gpu-host", queues, device)
    if throughput:
        db.flush()
        db.get(Worker, worker_id).throughput = throughput


def add_rows(settings: Settings, *added: Any) -> None:
    """Write ORM rows (a job before its checkpoints) in one transaction of their own."""
    engine = make_engine(settings.database_url)
    with make_session_factory(engine).begin() as session:
        session.add_all(added)
    engine.dispose()


def rows(settings: Settings, table: Any) -> list[Any]:
    """Every row of an ORM class, read in a session of its own."""
    engine = make_engine(settings.database_url)
    with make_session_factory(engine)() as session:
        found = list(session.scalars(select(table)))
    engine.dispose()
    return found


AFINA = Path(sys.executable).with_name("afina")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def afina_serve(
    workdir: Path, *args: str, env: dict[str, str] | None = None
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`afina serve` as a user starts it in `workdir` (embedded default, data in
    `workdir/data`, `env` added to the environment), until it answers; stopped with SIGTERM
    at the end."""
    port = free_port()
    # Unbuffered: the tests read serve.log (the worker child's lines too) while it runs.
    base_env = {**os.environ, "AFINA_DATA_DIR": str(workdir / "data"), "PYTHONUNBUFFERED": "1"}
    for name in ("AFINA_DATABASE_URL", "AFINA_BROKER_URL", "AFINA_STORAGE_URL", "AFINA_API_KEYS"):
        base_env.pop(name, None)
    env = {**base_env, **(env or {})}
    log = (workdir / "serve.log").open("wb")
    server = subprocess.Popen(
        [AFINA, "serve", "--port", str(port), *args],
        env=env,
        cwd=workdir,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None, (workdir / "serve.log").read_text()
            assert time.monotonic() < deadline, "afina serve did not come up in 60 s"
            time.sleep(0.2)
        yield base, server
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()


@contextmanager
def serve_in_thread(app: Any) -> Iterator[str]:
    """The app served by uvicorn in this process on a free loopback port, for clients that
    need a socket (the openai client) while the test still reaches `app.state`."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = Server(server_config(app, app.state.settings, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive(), "uvicorn stopped before it started serving"
        assert time.monotonic() < deadline, "uvicorn did not start in 10 s"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux /proc)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended while we looked
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


REDIS_URL = os.environ.get("AFINA_TEST_REDIS_URL", "redis://127.0.0.1:6379")
# Redis databases 1-15, dealt out in turn within this process from a block of its own, so
# that two xdist workers never empty each other's.
_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_BLOCK = max(1, 15 // _WORKERS)
_redis_databases = itertools.cycle(1 + (_WORKER * _BLOCK + i) % 15 for i in range(_BLOCK))


def broker_url_for(database_url: str, data_dir: Path) -> str:
    """The broker that goes with a test database: a SQLite broker file in `data_dir` beside
    SQLite, a Redis database of its own (emptied) beside PostgreSQL."""
    if make_url(database_url).get_backend_name() == "sqlite":
        return f"sqla+sqlite:///{data_dir / 'broker.db'}"
    url = f"{REDIS_URL}/{next(_redis_databases)}"
    connection = redis.Redis.from_url(url)
    connection.flushdb()  # a database of its own, emptied: no message of an earlier run
    connection.close()
    return url


@contextmanager
def small_disk(directory: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` (e.g. "32m") mounted at `directory`, unmounted at the end: a disk of
    the test's own, to fill. The test is skipped where it cannot be mounted (not root)."""
    directory.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("the full-disk tests mount a small tmpfs, which needs root")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(directory)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs at {directory}: {mounted.stderr.strip()}")
    try:
        yield directory
    finally:
        if subprocess.run(["umount", str(directory)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", str(directory)], check=True)


def free_space(directory: Path) -> int:
    stat = os.statvfs(directory)
    return stat.f_bavail * stat.f_frsize


def fill_disk(directory: Path) -> Path:
    """Fill the disk under `directory` to its last byte with a file of its own, returned (the
    test frees the space by deleting it)."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for chunk in (b"\0" * 1024 * 1024, b"\0" * 4096, b"\0"):
            with pytest.raises(OSError, match="No space left") as full:  # noqa: PT012
                while True:
                    os.write(fd, chunk)
            assert full.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    assert free_space(directory) == 0
    return filler


def exhaust_sqlite(database_url: str) -> None:
    """On a full disk, use up the room SQLite still has for writes (its write-ahead log is
    reused from the start after a checkpoint), until it says "database or disk is full"."""
    database = make_url(database_url).database
    connection = sqlite3.connect(str(database), isolation_level=None, timeout=30)
    try:
        with pytest.raises(sqlite3.OperationalError) as full:  # noqa: PT012
            connection.execute("CREATE TABLE IF NOT EXISTS test_filler (payload BLOB)")
            while True:
                connection.execute("INSERT INTO test_filler VALUES (zeroblob(3000))")
        assert full.value.sqlite_errorcode == sqlite3.SQLITE_FULL
    finally:
        connection.close()


def demo_model_in(root: Path, *, seed: int = 0, shape: ModelShape = ModelShape()) -> Path:
    """The demo model of these parameters under `root`, built by whichever process asks first
    (xdist workers share `root`, under a file lock) and only read after that."""
    key = hashlib.sha256(repr((seed, shape)).encode()).hexdigest()[:12]
    directory = root / f"demo-{key}"
    with FileLock(root / f"demo-{key}.lock"):
        if not directory.is_dir():
            building = root / f"demo-{key}.building"
            build_demo_model(building, seed=seed, shape=shape)
            building.rename(directory)
    return directory


def take_messages(celery: Any, queue: str = TRAIN_QUEUE, task: str = TRAIN_TASK) -> list[str]:
    """The job (or export) ids of the `task` messages waiting on `queue`, taken off it."""
    ids = []
    with celery.connection_for_write() as connection:
        channel = connection.default_channel
        while (message := channel.basic_get(queue, no_ack=True)) is not None:
            assert message.headers["task"] == task
            args, _kwargs, _embed = message.decode()
            ids.append(args[0])
    return ids


# Eight chats of growing length (the estimate's tests count their tokens).
GROWING_CHATS = [
    {
        "messages": [
            {"role": "user", "content": "tell me " + "more " * n},
            {"role": "assistant", "content": "sure " * (2 * n + 1)},
        ]
    }
    for n in range(8)
]

# Ten chat examples: a training file that passes validation.
CHAT = jsonl(
    *(
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}
        for i in range(10)
    )
)


def config_only_model(root: Path) -> Path:
    """A local model as far as the API can tell: a directory with a config.json."""
    directory = root / "models" / "tiny"
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({"max_position_embeddings": 512}))
    return directory


# The S3-compatible server of the object-storage tests (`.ci/run` starts moto's on this port).
S3_ENDPOINT = os.environ.get("AFINA_TEST_S3_URL", "http://127.0.0.1:9000")
S3_KEY = os.environ.get("AFINA_TEST_S3_ACCESS_KEY_ID", "afina-test")
S3_SECRET = os.environ.get("AFINA_TEST_S3_SECRET_ACCESS_KEY", "afina-test-secret")


@dataclass(frozen=True)
class S3Bucket:
    """A bucket of this test run's own on the test S3 server."""

    name: str
    endpoint_url: str = S3_ENDPOINT

    def url(self, prefix: str) -> str:
        """An `AFINA_STORAGE_URL` under this bucket."""
        return f"s3://{self.name}/{prefix}"

    def settings(self) -> dict[str, str]:
        """The `Settings` fields that reach the server."""
        return {
            "s3_endpoint_url": self.endpoint_url,
            "s3_access_key_id": S3_KEY,
            "s3_secret_access_key": S3_SECRET,
        }

    def options(self) -> dict[str, Any]:
        """The fsspec storage options that reach the server."""
        return {
            "key": S3_KEY,
            "secret": S3_SECRET,
            "client_kwargs": {"endpoint_url": self.endpoint_url},
        }

    def filesystem(self) -> Any:
        """An s3fs file system on the server that lists afresh every time."""
        import s3fs

        return s3fs.S3FileSystem(
            **self.options(), use_listings_cache=False, skip_instance_cache=True
        )

    def objects(self, prefix: str) -> list[str]:
        """Every object key under `prefix` in the bucket, relative to it."""
        root = f"{self.name}/{prefix}".rstrip("/")
        found = self.filesystem().find(root)
        return sorted(name.removeprefix(f"{root}/") for name in found)


def s3_reachable(endpoint_url: str) -> str | None:
    """None when something answers at the endpoint's host and port, else why not."""
    parts = urlsplit(endpoint_url)
    try:
        socket.create_connection((parts.hostname, parts.port or 80), timeout=2).close()
    except OSError as error:
        return f"S3 server not reachable at {endpoint_url}: {error}"
    return None
