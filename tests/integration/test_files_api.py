"""/v1/files through HTTP, on SQLite; the cases marked `both_backends` (what SQL decides:
paging, races, names with NUL or raw bytes, projects) on the real PostgreSQL server too."""

import asyncio
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from afina.api import uploads
from afina.api.app import create_app
from afina.api.limits import MULTIPART_OVERHEAD
from afina.models import File
from tests.support import LOCAL, assert_error, http_scope, rows, upload

CHAT = b"".join(
    json.dumps(
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}
    ).encode()
    + b"\n"
    for i in range(3)
)


def stored_files(settings) -> list[Path]:
    root = Path(settings.storage_url)
    return sorted(p for p in root.rglob("*") if p.is_file() and ".probe" not in p.parts)


@pytest.mark.both_backends
@pytest.mark.parametrize(
    ("line", "expected_format"),
    [
        (
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "yo"},
                ]
            },
            "chat",
        ),
        ({"prompt": "2+2=", "completion": "4"}, "prompt-completion"),
        ({"instruction": "Add.", "input": "2, 2", "output": "4"}, "instruction"),
        ({"text": "hello world"}, "text"),
    ],
)
def test_upload_stores_row_and_content(client, settings, line, expected_format):
    content = (json.dumps(line) + "\n").encode() * 2
    response = upload(client, content)

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"].startswith("file-")
    assert body["object"] == "file"
    assert body["bytes"] == len(content)
    assert body["filename"] == "train.jsonl"
    assert body["purpose"] == "fine-tune"
    assert body["status"] == "processed"
    assert body["validation"]["format"] == expected_format
    assert body["validation"]["num_examples"] == 2
    assert body["validation"]["estimated_tokens"] > 0
    (row,) = rows(settings, File)
    assert (row.id, row.format, row.num_examples, row.project) == (
        body["id"],
        expected_format,
        2,
        "default",
    )
    (path,) = stored_files(settings)
    assert path.name == f"{body['id']}.jsonl"
    assert path.read_bytes() == content


def test_retrieve_download_list_delete(client, settings):
    created = upload(client, CHAT).json()
    file_id = created["id"]

    assert client.get(f"/v1/files/{file_id}").json() == created
    content = client.get(f"/v1/files/{file_id}/content")
    assert content.status_code == 200
    assert content.content == CHAT
    assert "train.jsonl" in content.headers["content-disposition"]
    listed = client.get("/v1/files").json()
    assert listed["object"] == "list"
    assert [f["id"] for f in listed["data"]] == [file_id]
    assert listed["has_more"] is False

    deleted = client.delete(f"/v1/files/{file_id}")
    assert deleted.json() == {"id": file_id, "object": "file", "deleted": True}
    assert rows(settings, File) == []
    assert stored_files(settings) == []
    for method, path in [
        ("GET", f"/v1/files/{file_id}"),
        ("GET", f"/v1/files/{file_id}/content"),
        ("DELETE", f"/v1/files/{file_id}"),
    ]:
        assert_error(client.request(method, path), 404, "id", "not_found")


@pytest.mark.both_backends
def test_list_pages_with_after_and_limit(client):
    ids = [upload(client, CHAT, name=f"{i}.jsonl").json()["id"] for i in range(5)]
    newest_first = list(reversed(ids))

    first = client.get("/v1/files", params={"limit": 2}).json()
    assert [f["id"] for f in first["data"]] == newest_first[:2]
    assert first["has_more"] is True
    assert first["last_id"] == newest_first[1]
    second = client.get("/v1/files", params={"limit": 2, "after": first["last_id"]}).json()
    assert [f["id"] for f in second["data"]] == newest_first[2:4]
    third = client.get("/v1/files", params={"limit": 2, "after": second["last_id"]}).json()
    assert [f["id"] for f in third["data"]] == newest_first[4:]
    assert third["has_more"] is False

    ascending = client.get("/v1/files", params={"order": "asc", "after": ids[1]}).json()
    assert [f["id"] for f in ascending["data"]] == ids[2:]
    assert client.get("/v1/files", params={"purpose": "batch"}).json()["data"] == []


def test_bad_list_parameters_are_400_naming_the_parameter(client):
    assert_error(client.get("/v1/files", params={"limit": 0}), 400, "limit")
    assert_error(client.get("/v1/files", params={"limit": "many"}), 400, "limit")
    assert_error(client.get("/v1/files", params={"order": "sideways"}), 400, "order")
    assert_error(client.get("/v1/files", params={"after": "file-nope"}), 400, "after")


def test_invalid_dataset_is_refused_with_line_numbers_and_leaves_nothing(client, settings):
    content = CHAT + b"{broken\n" + b'{"text": "other format"}\n' + b'{"messages": []}\n'
    error = assert_error(upload(client, content), 400, "file", "invalid_file_format")

    assert [e["line"] for e in error["errors"]] == [4, 5, 6]
    assert "line 4: invalid JSON" in error["message"]
    assert "line 5: mixed formats" in error["message"]
    assert rows(settings, File) == []
    assert stored_files(settings) == []


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "the file is empty"),
        (b'{"text": "caf\xe9"}\n', "line 1: not valid UTF-8"),
        (
            b'{"messages": [{"role": "user", "content": "hi"}]}\n',
            "line 1: a chat needs an assistant",
        ),
    ],
)
def test_each_kind_of_bad_file_gets_a_message(client, settings, content, message):
    error = assert_error(upload(client, content), 400, "file", "invalid_file_format")
    assert message in error["message"]
    assert rows(settings, File) == []


def test_upload_over_the_size_limit_is_413_and_leaves_nothing(make_settings):
    settings = make_settings(max_upload_bytes=len(CHAT) - 1)
    with TestClient(create_app(settings), base_url=LOCAL) as client:
        error = assert_error(upload(client, CHAT), 413, "file", "file_too_large")
        assert str(len(CHAT) - 1) in error["message"]
        assert upload(client, CHAT[: len(CHAT) // 3]).status_code == 200
    assert len(rows(settings, File)) == 1


MULTIPART_HEAD = b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n'


def post_chunked_upload(app, chunks: int, headers: tuple = ()) -> tuple[int, dict, int]:
    """POST a chunked multipart body of `chunks` x 64 KiB straight to the ASGI app.
    Returns (status, JSON body, how many chunks the app pulled)."""
    chunk = b"x" * (64 * 1024)
    pulled = 0
    sent: list[dict] = []

    async def receive() -> dict:
        nonlocal pulled
        pulled += 1
        body = MULTIPART_HEAD + chunk if pulled == 1 else chunk
        return {"type": "http.request", "body": body, "more_body": pulled < chunks}

    async def send(message: dict) -> None:
        sent.append(message)

    multipart = [(b"host", b"localhost"), (b"content-type", b"multipart/form-data; boundary=b")]
    scope = http_scope("POST", "/v1/files", [*multipart, *headers])
    asyncio.run(app(scope, receive, send))
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(body), pulled


def test_body_over_the_limit_is_refused_before_it_is_read(make_settings):
    settings = make_settings(max_upload_bytes=1000)
    app = create_app(settings)

    status, body, pulled = post_chunked_upload(app, chunks=1000)  # 64 MiB offered
    assert (status, body["error"]["code"]) == (413, "file_too_large")
    assert pulled * 64 * 1024 <= 1000 + MULTIPART_OVERHEAD + 64 * 1024

    with TestClient(app, base_url=LOCAL) as client:
        declared = {"content-type": "multipart/form-data; boundary=b", "content-length": "50000000"}
        assert_error(client.post("/v1/files", content=b"x", headers=declared), 413, "file")
    assert rows(settings, File) == []


def test_form_errors_name_the_field(client, settings):
    assert_error(upload(client, CHAT, purpose="assistants"), 400, "purpose", "invalid_purpose")
    assert_error(client.post("/v1/files", data={"purpose": "fine-tune"}), 400, "file")
    missing_purpose = client.post("/v1/files", files={"file": ("a.jsonl", CHAT)})
    assert_error(missing_purpose, 400, "purpose")
    not_multipart = client.post("/v1/files", json={"purpose": "fine-tune", "file": "x"})
    assert not_multipart.status_code == 400
    assert rows(settings, File) == []


def test_client_file_name_is_metadata_never_a_path(client, settings, tmp_path):
    body = upload(client, CHAT, name="../../../../etc/evil.jsonl").json()

    assert body["filename"] == "evil.jsonl"
    (path,) = stored_files(settings)
    assert path == Path(settings.storage_url) / "files" / f"{body['id']}.jsonl"
    assert not list(tmp_path.parent.rglob("evil.jsonl"))


def test_unknown_routes_and_methods_get_the_error_envelope(client):
    assert_error(client.get("/v1/nothing-here"), 404, None, "not_found")
    assert_error(client.put("/v1/files"), 405, None, "method_not_allowed")


def test_health_and_readiness(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {
        "status": "ok",
        "checks": {"database": "ok", "broker": "ok", "storage": "ok"},
    }


def test_readiness_is_503_when_the_database_is_unreachable(make_settings):
    settings = make_settings(
        database_url="postgresql+psycopg://nobody@127.0.0.1:1/none?connect_timeout=1"
    )
    with TestClient(create_app(settings), base_url=LOCAL) as client:
        response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["database"].startswith("unreachable")


def test_readiness_is_503_when_the_broker_is_unreachable(make_settings):
    with TestClient(
        create_app(make_settings(broker_url="redis://127.0.0.1:1/0")), base_url=LOCAL
    ) as client:
        response = client.get("/readyz")
    assert response.status_code == 503
    checks = response.json()["checks"]
    assert checks["broker"].startswith("unreachable")
    assert checks["database"] == "ok"


@pytest.mark.both_backends
def test_api_keys_gate_every_route_but_health_and_separate_projects(make_settings):
    settings = make_settings(api_keys=["alpha:key-a", "key-default"])
    app = create_app(settings)
    with TestClient(app, base_url=LOCAL) as client:
        missing = client.get("/v1/files")
        assert_error(missing, 401, None, "missing_api_key")
        assert missing.headers["www-authenticate"] == "Bearer"
        wrong = client.get("/v1/files", headers={"Authorization": "Bearer nope"})
        assert_error(wrong, 401, None, "invalid_api_key")
        assert_error(client.get("/docs"), 401, None, "missing_api_key")
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 200

        alpha = {"Authorization": "Bearer key-a"}
        other = {"Authorization": "Bearer key-default"}
        file_id = client.post(
            "/v1/files",
            headers=alpha,
            data={"purpose": "fine-tune"},
            files={"file": ("a.jsonl", CHAT)},
        ).json()["id"]
        assert client.get(f"/v1/files/{file_id}", headers=alpha).status_code == 200
        assert client.get("/v1/files", headers=other).json()["data"] == []
        for method, path in [
            ("GET", f"/v1/files/{file_id}"),
            ("GET", f"/v1/files/{file_id}/content"),
            ("DELETE", f"/v1/files/{file_id}"),
        ]:
            assert_error(client.request(method, path, headers=other), 404, "id")
    (row,) = rows(settings, File)
    assert row.project == "alpha"

    # Without a key an upload is refused before its body is read.
    status, body, pulled = post_chunked_upload(app, chunks=100)
    assert (status, body["error"]["code"], pulled) == (401, "missing_api_key", 0)


@pytest.mark.both_backends
def test_files_count_matches_uploads_under_concurrency(client, settings):
    with ThreadPoolExecutor(max_workers=4) as pool:
        statuses = list(pool.map(lambda _: upload(client, CHAT).status_code, range(8)))
    assert statuses == [200] * 8
    assert len(rows(settings, File)) == 8
    assert len(stored_files(settings)) == 8


@pytest.mark.both_backends
def test_concurrent_deletes_of_one_file_succeed_once(client, settings):
    file_id = upload(client, CHAT).json()["id"]
    with ThreadPoolExecutor(max_workers=6) as pool:
        statuses = sorted(
            pool.map(lambda _: client.delete(f"/v1/files/{file_id}").status_code, range(6))
        )
    assert statuses == [200] + [404] * 5
    assert rows(settings, File) == []
    assert stored_files(settings) == []


@pytest.mark.both_backends
@pytest.mark.parametrize(
    ("path", "params", "status", "param"),
    [
        ("/v1/files/file-a%00b", {}, 404, "id"),
        ("/v1/files/file-a%00b/content", {}, 404, "id"),
        ("/v1/files/" + "x" * 5000, {}, 404, "id"),
        ("/v1/files", {"after": "file-a\x00b"}, 400, "after"),
        ("/v1/files", {"after": "x" * 5000}, 400, "after"),
        ("/v1/files", {"purpose": "fine\x00tune"}, 400, "purpose"),
    ],
)
def test_odd_ids_and_parameters_are_4xx_not_500(client, path, params, status, param):
    assert_error(client.get(path, params=params), status, param)


@pytest.mark.both_backends
def test_control_characters_are_dropped_from_the_file_name(client):
    raw = (  # by hand: httpx would percent-encode the NUL
        b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="tra\x00in\x1b[31m.jsonl"'
        b"\r\n\r\n" + CHAT + b"\r\n--b--\r\n"
    )
    headers = {"content-type": "multipart/form-data; boundary=b"}
    response = client.post("/v1/files", content=raw, headers=headers)
    assert response.status_code == 200, response.text
    assert response.json()["filename"] == "train[31m.jsonl"


def test_expires_after_is_refused_not_ignored(client, settings):
    response = upload(client, CHAT, **{"expires_after[anchor]": "created_at"})
    assert_error(response, 400, "expires_after", "unsupported_parameter")
    assert rows(settings, File) == []


# --- Large uploads: written to disk and checked by a process of their own as they arrive ---


@pytest.fixture
def checks(monkeypatch) -> list[uploads.DatasetCheck]:
    """Every dataset check process the test starts."""
    made = []
    start = uploads.DatasetCheck.__init__

    def record(check, *args, **kwargs):
        start(check, *args, **kwargs)
        check.niceness = os.getpriority(os.PRIO_PROCESS, check.process.pid)
        made.append(check)

    monkeypatch.setattr(uploads.DatasetCheck, "__init__", record)
    return made


def lines_of(count: int) -> list[bytes]:
    return [
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": f"q{i}"},
                    {"role": "assistant", "content": "a"},
                ]
            }
        ).encode()
        for i in range(count)
    ]


def large_invalid() -> bytes:
    lines = lines_of(3000)
    for number in (5, 1500, *range(2000, 2030), 2999):  # with 3 more below: 36 bad lines
        lines[number - 1] = b"{broken"
    lines[100] = b'{"text": "another format"}'
    lines[200] = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}'
    lines[300] = b'{"text": "' + b"x" * 300_000 + b'"}'  # over AFINA_MAX_LINE_BYTES below
    return b"\n".join(lines) + b"\n"


def masked(response) -> tuple[int, dict]:
    body = response.json()
    for name in ("id", "created_at"):
        body.pop(name, None)
    return response.status_code, body


@pytest.mark.parametrize(
    "content",
    [b"\n".join(lines_of(3000)) + b"\n", large_invalid()],
    ids=["valid", "invalid"],
)
def test_a_large_upload_answers_as_one_checked_in_memory(
    make_settings, monkeypatch, checks, content
):
    settings = make_settings(max_line_bytes=256 * 1024)
    with TestClient(create_app(settings), base_url=LOCAL) as client:
        staged = upload(client, content)
        assert len(checks) == 1, "the upload was not checked by a process of its own"
        niceness = os.getpriority(os.PRIO_PROCESS, 0) + uploads.CHECK_NICENESS
        assert checks[0].niceness == min(19, niceness), "the check runs nicer than the API"
        monkeypatch.setattr(uploads, "IN_MEMORY_BYTES", 1 << 30)
        monkeypatch.setattr(uploads, "IN_MEMORY_LINES", 1 << 30)
        in_memory = upload(client, content)
        assert len(checks) == 1
    assert masked(staged) == masked(in_memory)
    assert [check.process.returncode for check in checks] == [0]
    if staged.status_code == 200:
        assert [path.read_bytes() for path in stored_files(settings)] == [content, content]
    else:
        error = staged.json()["error"]
        assert error["message"].endswith("; and 16 more")
        assert [e["line"] for e in error["errors"]][:4] == [5, 101, 201, 301]
        assert stored_files(settings) == []
        assert rows(settings, File) == []


def test_a_file_part_sent_twice_keeps_the_last_and_leaves_nothing_of_the_first(
    client, settings, checks
):
    large = b"\n".join(lines_of(3000)) + b"\n"
    for first, second in [(large, CHAT), (CHAT, large)]:
        body = (
            b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
            + b'--b\r\nContent-Disposition: form-data; name="file"; filename="1.jsonl"\r\n\r\n'
            + first
            + b'\r\n--b\r\nContent-Disposition: form-data; name="file"; filename="2.jsonl"\r\n\r\n'
            + second
            + b"\r\n--b--\r\n"
        )
        headers = {"content-type": "multipart/form-data; boundary=b"}
        response = client.post("/v1/files", content=body, headers=headers)
        assert response.status_code == 200, response.text
        assert (response.json()["filename"], response.json()["bytes"]) == ("2.jsonl", len(second))
    assert sorted(len(p.read_bytes()) for p in stored_files(settings)) == sorted(
        [len(CHAT), len(large)]
    )
    assert all(check.process.returncode is not None for check in checks)


def test_an_upload_that_finds_no_free_check_waits_for_one(client, monkeypatch, checks):
    slots = threading.BoundedSemaphore(1)
    monkeypatch.setattr(uploads, "_check_slots", slots)
    slots.acquire()  # another upload holds the only one
    releasing = threading.Timer(0.5, slots.release)
    releasing.start()
    response = upload(client, b"\n".join(lines_of(3000)) + b"\n")
    releasing.join()
    assert response.status_code == 200, response.text
    assert response.json()["validation"]["num_examples"] == 3000
    assert len(checks) == 1  # started once the file was whole
    assert slots.acquire(blocking=False), "the check did not give its slot back"
