"""Artifact storage: what a listing shows of objects being written, and which kept trainer
state a job resumes from."""

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
