"""A full disk, for real: the embedded stack's data dir (SQLite database, SQLite broker,
artifacts) on a small tmpfs of the test's own, filled to its last byte.

- An upload answers 507 and stores nothing, whichever write meets the full disk.
- Deleting a file and cancelling a job work on it, even once SQLite itself can take no more
  writes (its write-ahead log has no room left), and free their bytes; without the space
  kept aside for that, the same delete is a 507 that changes nothing.
- /readyz answers 503 naming storage when the disk is nearly full, and when it is full.
- A worker polling the SQLite broker on a full disk takes no message, and loses none: it
  takes it once there is room, with no reconnection that spends its connections.
- A running job whose writes meet a full disk waits for space, then goes on; it fails with
  `disk_full` only when the disk stays full, and stops if it is cancelled meanwhile.
"""

import os
import secrets
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from afina.api.app import create_app
from afina.core.disk import MiB, SpaceReserve
from afina.core.settings import Settings
from afina.core.storage import ArtifactStorage, file_key, resume_key
from afina.jobs.queue import TRAIN_QUEUE, TRAIN_TASK
from afina.models import File, Job, JobEvent, JobStatus
from afina.models.schema import upgrade_database
from afina.models.session import make_engine, make_session_factory
from afina.worker import broker, job_runner
from afina.worker.celery_app import create_celery
from afina.worker.job_runner import WorkerContext, run_job
from afina.worker.run_recorder import JobRecorder
from afina.worker.training.run import TrainingOutcome
from tests.support import (
    JOB_CONFIG,
    LOCAL,
    add_rows,
    assert_error,
    exhaust_sqlite,
    fill_disk,
    free_space,
    job_row,
    jsonl,
    rows,
    small_disk,
    upload,
)

RESERVE = 1 * MiB
MIN_FREE = 4 * MiB
CHAT = jsonl(
    *(
        {"messages": [{"role": "user", "content": f"{n}?"}, {"role": "assistant", "content": "!"}]}
        for n in range(4)
    )
)


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    with small_disk(tmp_path / "disk", "16m") as mounted:
        yield mounted


def settings_on(disk: Path, **overrides: object) -> Settings:
    """The embedded default with everything on `disk`: a migrated SQLite database, the SQLite
    broker, the artifacts."""
    fields = {"min_free_bytes": MIN_FREE, "disk_reserve_bytes": RESERVE, **overrides}
    settings = Settings(_env_file=None, data_dir=disk, api_keys=[], **fields)
    upgrade_database(settings.database_url)
    return settings


@pytest.fixture
def settings(disk: Path) -> Settings:
    return settings_on(disk)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings), base_url=LOCAL) as test_client:
        yield test_client


def stored_files(settings: Settings) -> list[str]:
    """Every name under the artifact store's files/, whole or being written."""
    files = Path(settings.storage_url) / "files"
    return sorted(path.name for path in files.iterdir()) if files.exists() else []


def queued_job(settings: Settings, training_file: str) -> str:
    """A job as the API stores it, queued (no worker takes it here)."""
    job = job_row(project="default", training_file_id=training_file)
    add_rows(settings, job)
    return job.id


def test_an_upload_on_a_full_disk_is_507_and_stores_nothing(client, settings, disk):
    fill_disk(disk)

    response = upload(client, CHAT)

    error = assert_error(response, 507, None, "insufficient_storage")
    assert error["type"] == "server_error"
    assert "disk is full" in error["message"]
    assert rows(settings, File) == []
    assert stored_files(settings) == []  # not even the half-written content


def test_an_upload_whose_row_does_not_fit_is_507_and_leaves_no_content(client, settings, disk):
    """The content fits in the last page left; the database, out of room, refuses the row."""
    filler = fill_disk(disk)
    exhaust_sqlite(settings.database_url)
    os.truncate(filler, filler.stat().st_size - 4096)

    response = upload(client, CHAT)

    assert_error(response, 507, None, "insufficient_storage")
    assert rows(settings, File) == []
    assert stored_files(settings) == []


def test_an_upload_that_cannot_be_spooled_is_507(client, settings, disk, monkeypatch):
    """The form parser spools an upload over 1 MiB to a temporary file; its disk is full."""
    monkeypatch.setattr(tempfile, "tempdir", str(disk))
    fill_disk(disk)

    response = upload(client, jsonl(*[{"text": "x" * 1000}] * 1500))

    assert_error(response, 507, None, "insufficient_storage")
    assert rows(settings, File) == []


def test_deleting_and_cancelling_work_on_a_full_disk_and_free_space(client, settings, disk):
    big = client.post(
        "/v1/files",
        data={"purpose": "fine-tune"},
        files={"file": ("big.jsonl", jsonl(*[{"text": "x" * 1000}] * 2000))},
    ).json()
    small = upload(client, CHAT).json()
    job_id = queued_job(settings, small["id"])
    kept_state = Path(settings.storage_url) / resume_key(job_id, 10)
    kept_state.mkdir(parents=True)
    (kept_state / "optimizer.pt").write_bytes(b"\0" * 512 * 1024)
    assert (disk / SpaceReserve.NAME).stat().st_size == RESERVE
    fill_disk(disk)
    exhaust_sqlite(settings.database_url)  # not even a delete fits in its log now

    deleted = client.delete(f"/v1/files/{big['id']}")
    assert deleted.status_code == 200, deleted.text
    assert deleted.json() == {"id": big["id"], "object": "file", "deleted": True}
    assert free_space(disk) >= big["bytes"]  # its bytes are free again
    cancelled = client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "cancelled"

    assert [row.id for row in rows(settings, File)] == [small["id"]]
    assert stored_files(settings) == [Path(file_key(small["id"])).name]
    assert not kept_state.parent.exists()  # the cancelled job's state to resume from
    (job,) = rows(settings, Job)
    assert job.status == JobStatus.CANCELLED
    assert [event.message for event in rows(settings, JobEvent)] == ["Job cancelled"]


def test_without_a_reserve_a_delete_on_a_full_disk_is_507_and_changes_nothing(disk):
    """What the reserve is for: SQLite needs room to delete a row."""
    settings = settings_on(disk, disk_reserve_bytes=0)
    with TestClient(create_app(settings), base_url=LOCAL) as client:
        created = upload(client, CHAT).json()
        fill_disk(disk)
        exhaust_sqlite(settings.database_url)

        assert_error(client.delete(f"/v1/files/{created['id']}"), 507, None)

        assert [row.id for row in rows(settings, File)] == [created["id"]]
        assert client.get(f"/v1/files/{created['id']}/content").content == CHAT


def test_the_reserve_is_made_again_once_the_disk_has_room(client, settings, disk):
    reserve = client.app.state.space_reserve  # type: ignore[attr-defined]
    filler = fill_disk(disk)
    assert reserve.release()
    assert reserve.ensure() is False  # no room for it
    filler.unlink()
    assert reserve.ensure() is True
    assert reserve.path.stat().st_size == RESERVE


def test_readiness_is_503_naming_storage_when_the_disk_is_nearly_full_or_full(
    client, settings, disk
):
    assert client.get("/readyz").status_code == 200
    nearly = disk / "nearly"
    nearly.write_bytes(b"\0" * (free_space(disk) - MIN_FREE + MiB))

    ready = client.get("/readyz")

    assert ready.status_code == 503
    storage = ready.json()["checks"]["storage"]
    assert storage.startswith("nearly full: ")
    assert f"MiB free under {disk}, under AFINA_MIN_FREE_BYTES (4 MiB)" in storage
    assert ready.json()["checks"]["database"] == "ok"

    filler = fill_disk(disk)
    ready = client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["checks"]["storage"] == "not writable: the disk is full"

    filler.unlink()
    nearly.unlink()
    assert client.get("/readyz").status_code == 200


def test_a_message_on_a_full_broker_is_taken_once_there_is_room(settings, disk, monkeypatch):
    monkeypatch.setattr(broker, "FULL_DISK_POLL_SECONDS", 0)
    queue = create_celery(settings)
    queue.send_task(TRAIN_TASK, args=["ftjob-waiting"])
    try:
        with queue.connection_for_write() as connection:  # as a worker's consumer polls
            channel = connection.default_channel
            filler = fill_disk(disk)
            for _ in range(20):  # more polls than the broker's connection pool holds
                assert channel.basic_get(TRAIN_QUEUE) is None
            filler.unlink()
            message = channel.basic_get(TRAIN_QUEUE, no_ack=True)
    finally:
        queue.close()
    assert message is not None
    args, _kwargs, _embed = message.decode()
    assert args == ["ftjob-waiting"]


# --- a running job whose writes meet a full disk ----------------------------------------------


@dataclass
class Run:
    """A queued job, and the worker's side of its run, with the artifacts on the small disk
    (its database is the test's usual one)."""

    context: WorkerContext
    job_id: str

    def job(self) -> Job:
        with self.context.session_factory() as session:
            return session.get_one(Job, self.job_id)

    def events(self) -> list[str]:
        with self.context.session_factory() as session:
            query = select(JobEvent.message).where(JobEvent.job_id == self.job_id)
            return list(session.scalars(query.order_by(JobEvent.created_at, JobEvent.id)))


@pytest.fixture
def run(make_settings, disk: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Run]:
    settings = make_settings(
        data_dir=disk, min_free_bytes=MIN_FREE, disk_reserve_bytes=0, disk_full_wait_seconds=30
    )
    engine = make_engine(settings.database_url)
    context = WorkerContext(
        settings, make_session_factory(engine), ArtifactStorage(settings.storage_url)
    )
    job = job_row()
    with context.session_factory.begin() as session:
        session.add(job)
    monkeypatch.setattr(job_runner, "SPACE_POLL_SECONDS", 0.05)
    monkeypatch.setattr(job_runner, "HELD_POLL_SECONDS", 0.05)
    yield Run(context, job.id)
    engine.dispose()


def trains_until_the_disk_fills(
    monkeypatch: pytest.MonkeyPatch, disk: Path, fills: int = 1
) -> list[int]:
    """`_train` as a run meets a full disk: its first `fills` calls fill the disk and fail
    as saving a checkpoint does (torch.save names no cause); the next one trains to the end.
    The steps each call starts from."""
    starts: list[int] = []

    def train(context: WorkerContext, job: Job, recorder: JobRecorder) -> TrainingOutcome:
        starts.append(recorder.steps_done)
        recorder.progress(7, 40, 0.5, None)
        if len(starts) <= fills:
            fill_disk(disk)
            raise RuntimeError("PytorchStreamWriter failed writing file data/3: file write failed")
        adapter = job_runner.workdir(context, recorder.run) / "adapter"
        adapter.mkdir(parents=True)
        (adapter / "adapter_model.safetensors").write_bytes(secrets.token_bytes(64))
        return TrainingOutcome(JOB_CONFIG, adapter, steps=40, trained_tokens=1000)

    monkeypatch.setattr(job_runner, "_train", train)
    return starts


def when(condition, then, timeout: float = 30) -> threading.Thread:
    """Do `then` (in a thread) once `condition` holds."""

    def watch() -> None:
        deadline = time.monotonic() + timeout
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.02)
        then()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def waits_for_space(run: Run) -> bool:
    return any(message.startswith("The disk is full at step 7") for message in run.events())


def test_a_run_that_meets_a_full_disk_waits_for_space_then_goes_on(run, disk, monkeypatch):
    starts = trains_until_the_disk_fills(monkeypatch, disk)
    freed = when(lambda: waits_for_space(run), (disk / "filler").unlink)

    assert run_job(run.context, run.job_id) is False

    freed.join()
    job = run.job()
    assert job.status == JobStatus.SUCCEEDED, job.error
    assert (job.attempts, job.lost_workers) == (1, 0)  # the same run, which waited
    assert starts == [0, 7]
    (waited,) = [m for m in run.events() if m.startswith("The disk is full")]
    assert waited == (
        "The disk is full at step 7: training waits for 4 MiB to be free (for up to 30 s), "
        "then goes on from its last checkpoint"
    )


def test_a_job_whose_disk_stays_full_fails_with_disk_full(run, disk, monkeypatch):
    trains_until_the_disk_fills(monkeypatch, disk)
    context = WorkerContext(
        run.context.settings.model_copy(update={"disk_full_wait_seconds": 1}),
        run.context.session_factory,
        run.context.storage,
    )

    assert run_job(context, run.job_id) is False

    job = run.job()
    assert job.status == JobStatus.FAILED
    assert job.error is not None
    assert job.error["code"] == "disk_full"
    assert job.error["message"].startswith(
        "the disk stayed full for 1 s (AFINA_DISK_FULL_WAIT_SECONDS), with less than 4 MiB free"
    )
    assert "then train again from the job's last checkpoint" in job.error["message"]


def test_a_run_waiting_for_space_stops_when_its_job_is_cancelled(run, disk, monkeypatch):
    trains_until_the_disk_fills(monkeypatch, disk)

    def cancel() -> None:
        with run.context.session_factory.begin() as session:
            job = session.get_one(Job, run.job_id)
            job.status = JobStatus.CANCELLED

    cancelled = when(lambda: waits_for_space(run), cancel)

    assert run_job(run.context, run.job_id) is False

    cancelled.join()
    assert run.job().status == JobStatus.CANCELLED
    assert run.events()[-1] == "Training stopped at step 7: the job was cancelled"
    assert not (run.context.settings.data_dir / "work" / run.job_id).exists()
