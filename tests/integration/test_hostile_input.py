"""Hostile input: whatever a client sends, the answer is a 4xx with OpenAI's error body naming
the field or the line, never a 500, and nothing is left behind (no row, no stored file, no
spooled temporary file).

test_files_api.py and test_jobs_api.py already pin the upload limit on a declared and on a
chunked body, the JSON limit on job creation, fields refused for their range or an unknown
name, and the allow-list on `..` paths and symlinks; this file does not repeat them. It adds
file names and contents built to hurt, every field of a job body with every wrong JSON type,
trust_remote_code, model names that only look allowed, generation bodies (with a model that
resolves, so that only validation stands between them and the engine), and limits that a
body's content type must not be able to change.
"""

import asyncio
import contextlib
import errno
import json
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient

from afina.api import uploads
from afina.api.app import create_app
from afina.api.limits import MULTIPART_OVERHEAD
from afina.core.ids import new_id
from afina.core.settings import Settings
from afina.core.storage import TEMPORARY_MARK, adapter_key
from afina.models import File, Job, JobEvent, JobStatus
from tests.support import LOCAL, add_rows, assert_error, http_scope, job_row, jsonl, rows, upload

ALLOWED = ["org/*", "/models/*"]  # globs only: no base model is callable by name
BASE = "org/base-model"
CEILING = 64  # AFINA_MAX_NEW_TOKENS
LINE_LIMIT = 256 * 1024
UPLOAD_LIMIT = 4 * 1024 * 1024
JSON_LIMIT = 64 * 1024
CHAT = jsonl(
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
)
MULTIPART = "multipart/form-data; boundary=b"
NUL = "\u0000"


pytestmark = pytest.mark.usefixtures("no_generation")


@pytest.fixture(autouse=True)
def spool(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """The system's temporary directory, where a request's files could spill to disk (an
    upload is staged beside the stored files on local storage, here in the temporary
    directory only for an object store): a directory of the test's own, to see that nothing
    stays."""
    directory = tmp_path / "spool"
    directory.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(directory))
    return directory


def open_in(directory: Path) -> list[str]:
    """The files this process holds open under `directory`. A spooled upload has no name
    (O_TMPFILE, or unlinked at once): one that was never closed shows up only here."""
    found = []
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed while we looked
            continue
        if target.startswith(str(directory)):
            found.append(target)
    return found


@pytest.fixture
def settings(make_settings) -> Settings:
    return make_settings(
        allowed_models=ALLOWED,
        max_new_tokens=CEILING,
        max_line_bytes=LINE_LIMIT,
        max_upload_bytes=UPLOAD_LIMIT,
        max_json_bytes=JSON_LIMIT,
    )


def stored(settings: Settings) -> list[Path]:
    """Every file under the storage root (but the readiness probe's)."""
    root = Path(settings.storage_url)
    return sorted(p for p in root.rglob("*") if p.is_file() and ".probe" not in p.parts)


def assert_nothing_stored(settings: Settings, spool: Path, files: int = 0, jobs: int = 0) -> None:
    assert len(rows(settings, File)) == files
    assert len(rows(settings, Job)) == jobs
    assert len(stored(settings)) == files
    assert not [p for p in stored(settings) if TEMPORARY_MARK in p.name]
    assert list(spool.iterdir()) == [], "a spooled upload was left behind"
    assert open_in(spool) == [], "a spooled upload was left open"


def raw_upload(client: TestClient, filename: bytes, content: bytes = CHAT):
    """A multipart upload written by hand, so that the file name goes out byte for byte."""
    body = (
        b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="' + filename + b'"\r\n'
        b"Content-Type: application/jsonl\r\n\r\n" + content + b"\r\n--b--\r\n"
    )
    return client.post("/v1/files", content=body, headers={"content-type": MULTIPART})


# --- uploads: the file name is metadata -----------------------------------------------------


@pytest.mark.both_backends
@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("../../etc/passwd", "passwd"),
        ("/etc/passwd", "passwd"),
        ("..\\..\\windows\\win.ini", "win.ini"),
        ("C:\\Users\\me\\train.jsonl", "train.jsonl"),
        ("data/../../../../tmp/x.jsonl", "x.jsonl"),
        ("..", "upload.jsonl"),
        (".", "upload.jsonl"),
        ("dir/...", "upload.jsonl"),
        ("a\x1b[2J\x07b\x7f.jsonl", "a[2Jb.jsonl"),
        ("\u202elmth.jsonl", "lmth.jsonl"),  # right-to-left override: not printable
        ("tab\tand\nnewline.jsonl", "tabandnewline.jsonl"),
        ("a%2F..%2Fb", "a%2F..%2Fb"),  # not decoded: no path in it either
        ("données-训练-🚀.jsonl", "données-训练-🚀.jsonl"),
        ("x" * 4000, "x" * 255),
    ],
    ids=lambda value: repr(value[:24]),
)
def test_a_file_name_is_metadata_and_never_a_path(client, settings, spool, tmp_path, name, shown):
    response = raw_upload(client, name.encode())  # byte for byte: httpx would escape some
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["filename"] == shown
    assert stored(settings) == [Path(settings.storage_url) / "files" / f"{body['id']}.jsonl"]
    assert not list(tmp_path.parent.rglob("passwd"))
    assert not list(tmp_path.rglob("win.ini"))
    download = client.get(f"/v1/files/{body['id']}/content")
    assert download.content == CHAT
    disposition = download.headers["content-disposition"]
    assert disposition.startswith("attachment; filename*=UTF-8''")
    assert unquote(disposition.removeprefix("attachment; filename*=UTF-8''")) == shown
    assert_nothing_stored(settings, spool, files=1)


@pytest.mark.both_backends
@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        (b"../\x00/etc/passwd", "passwd"),
        (b"\x00\x00\x00", "upload.jsonl"),
        (b"evil\x00.jsonl\x00.sh", "evil.jsonl.sh"),
        (b"\xff\xfe\x00bad-utf8.jsonl", "\xff\xfebad-utf8.jsonl"),  # read as Latin-1
    ],
    ids=repr,
)
def test_nul_bytes_and_raw_bytes_in_a_file_name(client, settings, spool, raw, shown):
    response = raw_upload(client, raw)
    assert response.status_code == 200, response.text
    assert response.json()["filename"] == shown
    assert_nothing_stored(settings, spool, files=1)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        (b"x" * 10_000, "Maximum header size exceeded"),  # the parser takes 4 KiB a line
        (b"carriage\rreturn.jsonl", "Did not find LF character at end of header"),
    ],
    ids=["10k-characters", "carriage-return"],
)
def test_a_file_name_that_breaks_the_multipart_header_is_refused(
    client, settings, spool, name, reason
):
    error = assert_error(raw_upload(client, name), 400, None, "invalid_request")
    assert error["message"].startswith("the body is not valid multipart/form-data: ")
    assert reason in error["message"]
    assert_nothing_stored(settings, spool)


# --- uploads: the content -------------------------------------------------------------------


def upload_error(client: TestClient, content: bytes) -> dict[str, Any]:
    return assert_error(upload(client, content), 400, "file", "invalid_file_format")


def test_a_line_over_max_line_bytes_is_named_and_the_rest_still_checked(client, settings, spool):
    long_line = json.dumps({"text": "x" * (LINE_LIMIT + 10)}).encode() + b"\n"
    content = CHAT + long_line + b"{broken\n" + CHAT
    error = upload_error(client, content)
    assert error["errors"] == [
        {"line": 2, "message": f"line is longer than {LINE_LIMIT} bytes"},
        {
            "line": 3,
            "message": "invalid JSON: Expecting property name enclosed in double quotes (column 2)",
        },
    ]
    assert_nothing_stored(settings, spool)


def test_a_huge_single_line_staged_on_disk_leaves_no_temporary_file(
    client, settings, spool, monkeypatch
):
    """3 MiB without a newline: over the line limit, under the upload limit, and big enough
    for the upload to be written to a staging file, and checked by a process of its own,
    while the request reads it."""
    content = b'{"text": "' + b"a" * (3 * 1024 * 1024) + b'"}'
    staged, checks = [], []
    report = uploads.DatasetCheck.report

    def look_then_report(check):
        staged.extend(p for p in stored(settings) if TEMPORARY_MARK in p.name)
        checks.append(check.process)
        return report(check)

    monkeypatch.setattr(uploads.DatasetCheck, "report", look_then_report)
    error = upload_error(client, content)
    assert staged, "the upload was not staged on disk: this test checks nothing"
    assert error["errors"] == [{"line": 1, "message": f"line is longer than {LINE_LIMIT} bytes"}]
    assert_nothing_stored(settings, spool)
    assert open_in(Path(settings.storage_url)) == [], "a staging file was left open"
    assert [process.poll() for process in checks] == [0], "the check process was left running"


@pytest.mark.parametrize(
    "line",
    [
        b"[" * 100_000,
        b"{" * 100_000,
        b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"messages": [{"role": "user", "content": ' + b'{"a": ' * 20_000 + b"1" + b"}" * 20_000,
    ],
    ids=["arrays", "objects", "in-a-field", "in-a-message"],
)
def test_deeply_nested_json_is_a_bad_line(client, settings, spool, line):
    error = upload_error(client, CHAT + line + b"\n")
    (problem,) = error["errors"]
    assert problem["line"] == 2
    assert problem["message"].startswith("invalid JSON")
    assert_nothing_stored(settings, spool)


def test_nesting_past_the_parsers_depth_gets_its_own_message(client, settings, spool):
    error = upload_error(client, b"[" * 100_000 + b"]" * 100_000 + b"\n")
    assert error["errors"] == [{"line": 1, "message": "invalid JSON: nested too deeply"}]
    assert_nothing_stored(settings, spool)


@pytest.mark.parametrize(
    ("content", "line", "message"),
    [
        (b'{"text": "a\x00b"}\n', 1, "invalid JSON: Invalid control character at (column 12)"),
        (b"\x00\n", 1, "invalid JSON: Expecting value (column 1)"),
        (CHAT + b"\x00" * 10 + b"\n" + CHAT, 2, "invalid JSON: Expecting value (column 1)"),
        (b'{"text": "a"}\x00\n', 1, "invalid JSON: Extra data (column 14)"),
        (b'{"te\x00xt": "a"}\n', 1, "invalid JSON: Invalid control character at (column 5)"),
    ],
    ids=["in-a-string", "alone", "between-lines", "after-the-object", "in-a-key"],
)
def test_nul_bytes_in_the_content(client, settings, spool, content, line, message):
    error = upload_error(client, content)
    assert error["errors"] == [{"line": line, "message": message}]
    assert_nothing_stored(settings, spool)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b'{"text": "a", "n": 1e999999}', "invalid JSON: the number 1e999999 is out of range"),
        (b'{"text": "a", "n": -1e999999}', "invalid JSON: the number -1e999999 is out of range"),
        (
            b'{"text": "a", "n": ' + b"9" * 50_000 + b"}",
            "invalid JSON: a number has more than 4300 digits",
        ),
        (
            b'{"messages": [{"role": "assistant", "content": "x", "weight": 1'
            + b"0" * 50_000
            + b"}]}",
            "invalid JSON: a number has more than 4300 digits",
        ),
        (
            b'{"messages": [{"role": "assistant", "content": "x", "weight": 1e308}]}',
            "messages[0].weight: must be 0 or 1, got 1e+308",
        ),
        (b'{"text": "a", "n": NaN}', "invalid JSON: NaN is not a JSON number"),
        (b'{"text": "a", "n": -Infinity}', "invalid JSON: -Infinity is not a JSON number"),
    ],
    ids=["1e999999", "-1e999999", "50k-digits", "50k-digit-weight", "1e308-weight", "NaN", "-inf"],
)
def test_gigantic_and_non_finite_numbers(client, settings, spool, line, message):
    error = upload_error(client, line + b"\n")
    assert error["errors"] == [{"line": 1, "message": message}]
    assert_nothing_stored(settings, spool)


@pytest.mark.parametrize(
    ("content", "line", "message"),
    [
        (b'{"text": "\xc0\xaf"}\n', 1, "not valid UTF-8 (byte 0xc0 at byte 11)"),  # overlong "/"
        (b'{"text": "\xed\xa0\x80"}\n', 1, "not valid UTF-8 (byte 0xed at byte 11)"),  # surrogate
        # past U+10FFFF
        (b'{"text": "\xf4\x90\x80\x80"}\n', 1, "not valid UTF-8 (byte 0xf4 at byte 11)"),
        (CHAT + b'{"text": "cut \xe2\x82', 2, "not valid UTF-8 (byte 0xe2 at byte 15)"),  # at EOF
        ('{"text": "utf-16"}'.encode("utf-16"), 1, "not valid UTF-8 (byte 0xff at byte 1)"),
        (b'{"text": "\\ud800"}\n', 1, "text: contains an unpaired surrogate escape \\ud800"),
    ],
    ids=[
        "overlong",
        "encoded-surrogate",
        "past-unicode",
        "truncated",
        "utf-16",
        "escaped-surrogate",
    ],
)
def test_invalid_utf8_is_named_with_its_line(client, settings, spool, content, line, message):
    error = upload_error(client, content)
    assert error["errors"] == [{"line": line, "message": message}]
    assert_nothing_stored(settings, spool)


def test_an_upload_between_the_limit_and_the_envelope_allowance_leaves_nothing(
    client, settings, spool
):
    """Over AFINA_MAX_UPLOAD_BYTES but within the multipart allowance, so the whole body is
    read (and spooled to disk) before the handler refuses it: the spool must go too."""
    content = CHAT * (UPLOAD_LIMIT // len(CHAT) + 1)
    assert UPLOAD_LIMIT < len(content) < UPLOAD_LIMIT + MULTIPART_OVERHEAD
    error = assert_error(upload(client, content), 413, "file", "file_too_large")
    assert str(UPLOAD_LIMIT) in error["message"]
    assert_nothing_stored(settings, spool)


def test_a_huge_purpose_is_not_echoed_whole(client, settings, spool):
    purpose = "p" * 1_000_000  # under the 1 MiB a form field may have
    error = assert_error(upload(client, CHAT, purpose=purpose), 400, "purpose", "invalid_purpose")
    assert f"Unsupported purpose '{'p' * 80}...': " in error["message"]
    assert len(error["message"]) < 300
    assert_nothing_stored(settings, spool)


EMPTIED = "must not be empty: it has only control characters and whitespace"


@pytest.mark.parametrize(
    ("good", "bad", "message"),
    [
        (
            json.loads(CHAT),
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": NUL},
                ]
            },
            f"messages[1].content: {EMPTIED}",
        ),
        (
            {"prompt": "2+2=", "completion": "4"},
            {"prompt": "2+2=", "completion": f"{NUL} \x1b"},
            f"completion: {EMPTIED}",
        ),
        ({"text": "ok"}, {"text": "\u3000\u00a0"}, "text: must not be empty"),
    ],
    ids=["nul-assistant", "escape-completion", "unicode-spaces"],
)
def test_content_of_only_control_characters_is_refused_naming_the_line(
    client, settings, spool, good, bad, message
):
    error = upload_error(client, jsonl(good, bad))
    assert error["errors"] == [{"line": 2, "message": message}]
    assert_nothing_stored(settings, spool)


def test_a_storage_error_while_an_upload_is_written_reaches_the_handlers_as_it_is(
    make_settings, spool, monkeypatch
):
    """The disk fills up while a large upload is written: the error is raised by the route as
    the storage raised it (a handler for OSError answers), not turned into a 400, and the
    upload leaves nothing."""
    settings = make_settings(max_upload_bytes=UPLOAD_LIMIT, max_line_bytes=LINE_LIMIT)
    stage = uploads.StagedUpload._stage
    writes = []

    class FillingUp:
        def __init__(self, out):
            self.out = out

        def writelines(self, data):
            writes.append(data)
            if len(writes) > 1:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.out.writelines(data)

        def __getattr__(self, name):
            return getattr(self.out, name)

    def stage_then_fill_up(upload):
        stage(upload)
        upload._out = FillingUp(upload._out)

    monkeypatch.setattr(uploads.StagedUpload, "_stage", stage_then_fill_up)
    app = create_app(settings)
    seen = []

    async def full_disk(_request, error: OSError):
        seen.append(error)
        return JSONResponse({"error": {"message": "full", "type": "server_error"}}, 507)

    app.add_exception_handler(OSError, full_disk)
    with TestClient(app, base_url=LOCAL) as client:
        response = upload(client, CHAT * (3 * 1024 * 1024 // len(CHAT)))
    assert response.status_code == 507, response.text
    assert [error.errno for error in seen] == [errno.ENOSPC]
    assert_nothing_stored(settings, spool)


def chunked_upload(app, chunks: list[bytes], end: dict | None = None) -> list[dict]:
    """POST a multipart upload straight to the ASGI app, a chunk at a time; `end` is what
    `receive` gives after the last chunk (a disconnect, say). Returns what the app sent."""
    head = b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n'
    pending = [head, *chunks]
    sent: list[dict] = []

    async def receive() -> dict:
        if pending:
            return {"type": "http.request", "body": pending.pop(0), "more_body": True}
        return end or {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    headers = [(b"host", b"localhost"), (b"content-type", MULTIPART.encode())]
    scope = http_scope("POST", "/v1/files", headers)
    with contextlib.suppress(Exception):  # a disconnected client gets nothing it could read
        asyncio.run(app(scope, receive, send))
    return sent


@pytest.mark.parametrize("ending", ["disconnect", "over-the-limit"])
def test_an_upload_cut_short_after_it_was_written_to_disk_leaves_nothing(
    settings, spool, monkeypatch, ending
):
    checks = []
    start = uploads.DatasetCheck.__init__

    def record(check, *args, **kwargs):
        start(check, *args, **kwargs)
        checks.append(check)

    monkeypatch.setattr(uploads.DatasetCheck, "__init__", record)
    app = create_app(settings)
    chunk = CHAT * (64 * 1024 // len(CHAT))
    count = 30 if ending == "disconnect" else (UPLOAD_LIMIT + MULTIPART_OVERHEAD) // len(chunk) + 2
    sent = chunked_upload(app, [chunk] * count)
    if ending == "over-the-limit":
        assert sent[0]["status"] == 413
    assert checks, "the upload was not written to disk: this test checks nothing"
    assert [check.process.poll() is not None for check in checks] == [True]
    assert_nothing_stored(settings, spool)
    assert open_in(Path(settings.storage_url)) == []


# --- job bodies: every field, every wrong type ----------------------------------------------

# Raw JSON, so that NaN and Infinity (which Python's parser takes) can be sent too.
STRING, NUMBER, FRACTION, TRUE, NULL = '"oops"', "7", "2.5", "true", "null"
LIST, OBJECT, HUGE = "[1]", '{"a": 1}', "1" + "0" * 30
NAN, INFINITY, MINUS_INFINITY = "NaN", "Infinity", "-Infinity"
WRONG = {
    "str": [NUMBER, TRUE, LIST, OBJECT, NULL],
    "str?": [NUMBER, TRUE, LIST, OBJECT],
    "int": [STRING, '"7"', FRACTION, TRUE, LIST, OBJECT, HUGE, NAN, INFINITY, NULL],
    "float": [STRING, '"0.1"', TRUE, LIST, OBJECT, HUGE, NAN, INFINITY, MINUS_INFINITY, NULL],
    "bool": [STRING, '"true"', NUMBER, "1", "0", LIST, OBJECT, NULL],
    "enum": [STRING, NUMBER, TRUE, LIST, OBJECT, NULL],
    "object": [STRING, NUMBER, TRUE, LIST, NULL],
    "object?": [STRING, NUMBER, TRUE, LIST],
}
WRONG["int?"] = [value for value in WRONG["int"] if value != NULL]
WRONG["float?"] = [value for value in WRONG["float"] if value != NULL]
WRONG["auto-int"] = [*WRONG["int"], '"AUTO"']
WRONG["auto-float"] = [*WRONG["float"], '"AUTO"']
WRONG["auto-bool"] = [*WRONG["bool"], '"AUTO"']
WRONG["modules"] = ['"all"', NUMBER, TRUE, OBJECT, NULL, "[]", "[1]", '["a b"]', "[null]"]
WRONG["bits"] = ['"4"', TRUE, LIST, OBJECT, "16", "4.5", NAN]
WRONG["integrations"] = [STRING, NUMBER, TRUE, OBJECT, LIST]

HYPERPARAMETERS = {"n_epochs": "auto-int", "batch_size": "auto-int"}
HYPERPARAMETERS["learning_rate_multiplier"] = "auto-float"
JOB_FIELDS = {
    "model": "str",
    "training_file": "str",
    "validation_file": "str?",
    "suffix": "str?",
    "seed": "int?",
    "metadata": "object?",
    "metadata.team": "str",
    "integrations": "integrations",
    "method": "object?",
    "method.type": "enum",
    "method.supervised": "object",
    "method.supervised.hyperparameters": "object",
    **{f"method.supervised.hyperparameters.{k}": kind for k, kind in HYPERPARAMETERS.items()},
    "method.dpo": "object",
    "method.dpo.hyperparameters": "object",
    **{f"method.dpo.hyperparameters.{k}": kind for k, kind in HYPERPARAMETERS.items()},
    "method.dpo.hyperparameters.beta": "auto-float",
    "hyperparameters": "object?",
    **{f"hyperparameters.{name}": kind for name, kind in HYPERPARAMETERS.items()},
    "lora": "object",
    "lora.r": "int",
    "lora.alpha": "float",
    "lora.dropout": "float",
    "lora.target_modules": "modules",
    "quantization": "object",
    "quantization.bits": "bits",
    "quantization.quant_type": "enum",
    "quantization.double_quant": "bool",
    "quantization.compute_dtype": "enum",
    "training": "object",
    "training.learning_rate": "float?",
    "training.max_seq_length": "int?",
    "training.packing": "bool",
    "training.gradient_accumulation_steps": "int",
    "training.warmup_ratio": "float",
    "training.lr_scheduler": "enum",
    "training.weight_decay": "float",
    "training.max_grad_norm": "float",
    "training.gradient_checkpointing": "auto-bool",
    "training.padding_free": "bool",
    "training.attention": "enum",
    "training.liger_kernels": "auto-bool",
    "training.eval_steps": "int?",
    "training.save_steps": "int?",
    "training.loss_on": "enum",
    "training.max_steps": "int?",
    "evaluation": "object",
    "evaluation.samples": "int",
    "evaluation.max_new_tokens": "int",
    "resources": "object",
    "resources.queue": "str?",
    "resources.gpus": "int",
}
PLACEHOLDER = "__WRONG_VALUE__"


def with_raw_value(body: dict[str, Any], path: str, raw: str) -> bytes:
    """`body` as JSON text with `raw` (JSON text, NaN included) at the dotted `path`."""
    body = json.loads(json.dumps(body))
    *parents, last = path.split(".")
    node = body
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = PLACEHOLDER
    return json.dumps(body).replace(json.dumps(PLACEHOLDER), raw).encode()


@pytest.fixture
def job_body(client: TestClient) -> dict[str, Any]:
    """A body that creates a job: a wrong value anywhere in it is the only thing wrong."""
    training_file = upload(client, CHAT).json()["id"]
    return {"model": BASE, "training_file": training_file}


def test_the_job_body_is_valid_as_it_is(client, settings, job_body):
    response = client.post("/v1/fine_tuning/jobs", json=job_body)
    assert response.status_code == 200, response.text
    assert len(rows(settings, Job)) == 1


def test_every_job_field_is_in_the_table() -> None:
    """A new field of the job body must get its row in JOB_FIELDS."""
    from afina.api.schemas.jobs import JobCreate

    def paths(model: Any, prefix: str = "") -> set[str]:
        found = set()
        for name, field in model.model_fields.items():
            found.add(prefix + name)
            for kind in (field.annotation, *getattr(field.annotation, "__args__", ())):
                if isinstance(kind, type) and hasattr(kind, "model_fields"):
                    found |= paths(kind, f"{prefix}{name}.")
        return found

    assert paths(JobCreate) | {"metadata.team"} == set(JOB_FIELDS)


@pytest.mark.parametrize(("path", "kind"), JOB_FIELDS.items(), ids=list(JOB_FIELDS))
def test_a_wrong_type_anywhere_in_a_job_body_is_named(
    client, settings, spool, job_body, path, kind
):
    for raw in WRONG[kind]:
        content = with_raw_value(job_body, path, raw)
        response = client.post(
            "/v1/fine_tuning/jobs", content=content, headers={"content-type": "application/json"}
        )
        assert response.status_code == 400, (raw, response.text)
        error = response.json()["error"]
        param = error["param"] or ""
        assert param == path or param.startswith(f"{path}["), (raw, error)  # or its item
        assert error["code"] == "invalid_request", (raw, error)
        assert error["message"].startswith(f"{param}: "), (raw, error)
        assert error["type"] == "invalid_request_error"
    assert_nothing_stored(settings, spool, files=1)
    assert rows(settings, JobEvent) == []


def test_an_integral_number_is_an_integer(client, job_body):
    """JSON has one number type, and the schema's `integer` takes 2.0: so does the API."""
    job_body |= {"seed": 7.0, "hyperparameters": {"n_epochs": 2.0}, "lora": {"r": 8.0}}
    job = client.post("/v1/fine_tuning/jobs", json=job_body).json()
    stored_as = [job["seed"], job["hyperparameters"]["n_epochs"], job["config"]["lora"]["r"]]
    assert stored_as == [7, 2, 8]
    assert all(type(value) is int for value in stored_as)  # 7, not 7.0


@pytest.mark.parametrize(
    "path",
    [
        "trust_remote_code",
        "lora.trust_remote_code",
        "quantization.trust_remote_code",
        "training.trust_remote_code",
        "method.supervised.trust_remote_code",
        "method.supervised.hyperparameters.trust_remote_code",
        "hyperparameters.trust_remote_code",
    ],
)
def test_trust_remote_code_is_never_taken_from_a_request(make_settings, spool, path):
    """Not even where the operator has allowed remote code: the operator decides alone."""
    settings = make_settings(allowed_models=ALLOWED, trust_remote_code=True)
    with TestClient(create_app(settings), base_url=LOCAL) as client:
        body = {"model": BASE, "training_file": upload(client, CHAT).json()["id"]}
        for value in ("true", '"true"', "1", "false", "null"):
            response = client.post(
                "/v1/fine_tuning/jobs",
                content=with_raw_value(body, path, value),
                headers={"content-type": "application/json"},
            )
            error = assert_error(response, 400, path, "invalid_request")
            assert "AFINA_TRUST_REMOTE_CODE" in error["message"]
            assert "only the operator" in error["message"]
    assert_nothing_stored(settings, spool, files=1)


def test_trust_remote_code_inside_a_list_is_named_too(client, settings, spool, job_body):
    job_body["integrations"] = [{"type": "wandb", "trust_remote_code": True}]
    error = assert_error(
        client.post("/v1/fine_tuning/jobs", json=job_body),
        400,
        "integrations[0].trust_remote_code",
    )
    assert "AFINA_TRUST_REMOTE_CODE" in error["message"]
    assert_nothing_stored(settings, spool, files=1)


def test_trust_remote_code_as_a_metadata_label_is_only_a_label(client, settings, job_body):
    job_body["metadata"] = {"trust_remote_code": "true"}
    job = client.post("/v1/fine_tuning/jobs", json=job_body).json()
    assert job["metadata"] == {"trust_remote_code": "true"}
    assert "trust_remote_code" not in json.dumps(job["config"])


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("\u043erg/base-model", "neither a Hugging Face id"),  # a Cyrillic o
        ("org/b\u0430se-model", "neither a Hugging Face id"),  # a Cyrillic a, which \w takes
        ("https://huggingface.co/org/base-model", "neither a Hugging Face id"),
        ("file:///models/base", "neither a Hugging Face id"),
        ("~/models/base", "neither a Hugging Face id"),
        ("org/*", "neither a Hugging Face id"),
        ("org/base-model\n", "control characters"),
        ("org/base-model\u200b", "control characters"),  # zero-width space
        ("other/base-model", "not allowed"),
        ("/models/../etc/passwd", "not allowed"),
        ("//models/base", "is not a model directory"),  # read as /models/base
        ("/models/nothing-here", "is not a model directory"),
    ],
    ids=repr,
)
def test_models_outside_the_allow_list_are_refused_at_create(
    client, settings, spool, job_body, model, message
):
    job_body["model"] = model
    error = assert_error(
        client.post("/v1/fine_tuning/jobs", json=job_body), 400, "model", "model_not_available"
    )
    assert message in error["message"]
    assert_nothing_stored(settings, spool, files=1)


# --- generation bodies ------------------------------------------------------------------------


@pytest.fixture
def fine_tuned(settings: Settings) -> str:
    """A model that resolves (a succeeded job with its adapter on disk): hostile bodies that
    name it must still be refused before the engine."""
    job = job_row(
        project="default",
        status=JobStatus.SUCCEEDED,
        model=BASE,
        training_file_id=new_id("file"),
        finished_at=datetime.now(UTC),
    )
    job.fine_tuned_model = job.fine_tuned_model_name()
    add_rows(settings, job)
    directory = Path(settings.storage_url) / adapter_key(job.id)
    directory.mkdir(parents=True)
    (directory / "adapter_config.json").write_text("{}")
    return job.fine_tuned_model


MESSAGES = [{"role": "user", "content": "hi"}]
ROUTES = {
    "/v1/chat/completions": {"messages": MESSAGES, "max_tokens": CEILING + 1},
    "/v1/completions": {"prompt": "hi", "max_tokens": CEILING + 1},
    "/generate": {"prompt": "hi", "max_new_tokens": CEILING + 1},
}
SAMPLING = {
    "temperature": "float?",
    "top_p": "float?",
    "seed": "int?",
    "stream": "bool?",
    "ignore_eos": "bool",
    "stop": "stop",
}
WRONG["bool?"] = [value for value in WRONG["bool"] if value != NULL]
WRONG["stop"] = [NUMBER, TRUE, OBJECT, '""', "[1]", '[""]', '["a", "b", "c", "d", "e"]', "[null]"]
WRONG["messages"] = ['""', NUMBER, TRUE, OBJECT, NULL, "[]", "[1]", '["hi"]']
WRONG["prompt"] = [NUMBER, TRUE, OBJECT, NULL, "[]", '["a", "b"]', "[1]", "[[]]"]
WRONG["max"] = ["0", "-1", STRING, FRACTION, TRUE, LIST, OBJECT, NAN, INFINITY]
GENERATION_FIELDS = {
    "/v1/chat/completions": {
        **SAMPLING,
        "model": "str",
        "messages": "messages",
        "messages.0": "object",
        "messages.0.role": "enum",
        "messages.0.content": "str",
        "messages.0.name": "str?",
        "max_tokens": "max",
        "max_completion_tokens": "max",
        "n": "bits",
        "user": "str?",
        "stream_options": "object?",
        "stream_options.include_usage": "bool",
    },
    "/v1/completions": {**SAMPLING, "model": "str", "prompt": "prompt", "max_tokens": "max"},
    "/generate": {
        **SAMPLING,
        "model": "str?",
        "prompt": "str?",
        "max_new_tokens": "max",
    },
}
CASES = [
    (route, path, kind)
    for route, fields in GENERATION_FIELDS.items()
    for path, kind in fields.items()
]


def set_path(body: dict[str, Any], path: str, raw: str) -> bytes:
    """Like `with_raw_value`, with numeric parts as list indexes."""
    body = json.loads(json.dumps(body))
    *parents, last = path.split(".")
    node: Any = body
    for key in parents:
        node = node[int(key)] if key.isdigit() else node.setdefault(key, {})
    node[int(last) if last.isdigit() else last] = PLACEHOLDER
    return json.dumps(body).replace(json.dumps(PLACEHOLDER), raw).encode()


@pytest.mark.parametrize(("route", "path", "kind"), CASES, ids=[f"{r}:{p}" for r, p, _ in CASES])
def test_a_wrong_type_in_a_generation_body_is_named(client, fine_tuned, route, path, kind):
    body = {"model": fine_tuned, **ROUTES[route]}
    for raw in WRONG[kind]:
        response = client.post(
            route, content=set_path(body, path, raw), headers={"content-type": "application/json"}
        )
        assert response.status_code == 400, (raw, response.text)
        error = response.json()["error"]
        param = path.replace(".0", "[0]")
        assert (error["param"] or "").startswith(param), (raw, error)
        assert error["code"] == "invalid_request", (raw, error)


MAX = "__max__"  # the route's own token limit: max_tokens, or max_new_tokens for /generate


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(
    ("change", "param", "code"),
    [
        ({MAX: 10**30}, MAX, "invalid_value"),
        ({MAX: 1e300}, MAX, "invalid_value"),
        ({"seed": 2**64}, "seed", "invalid_request"),
        ({"seed": -(2**63) - 1}, "seed", "invalid_request"),
        ({"seed": 1e300}, "seed", "invalid_request"),
        ({"temperature": 1e308}, "temperature", "invalid_request"),
        ({"top_p": 5e-324, "temperature": -5e-324}, "temperature", "invalid_request"),
    ],
    ids=["max", "max-float", "seed-over", "seed-under", "seed-float", "temperature", "denormal"],
)
def test_huge_numbers_in_a_generation_body_never_reach_the_engine(
    client, fine_tuned, route, change, param, code
):
    body = {"model": fine_tuned, **ROUTES[route]}
    max_param = "max_new_tokens" if route == "/generate" else "max_tokens"
    body |= {max_param if key == MAX else key: value for key, value in change.items()}
    error = assert_error(client.post(route, json=body), 400, max_param if param == MAX else param)
    assert error["code"] == code


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b'{"model": ' + b"[" * 10_000 + b"]" * 10_000 + b"}", "nested too deeply"),
        (b'{"seed": ' + b"9" * 5000 + b"}", "a number has more than 4300 digits"),
        (b'{"model": "a\x00b"}', "Invalid control character"),
        (b'{"model": "x"' + b" " * 10 + b"\x00}", "Expecting"),
        (b'\xff\xfe{"model": "x"}', "the body is not valid JSON"),
    ],
    ids=["deep", "digits", "nul-in-string", "nul-outside", "not-utf8"],
)
def test_an_unparsable_generation_body_says_why(client, route, raw, message):
    response = client.post(route, content=raw, headers={"content-type": "application/json"})
    error = assert_error(response, 400, None, "invalid_request")
    assert error["message"].startswith("the body is not valid JSON")
    assert message in error["message"]


@pytest.mark.parametrize("route", ROUTES)
def test_escaped_nul_and_deep_content_are_refused_before_the_engine(client, fine_tuned, route):
    body = {"model": fine_tuned, **ROUTES[route]}
    # An escaped NUL is a character like any other: the request is refused for its limit.
    text = "hi\u0000there"
    body |= {"messages": [{"role": "user", "content": text}]} if "messages" in body else {}
    body |= {"prompt": text} if "prompt" in body else {}
    max_param = next(name for name in ("max_tokens", "max_new_tokens") if name in body)
    assert_error(client.post(route, json=body), 400, max_param, "invalid_value")
    nested: Any = "x"
    for _ in range(500):  # within the parser's depth, far beyond the schema's
        nested = [nested]
    body = {"model": fine_tuned, **ROUTES[route], "stop": nested}
    response = client.post(route, json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"].startswith("stop")


# --- bodies over their limit ------------------------------------------------------------------


@pytest.mark.parametrize("route", [*ROUTES, "/v1/fine_tuning/jobs"])
def test_a_json_body_over_the_json_limit_is_413_on_every_route(client, fine_tuned, route):
    big = {"model": fine_tuned, **ROUTES.get(route, {}), "user": "x" * JSON_LIMIT}
    declared = client.post(route, json=big)
    assert_error(declared, 413, None, "request_too_large")
    chunks = iter([json.dumps(big).encode()])  # no Content-Length: counted as it arrives
    streamed = client.post(route, content=chunks, headers={"content-type": "application/json"})
    assert_error(streamed, 413, None, "request_too_large")


@pytest.mark.parametrize("route", [*ROUTES, "/v1/fine_tuning/jobs"])
def test_a_multipart_label_does_not_buy_a_json_route_the_upload_limit(client, settings, route):
    """Only the upload route takes bodies up to AFINA_MAX_UPLOAD_BYTES: elsewhere a body
    labelled multipart is held to the JSON limit, declared or chunked."""
    body = b"--b\r\n" + b"x" * (2 * JSON_LIMIT)
    headers = {"content-type": MULTIPART}
    for content in (body, iter([body])):
        error = assert_error(client.post(route, content=content, headers=headers), 413, None)
        assert "AFINA_MAX_JSON_BYTES" in error["message"]
    assert rows(settings, Job) == []


def test_a_json_body_to_the_upload_route_gets_the_json_limit(client, settings, spool):
    response = client.post(
        "/v1/files",
        content=b"{" + b" " * (2 * JSON_LIMIT) + b"}",
        headers={"content-type": "application/json"},
    )
    assert_error(response, 413, None, "request_too_large")
    assert_nothing_stored(settings, spool)
