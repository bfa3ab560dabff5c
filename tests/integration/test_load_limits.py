"""Under load and against slow clients: every request is answered (200, or a quick 503 with
Retry-After past the stated limit), never a 500 or a hang; slow clients are cut off; the
database threads and the pool never wait on each other. A live uvicorn server with afina's
protocol, on both backends (the pool and the threads are what is under test)."""

import asyncio
import gc
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace

import httpx
import pytest
from sqlalchemy import event

from afina.api.app import create_app
from afina.models import File, JobStatus
from afina.models.session import make_engine, make_session_factory
from tests.support import job_row, serve_in_thread

pytestmark = pytest.mark.both_backends

FILE_ID = "file-LoadLoadLoadLoadLoadLoad"
JOB_ID = "ftjob-LoadLoadLoadLoadLoadLoad"


def _seed(settings, project: str = "default") -> None:
    with make_session_factory(make_engine(settings.database_url)).begin() as db:
        db.add(
            File(
                id=FILE_ID,
                project=project,
                filename="a.jsonl",
                purpose="fine-tune",
                bytes=10,
                format="chat",
                num_examples=1,
                estimated_tokens=1,
            )
        )
        db.flush()
        db.add(
            job_row(
                id=JOB_ID,
                project=project,
                status=JobStatus.RUNNING,
                model="org/m",
                training_file_id=FILE_ID,
            )
        )


@contextmanager
def served(make_settings, **overrides) -> Iterator[tuple[str, int]]:
    settings = make_settings(**overrides)
    _seed(settings)
    with serve_in_thread(create_app(settings)) as url:
        yield url, int(url.rsplit(":", 1)[1])


async def _request(port: int, raw: bytes, timeout: float = 30) -> tuple[int, dict, bytes]:
    """One request on a connection of its own: status, headers, body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        body = await asyncio.wait_for(
            reader.readexactly(int(headers.get("content-length", 0))), timeout
        )
        return int(lines[0].split()[1]), headers, body
    finally:
        writer.close()


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()


@pytest.mark.parametrize(
    "path",
    [
        f"/v1/fine_tuning/jobs/{JOB_ID}",
        f"/v1/files/{FILE_ID}",
        f"/v1/fine_tuning/jobs/{JOB_ID}/events",
        "/v1/files",
    ],
)
def test_200_requests_at_once_are_all_answered_and_health_answers_meanwhile(make_settings, path):
    """Before: 100 reads at once wedged the API (its threads waited for pooled connections
    held by requests that waited for a thread), and /healthz waited behind them."""

    async def burst(port: int) -> tuple[Counter, list[int]]:
        answers = asyncio.gather(*(_request(port, get(path)) for _ in range(200)))
        health = []
        while not answers.done():
            health.append((await _request(port, get("/healthz"), timeout=10))[0])
            await asyncio.sleep(0.02)
        statuses = Counter()
        for status, headers, _ in await answers:
            statuses[status] += 1
            assert status == 200 or (status == 503 and headers["retry-after"] == "1")
        return statuses, health

    with served(make_settings) as (_, port):
        statuses, health = asyncio.run(burst(port))
    assert statuses[200] >= 1
    assert set(statuses) <= {200, 503}, statuses
    assert set(health) == {200}


def test_past_the_limit_a_request_is_shed_at_once_with_retry_after(make_settings):
    with served(make_settings, max_concurrent_requests=2) as (_, port):
        # Two uploads that stop half way hold the API's two places.
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        for connection in held:
            connection.sendall(
                b"POST /v1/files HTTP/1.1\r\nHost: localhost\r\nContent-Type: multipart/form-data;"
                b" boundary=x\r\nContent-Length: 1000\r\n\r\n--x\r\n"
            )
        deadline = time.monotonic() + 10
        while True:
            status, headers, body = asyncio.run(_request(port, get(f"/v1/files/{FILE_ID}")))
            if status == 503 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert status == 503
        assert headers["retry-after"] == "1"
        assert json.loads(body)["error"]["code"] == "overloaded"
        assert asyncio.run(_request(port, get("/healthz")))[0] == 200  # never shed
        for connection in held:
            connection.close()
        deadline = time.monotonic() + 10
        while asyncio.run(_request(port, get(f"/v1/files/{FILE_ID}")))[0] != 200:
            assert time.monotonic() < deadline, "the places were not given back"
            time.sleep(0.05)


def test_the_heap_the_server_started_with_is_out_of_garbage_collection_while_it_serves(
    make_settings,
):
    """A full collection walks every object the app holds (60 ms here), and every request
    in flight waits for it: while serving they are frozen, and thawed at shutdown."""
    with served(make_settings):
        assert gc.get_freeze_count() > 10_000
    assert gc.get_freeze_count() == 0


def test_a_request_that_waited_past_the_queue_limit_is_shed_at_once(make_settings):
    """Past capacity, requests wait inside the server before any middleware counts them:
    those that waited past AFINA_MAX_QUEUE_SECONDS are answered 503 instead of served late."""

    async def burst(port: int) -> list[tuple[int, dict, bytes]]:
        return await asyncio.gather(*(_request(port, get("/v1/files")) for _ in range(200)))

    with served(make_settings, max_queue_seconds=0.01) as (_, port):
        answers = asyncio.run(burst(port))
        shed = [json.loads(body) for status, headers, body in answers if status == 503]
        assert {status for status, _, _ in answers} == {200, 503}
        assert all(headers["retry-after"] == "1" for s, headers, _ in answers if s == 503)
        assert {error["error"]["code"] for error in shed} == {"overloaded"}
        assert "AFINA_MAX_QUEUE_SECONDS" in shed[0]["error"]["message"]
        deadline = time.monotonic() + 10
        while asyncio.run(_request(port, get("/v1/files")))[0] != 200:  # idle: served again
            assert time.monotonic() < deadline
            time.sleep(0.05)


def _closed_within(connection: socket.socket, seconds: float) -> bytes:
    """What the server sent before it closed the connection; fails if it stays open."""
    connection.settimeout(seconds)
    received = b""
    while chunk := connection.recv(65536):
        received += chunk
    return received


@pytest.mark.parametrize(
    "sent",
    [b"", b"GET /v1/files HTTP/1.1\r\nHost: loc", b"GET /v1/fi"],
    ids=["nothing", "half the headers", "half the request line"],
)
def test_a_client_slow_with_its_headers_is_answered_408_and_closed(make_settings, sent):
    with served(make_settings, header_timeout_seconds=0.5) as (_, port):
        connection = socket.create_connection(("127.0.0.1", port))
        connection.sendall(sent)
        received = _closed_within(connection, 10)
        assert received.startswith(b"HTTP/1.1 408 ")
        # A well-behaved client is served meanwhile and after.
        assert asyncio.run(_request(port, get("/v1/files")))[0] == 200


def test_a_body_shorter_than_its_content_length_is_answered_408_and_closed(make_settings):
    with served(make_settings, body_timeout_seconds=0.5) as (_, port):
        connection = socket.create_connection(("127.0.0.1", port))
        connection.sendall(
            b"POST /v1/fine_tuning/jobs HTTP/1.1\r\nHost: localhost\r\n"
            b'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"model": '
        )
        received = _closed_within(connection, 10)
        head, _, body = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 ")
        assert json.loads(body)["error"]["code"] == "body_timeout"


def test_connections_past_the_cap_are_closed_at_once(make_settings):
    with served(make_settings, max_connections=4) as (_, port):
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
        time.sleep(0.2)  # the server has taken them
        extra = socket.create_connection(("127.0.0.1", port))
        assert _closed_within(extra, 10) == b""
        for connection in idle:
            connection.close()
        deadline = time.monotonic() + 10
        while True:
            try:
                if asyncio.run(_request(port, get("/v1/files"), timeout=5))[0] == 200:
                    break
            except (OSError, asyncio.IncompleteReadError):
                pass
            assert time.monotonic() < deadline, "no connection was taken after the others went"
            time.sleep(0.05)


def test_another_projects_id_and_a_made_up_id_run_the_same_statements(make_settings):
    """Existence must not show, in the answer or in the work done: one query by id and
    project for both."""
    settings = make_settings(api_keys=["alpha:key-a", "beta:key-b"])
    _seed(settings, project="alpha")
    app = create_app(settings)
    statements: list[str] = []

    def record(_connection, _cursor, statement, *_args) -> None:
        if threading.current_thread().name.startswith("afina-db"):  # not the reconciler's
            statements.append(statement)

    event.listen(app.state.engine, "before_cursor_execute", record)
    with serve_in_thread(app) as url:
        port = int(url.rsplit(":", 1)[1])
        seen = {}
        for job_id in (JOB_ID, "ftjob-MadeUpMadeUpMadeUpMadeUpMa"):
            statements.clear()
            raw = (
                f"GET /v1/fine_tuning/jobs/{job_id} HTTP/1.1\r\nHost: localhost\r\n"
                "Authorization: Bearer key-b\r\n\r\n"
            ).encode()
            status, _, body = asyncio.run(_request(port, raw))
            seen[job_id] = (
                status,
                list(statements),
                json.loads(body)["error"]["message"].replace(job_id, "ID"),
            )
    real, made_up = seen.values()
    assert real == made_up
    assert real[0] == 404
    assert len(real[1]) == 1


def test_health_is_answered_by_the_server_as_it_arrives_not_by_the_app(make_settings):
    """In a burst, a request the app starts waits behind every one it has in hand: /healthz
    is answered by the server's protocol instead, here in front of an app that never
    answers anything."""

    async def stalled(scope, receive, send):
        if scope["type"] == "http":
            await asyncio.Event().wait()

    stalled.state = SimpleNamespace(settings=make_settings())
    with serve_in_thread(stalled) as url, httpx.Client(base_url=url, timeout=5) as client:
        for _ in range(2):  # on one keep-alive connection
            answer = client.get("/healthz")
            assert (answer.status_code, answer.json()) == (200, {"status": "ok"})
