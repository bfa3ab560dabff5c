"""Artifact storage: what a listing shows of objects being written, which kept trainer
state a job resumes from, and how an upload staged on disk is published."""

import secrets
import tempfile
from pathlib import Path

import pytest

from afina.core.storage import TEMPORARY_MARK, ArtifactStorage, latest_resume_step, resume_key

JOB = "ftjob-abc"


@pytest.fixture
def storage(tmp_path: Path) -> ArtifactStorage:
    return ArtifactStorage(str(tmp_path / "artifacts"))


def trainer_state(tmp_path: Path, step: int) -> Path:
    directory = tmp_path / "trainer" / f"checkpoint-{step}"
    directory.mkdir(parents=True)
    (directory / "optimizer.pt").write_text(f"step {step}")
    return directory


def half_written(storage: ArtifactStorage, step: int) -> None:
    """What an upload of the state at `step` leaves when its process is killed."""
    partial = Path(storage.path(resume_key(JOB, step)) + f"{TEMPORARY_MARK}0123abcd")
    partial.mkdir(parents=True)
    (partial / "optimizer.pt").write_text("half")


def test_a_job_without_kept_state_resumes_from_nothing(storage: ArtifactStorage):
    assert storage.names(resume_key(JOB)) == []
    assert latest_resume_step(storage, JOB) is None


def test_the_newest_whole_state_is_the_one_to_resume_from(storage, tmp_path):
    for step in (20, 100, 9):
        storage.put_directory(trainer_state(tmp_path, step), resume_key(JOB, step))
    half_written(storage, 200)  # newer, but not whole
    (Path(storage.path(resume_key(JOB))) / "notes").write_text("not a step")

    assert storage.names(resume_key(JOB)) == ["notes", "step-100", "step-20", "step-9"]
    assert latest_resume_step(storage, JOB) == 100  # by number, not by name


def test_a_half_written_state_alone_is_nothing_to_resume_from(storage):
    half_written(storage, 30)
    assert storage.names(resume_key(JOB)) == []
    assert latest_resume_step(storage, JOB) is None


def test_a_staged_file_is_published_by_a_rename_on_local_storage(storage):
    staged = storage.staging_path("files")
    assert staged.parent == Path(storage.path("files"))
    assert TEMPORARY_MARK in staged.name
    staged.write_bytes(b"data")
    inode = staged.stat().st_ino
    assert storage.names("files") == []  # not whole yet

    storage.publish(staged, "files/file-x.jsonl")
    assert not staged.exists()
    assert Path(storage.path("files/file-x.jsonl")).stat().st_ino == inode  # no copy
    assert storage.names("files") == ["file-x.jsonl"]


def test_a_staged_file_is_copied_to_an_object_store_then_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    storage = ArtifactStorage(f"memory://afina-{secrets.token_hex(4)}")
    staged = storage.staging_path("files")
    assert staged.parent == tmp_path  # a local file, not the store's
    staged.write_bytes(b"data")

    storage.publish(staged, "files/file-x.jsonl")
    assert not staged.exists()
    with storage.open("files/file-x.jsonl") as stored:
        assert stored.read() == b"data"
    assert storage.names("files") == ["file-x.jsonl"]
