"""The client commands of `afina` (files, jobs, watch) against a live server with no worker:
what they send, what they print, their exit codes, and what ends up in the database."""

import json
import os
import pty
import select
import subprocess
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import update
from typer.testing import CliRunner

from afina.api.app import create_app
from afina.cli.files import UPLOAD_CHUNK
from afina.cli.main import app as cli
from afina.cli.watch import sparkline
from afina.models import File, Job, JobCheckpoint, JobEvent, JobMetric, JobStatus
from afina.models.session import make_engine, make_session_factory
from tests.support import (
    AFINA,
    CHAT,
    add_rows,
    config_only_model,
    free_port,
    job_row,
    jsonl,
    rows,
    serve_in_thread,
)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return config_only_model(tmp_path)


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_bytes(CHAT)
    return path


@pytest.fixture
def afina(live_server: str):
    """`afina ARGS --base-url <the live server>`, run in this process (usage errors on one
    line of a wide terminal)."""
    runner = CliRunner(env={"COLUMNS": "200"})

    def run(*args: str, **invoke):
        return runner.invoke(cli, [*args, "--base-url", live_server], **invoke)

    return run


def ok(result) -> str:
    assert result.exit_code == 0, result.output
    return result.stdout


def refused(result, status: int, text: str) -> None:
    assert result.exit_code == 1, result.output
    assert f"afina: {status}: " in result.stderr
    assert text in result.stderr
    assert "Traceback" not in result.output


def test_files_upload_list_show_and_delete(afina, dataset, settings):
    out = ok(afina("files", "upload", str(dataset)))
    (stored,) = rows(settings, File)
    assert out.startswith(f"uploaded {stored.id}: train.jsonl")
    assert "chat format, 10 examples, about" in out
    assert f"{stored.estimated_tokens:,} tokens" in out

    listed = ok(afina("files", "list"))
    assert stored.id in listed
    assert "train.jsonl" in listed
    assert "fine-tune" in listed
    assert [f["id"] for f in json.loads(ok(afina("files", "list", "--json")))["data"]] == [
        stored.id
    ]
    shown = ok(afina("files", "show", stored.id))
    assert "examples" in shown
    assert "chat" in shown
    as_json = json.loads(ok(afina("files", "show", stored.id, "--json")))
    assert as_json["validation"] == {
        "format": "chat",
        "num_examples": 10,
        "estimated_tokens": stored.estimated_tokens,
    }

    assert ok(afina("files", "delete", stored.id)) == f"deleted {stored.id}\n"
    assert rows(settings, File) == []
    refused(afina("files", "show", stored.id), 404, stored.id)
    assert ok(afina("files", "list")) == "No files.\n"


def test_an_upload_with_bad_lines_prints_the_api_s_message_naming_them(afina, tmp_path, settings):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(CHAT + b"{not json\n" + jsonl({"foo": 1}))
    refused(afina("files", "upload", str(bad)), 400, "2 bad lines: line 11:")
    assert "line 12:" in afina("files", "upload", str(bad)).stderr
    assert rows(settings, File) == []


def test_a_large_upload_streams_in_chunks_and_arrives_whole(afina, tmp_path, settings):
    line = jsonl({"prompt": "x" * 500, "completion": "y" * 500})
    count = 3 * UPLOAD_CHUNK // len(line)
    big = tmp_path / 'big "data".jsonl'
    big.write_bytes(line * count)
    out = ok(afina("files", "upload", str(big)))
    assert f"{count} examples" in out
    (stored,) = rows(settings, File)
    assert stored.bytes == big.stat().st_size
    assert stored.filename == "big %22data%22.jsonl"
    content = Path(settings.data_dir / "artifacts" / "files" / f"{stored.id}.jsonl")
    assert content.read_bytes() == big.read_bytes()


def test_jobs_create_uploads_local_files_and_builds_the_body(afina, dataset, model_dir, settings):
    result = afina(
        "jobs",
        "create",
        "--model",
        str(model_dir),
        "--training-file",
        str(dataset),
        "--validation-file",
        str(dataset),
        "--method",
        "sft",
        "--epochs",
        "2",
        "--batch-size",
        "5",
        "--lr",
        "0.001",
        "--suffix",
        "mine",
        "--set",
        "training.max_seq_length=256",
        "--set",
        "lora.r=8",
        "--set",
        "metadata.team=search",
        "--set",
        "metadata.note=007",
        "--json",
    )
    job = json.loads(ok(result))
    assert result.stderr.count("uploaded file-") == 2
    files = {row.id for row in rows(settings, File)}
    assert len(files) == 2
    assert {job["training_file"], job["validation_file"]} == files
    assert job["status"] == "queued"
    assert job["suffix"] == "mine"
    assert job["method"]["type"] == "supervised"
    hyperparameters = job["method"]["supervised"]["hyperparameters"]
    assert (hyperparameters["n_epochs"], hyperparameters["batch_size"]) == (2, 5)
    assert job["config"]["training"]["learning_rate"] == 0.001
    assert job["config"]["training"]["max_seq_length"] == 256
    assert job["config"]["lora"]["r"] == 8
    assert job["metadata"] == {"team": "search", "note": "007"}  # not JSON: kept as text
    (stored,) = rows(settings, Job)
    assert stored.id == job["id"]
    assert stored.user_metadata["team"] == "search"


def test_jobs_create_takes_a_file_id_and_says_what_the_api_refuses(
    afina, dataset, model_dir, settings
):
    file_id = json.loads(ok(afina("files", "upload", str(dataset), "--json")))["id"]
    out = ok(afina("jobs", "create", "--model", str(model_dir), "--training-file", file_id))
    (stored,) = rows(settings, Job)
    assert out == (
        f"created {stored.id} (queued) on {model_dir}\nwatch it: afina jobs watch {stored.id}\n"
    )
    assert stored.training_file_id == file_id

    dpo = afina(
        "jobs", "create", "--model", str(model_dir), "--training-file", file_id, "--method", "dpo"
    )
    refused(dpo, 400, "method 'dpo' trains on preference data")
    # A JSON value that is not one of the body's types: the API names the field.
    wrong = afina(
        "jobs",
        "create",
        "--model",
        str(model_dir),
        "--training-file",
        file_id,
        "--set",
        "lora.r=many",
    )
    refused(wrong, 400, "lora.r")
    assert len(rows(settings, Job)) == 1

    missing = afina("jobs", "create", "--model", "m", "--training-file", "no/such.jsonl")
    assert missing.exit_code == 2
    assert "neither a file here nor a file id" in missing.output
    bad_set = afina(
        "jobs", "create", "--model", "m", "--training-file", str(dataset), "--set", "no-equals"
    )
    assert bad_set.exit_code == 2
    assert "is not KEY.PATH=VALUE" in bad_set.output
    assert len(rows(settings, File)) == 1  # refused before anything was uploaded


def test_jobs_list_show_events_checkpoints_pause_resume_and_cancel(
    afina, dataset, model_dir, settings
):
    created = afina(
        "jobs", "create", "--model", str(model_dir), "--training-file", str(dataset), "--json"
    )
    job_id = json.loads(ok(created))["id"]

    listed = ok(afina("jobs", "list"))
    assert job_id in listed
    assert "queued" in listed
    assert "0/?" in listed
    assert [j["id"] for j in json.loads(ok(afina("jobs", "list", "--json")))["data"]] == [job_id]
    shown = ok(afina("jobs", "show", job_id))
    assert "queued" in shown
    assert str(model_dir) in shown
    assert "n_epochs 3" in shown
    assert json.loads(ok(afina("jobs", "show", job_id, "--json")))["id"] == job_id
    events = ok(afina("jobs", "events", job_id))
    assert "Job queued" in events
    assert "Validated training file" in events
    messages = [
        e["message"] for e in json.loads(ok(afina("jobs", "events", job_id, "--json")))["data"]
    ]
    assert messages[0] == "Job queued"  # newest first
    assert ok(afina("jobs", "checkpoints", job_id)) == "No checkpoints.\n"

    assert ok(afina("jobs", "pause", job_id)) == f"{job_id} is paused\n"
    refused(afina("jobs", "pause", job_id), 409, "is already paused")
    assert ok(afina("jobs", "resume", job_id)) == f"{job_id} is queued\n"
    assert ok(afina("jobs", "cancel", job_id)) == f"{job_id} is cancelled\n"
    assert rows(settings, Job)[0].status == JobStatus.CANCELLED
    refused(afina("jobs", "cancel", job_id), 409, "has already cancelled")
    refused(afina("jobs", "show", "ftjob-nope"), 404, "ftjob-nope")


def test_jobs_checkpoints_lists_each_step_s_model(afina, settings):
    job = job_row(project="default", status=JobStatus.RUNNING)
    checkpoint = JobCheckpoint(id="ftckpt-1", job_id=job.id, step=5, metrics={"train_loss": 1.25})
    add_rows(settings, job, checkpoint)
    out = ok(afina("jobs", "checkpoints", job.id))
    assert f"{job.id}:ckpt-step-5" in out
    assert "train_loss 1.25" in out
    page = json.loads(ok(afina("jobs", "checkpoints", job.id, "--json")))
    assert page["data"][0]["step_number"] == 5


def test_an_unreachable_server_is_one_line_and_exit_1():
    url = f"http://127.0.0.1:{free_port()}"
    result = CliRunner().invoke(cli, ["jobs", "list", "--base-url", url])
    assert result.exit_code == 1
    assert result.stderr.startswith(f"afina: cannot talk to the afina server at {url}: ")
    assert result.stderr.count("\n") == 1


def test_the_api_key_comes_from_the_option_or_the_environment(make_settings):
    settings = make_settings(api_keys=["proj:secret-key"])
    with serve_in_thread(create_app(settings)) as url:
        runner = CliRunner()
        missing = runner.invoke(cli, ["files", "list", "--base-url", url])
        refused(missing, 401, "Missing API key")
        given = runner.invoke(cli, ["files", "list", "--base-url", url, "--api-key", "secret-key"])
        assert ok(given) == "No files.\n"
        env = {"AFINA_BASE_URL": url, "AFINA_API_KEY": "secret-key"}
        assert ok(runner.invoke(cli, ["jobs", "list"], env=env)) == "No jobs.\n"


# jobs watch


def _at(seconds: float) -> datetime:
    """A moment of the run, `seconds` after its start a minute ago."""
    return datetime.now(UTC) - timedelta(seconds=60 - seconds)


def running_job(settings) -> Job:
    """A running job half way, with two metric points and an event."""
    job = job_row(
        project="default",
        status=JobStatus.RUNNING,
        total_steps=10,
        steps_done=4,
        epoch=0.4,
        estimated_finish=datetime.now(UTC) + timedelta(minutes=5),
    )
    add_rows(
        settings,
        job,
        JobEvent(
            id="ftevent-1", job_id=job.id, level="info", message="Job started", created_at=_at(1)
        ),
        JobMetric(job_id=job.id, step=2, epoch=0.2, loss=2.5, tokens_per_second=900.0, at=_at(2)),
        JobMetric(
            job_id=job.id,
            step=4,
            epoch=0.4,
            loss=1.5,
            eval_loss=1.75,
            tokens_per_second=950.0,
            at=_at(4),
        ),
    )
    return job


def later(settings, job_id: str, *changes: dict, rows_after=(), every: float = 1.5):
    """Change the job's columns, one change each `every` seconds (the new rows with the
    first), in a thread: what a worker would write while `jobs watch` polls."""

    def change() -> None:
        engine = make_engine(settings.database_url)
        added = list(rows_after)
        for values in changes:
            time.sleep(every)
            with make_session_factory(engine).begin() as session:
                session.add_all(added)
                session.execute(update(Job).where(Job.id == job_id).values(**values))
            added = []
        engine.dispose()

    thread = threading.Thread(target=change)
    thread.start()
    return thread


def test_watch_piped_prints_plain_lines_and_exits_0_when_the_job_succeeds(afina, settings):
    job = running_job(settings)
    thread = later(
        settings,
        job.id,
        {"steps_done": 10, "status": JobStatus.SUCCEEDED, "fine_tuned_model": "ft:x:default::1"},
        rows_after=[
            JobMetric(job_id=job.id, step=6, epoch=0.6, loss=0.5, at=_at(60)),
            JobEvent(id="ftevent-late", job_id=job.id, level="info", message="Saved step 6"),
        ],
    )
    result = afina("jobs", "watch", job.id)
    thread.join()
    out = ok(result)
    assert "\x1b" not in result.output
    lines = out.splitlines()
    assert lines[0].endswith("Job started")
    assert "step 2/10  epoch 0.2  loss 2.5  tokens_per_second 900" in lines
    assert "step 4/10  epoch 0.4  loss 1.5  eval_loss 1.75  tokens_per_second 950" in lines
    assert lines.index("status running") < lines.index("step 6/10  epoch 0.6  loss 0.5")
    assert lines[-2:] == ["status succeeded", f"{job.id} succeeded: ft:x:default::1"]
    assert sum(line.endswith("Saved step 6") for line in lines) == 1  # each event once
    assert sum(line.startswith("step 4/10") for line in lines) == 1


def test_watch_exits_1_with_the_error_when_the_job_fails(afina, settings):
    job = running_job(settings)
    error = {"code": "out_of_memory", "message": "CUDA out of memory at step 5"}
    thread = later(settings, job.id, {"status": JobStatus.FAILED, "error": error}, every=0.5)
    result = afina("jobs", "watch", job.id)
    thread.join()
    assert result.exit_code == 1, result.output
    assert "status failed" in result.stdout
    assert result.stderr == f"afina: {job.id} failed: CUDA out of memory at step 5\n"


def test_watch_goes_on_through_a_pause_and_exits_1_when_cancelled(afina, settings):
    job = running_job(settings)
    thread = later(settings, job.id, {"status": JobStatus.PAUSED}, {"status": JobStatus.CANCELLED})
    result = afina("jobs", "watch", job.id)
    thread.join()
    assert result.exit_code == 1, result.output
    lines = result.stdout.splitlines()
    assert lines.index("status paused") < lines.index("status cancelled")
    assert result.stderr == f"afina: {job.id} cancelled\n"


def test_watch_of_an_unknown_job_says_so(afina):
    refused(afina("jobs", "watch", "ftjob-missing"), 404, "ftjob-missing")


def on_a_terminal(*args: str) -> tuple[int, str]:
    """`afina ARGS` run with a pseudo-terminal as its terminal: its exit code, and what it
    wrote there."""
    master, slave = pty.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120", "LINES": "40"}
    process = subprocess.Popen([AFINA, *args], stdin=slave, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            if select.select([master], [], [], 1)[0]:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # the terminal's other end closed: the process ended
                    break
                if not chunk:
                    break
                seen += chunk
        return process.wait(timeout=30), seen.decode()
    finally:
        os.close(master)
        if process.poll() is None:
            process.kill()


def test_watch_on_a_terminal_draws_the_live_view(live_server, settings):
    job = running_job(settings)
    thread = later(settings, job.id, {"steps_done": 10, "status": JobStatus.SUCCEEDED}, every=2.5)
    code, screen = on_a_terminal("jobs", "watch", job.id, "--base-url", live_server)
    thread.join()
    assert code == 0, screen
    assert "\x1b[" in screen  # drawn in place, not as plain lines
    assert "4/10 steps" in screen
    assert "epoch 0.40" in screen
    assert "ETA " in screen
    assert "tokens/s 950   loss 1.5   eval_loss 1.75" in screen
    assert f"loss {sparkline([2.5, 1.5])}  2.5 .. 1.5" in screen
    assert "Job started" in screen
    assert "10/10 steps" in screen
    assert f"{job.id} succeeded" in screen


def test_upload_on_a_terminal_shows_a_progress_bar(live_server, tmp_path, settings):
    big = tmp_path / "big.jsonl"
    big.write_bytes(jsonl({"prompt": "x" * 500, "completion": "y" * 500}) * 4000)
    code, screen = on_a_terminal("files", "upload", str(big), "--base-url", live_server)
    assert code == 0, screen
    assert "uploading big.jsonl" in screen
    assert "4.1/4.1 MB" in screen
    (stored,) = rows(settings, File)
    assert f"uploaded {stored.id}: big.jsonl, 4.1 MB; prompt-completion format" in screen


def test_jobs_create_watch_follows_the_new_job(afina, dataset, model_dir, settings):
    def fail_the_job() -> None:
        engine = make_engine(settings.database_url)
        while not (job_ids := [job.id for job in rows(settings, Job)]):
            time.sleep(0.1)
        with make_session_factory(engine).begin() as session:
            error = {"code": "invalid_training_example", "message": "line 3 is too long"}
            session.execute(
                update(Job).where(Job.id == job_ids[0]).values(status="failed", error=error)
            )
        engine.dispose()

    thread = threading.Thread(target=fail_the_job)
    thread.start()
    result = afina(
        "jobs", "create", "--model", str(model_dir), "--training-file", str(dataset), "--watch"
    )
    thread.join()
    assert result.exit_code == 1, result.output
    (job,) = rows(settings, Job)
    assert result.stdout.startswith(f"created {job.id} (queued)")
    assert "Job queued" in result.stdout
    assert "status failed" in result.stdout
    assert result.stderr.endswith(f"afina: {job.id} failed: line 3 is too long\n")


def test_sparkline_scales_the_series_into_block_characters():
    assert sparkline([3, 2, 1]) == "█▅▁"
    assert sparkline([1.0, 1.0]) == "▁▁"
    assert sparkline([]) == ""
    assert sparkline(list(range(100)), width=10) == "▁▂▃▃▄▅▆▆▇█"
