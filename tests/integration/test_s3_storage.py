"""The artifact storage contract, on local storage and on an S3 server (moto's in CI, see
`s3_bucket`): the same tests on both. Writes appear whole or not at all, a directory whose
writer died is nowhere to be seen, listings hide what is being written, deletes and moves
leave nothing behind; then what is S3's own: each file is uploaded once to its final key
(no temporary key, no copy), a directory's marker is written last and deleted first, and
the S3 settings reach the server (or the standard AWS variables do)."""

import secrets
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import s3fs

from afina.core.settings import Settings
from afina.core.storage import (
    WHOLE_MARKER,
    WRITING_MARKER,
    ArtifactStorage,
    adapter_key,
    checkpoint_key,
    file_key,
    job_key,
    latest_resume_step,
    resume_key,
    staged_adapter_key,
    tokenized_key,
)
from tests.support import S3_KEY, S3_SECRET, S3Bucket

JOB = "ftjob-abc"


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStorage:
    if request.param == "local":
        return ArtifactStorage(str(tmp_path / "artifacts"))
    bucket: S3Bucket = request.getfixturevalue("s3_bucket")
    return ArtifactStorage(bucket.url(f"contract-{secrets.token_hex(4)}"), bucket.options())


@pytest.fixture
def s3_storage(s3_bucket: S3Bucket) -> ArtifactStorage:
    return ArtifactStorage(s3_bucket.url(f"s3-{secrets.token_hex(4)}"), s3_bucket.options())


def stored(storage: ArtifactStorage) -> list[str]:
    """Every object (file) under the storage's root, hidden ones too, by its key."""
    root = f"{storage.root}/"
    return sorted(path.removeprefix(root) for path in storage.fs.find(storage.root))


def visible(paths: list[str]) -> list[str]:
    """The paths less the object store's directory markers."""
    return [path for path in paths if path.rsplit("/", 1)[-1] not in (WHOLE_MARKER, WRITING_MARKER)]


def folder(root: Path, files: dict[str, bytes]) -> Path:
    """A local directory holding `files` (relative paths)."""
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return root


ADAPTER = {
    "adapter_config.json": b'{"r": 8}',
    "adapter_model.safetensors": b"\x00" * 1000,
    "tokenizer/tokenizer.json": b"{}",
}


def read(path: Path) -> dict[str, bytes]:
    return {
        child.relative_to(path).as_posix(): child.read_bytes()
        for child in sorted(path.rglob("*"))
        if child.is_file()
    }


class Killed(BaseException):
    """The process writing died here: no clean-up of it runs."""


def killed_while_writing(
    storage: ArtifactStorage, monkeypatch: pytest.MonkeyPatch, local: Path, key: str
) -> None:
    """What `put_directory` leaves when its process dies after its first file is uploaded."""
    put = storage.fs.put

    def first_then_die(lpath: Any, rpath: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(lpath, list):
            put(lpath[:1], rpath[:1], *args, **kwargs)
        else:
            put(lpath, rpath, *args, **kwargs)
        raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(storage.fs, "put", first_then_die)
        patch.setattr(storage, "_remove", lambda path: None)
        with pytest.raises(Killed):
            storage.put_directory(local, key)
    assert stored(storage), "the writer left something behind"


# The contract, on both.


def test_a_written_object_appears_only_once_its_write_ends(storage):
    key = file_key("file-a")
    with storage.atomic_write(key) as out:
        out.write(b'{"text": "x"}\n')
        assert storage.names("files") == []
        assert not storage.exists(key)
    assert storage.names("files") == ["file-a.jsonl"]
    assert storage.exists(key)
    assert storage.size(key) == 14
    with storage.open(key) as stream:
        assert stream.read() == b'{"text": "x"}\n'
    assert stored(storage) == [key]  # nothing under a temporary name


def test_a_write_that_fails_leaves_nothing(storage):
    def write_half() -> None:
        with storage.atomic_write(file_key("file-a")) as out:
            out.write(b"half")
            raise RuntimeError("the client went away")

    with pytest.raises(RuntimeError):
        write_half()
    assert not storage.exists(file_key("file-a"))
    assert storage.names("files") == []
    assert stored(storage) == []


def test_a_staged_upload_is_published_under_its_key_and_the_staging_file_goes(storage):
    staged = storage.staging_path("files")
    staged.write_bytes(b"data\n")
    assert storage.names("files") == []  # not whole yet (beside the files, on local storage)

    storage.publish(staged, file_key("file-x"))
    assert not staged.exists()
    with storage.open(file_key("file-x")) as stream:
        assert stream.read() == b"data\n"
    assert storage.names("files") == ["file-x.jsonl"]
    assert stored(storage) == [file_key("file-x")]


def test_a_directory_appears_whole_with_every_file(storage, tmp_path):
    key = checkpoint_key(JOB, 16)
    storage.put_directory(folder(tmp_path / "saved", ADAPTER), key)

    assert storage.names(checkpoint_key(JOB)) == ["step-16"]
    assert storage.names(key) == ["adapter_config.json", "adapter_model.safetensors", "tokenizer"]
    assert storage.exists(key)
    assert storage.size(f"{key}/adapter_model.safetensors") == 1000
    with storage.open(f"{key}/tokenizer/tokenizer.json") as stream:
        assert stream.read() == b"{}"
    assert read(storage.local_directory(key, tmp_path / "cache")) == ADAPTER
    assert visible(stored(storage)) == sorted(f"{key}/{name}" for name in ADAPTER)


def test_only_the_names_asked_for_are_kept(storage, tmp_path):
    saved = folder(tmp_path / "saved", {**ADAPTER, "optimizer.pt": b"state"})
    storage.put_directory(saved, checkpoint_key(JOB, 4), names=["adapter_config.json"])
    assert storage.names(checkpoint_key(JOB, 4)) == ["adapter_config.json"]


def test_a_directory_written_again_holds_only_the_new_files(storage, tmp_path):
    key = resume_key(JOB, 8)
    storage.put_directory(folder(tmp_path / "first", {"a": b"1", "b": b"2"}), key)
    storage.put_directory(folder(tmp_path / "second", {"b": b"new", "c": b"3"}), key)

    assert storage.names(key) == ["b", "c"]
    assert read(storage.local_directory(key, tmp_path / "cache")) == {"b": b"new", "c": b"3"}
    assert visible(stored(storage)) == [f"{key}/b", f"{key}/c"]


def test_a_directory_whose_writer_died_is_nowhere_to_be_seen(storage, tmp_path, monkeypatch):
    key = checkpoint_key(JOB, 32)
    saved = folder(tmp_path / "saved", ADAPTER)
    killed_while_writing(storage, monkeypatch, saved, key)

    assert storage.names(checkpoint_key(JOB)) == []
    assert storage.names(key) == []
    assert not storage.exists(key)
    with pytest.raises(FileNotFoundError):
        storage.local_directory(key, tmp_path / "cache")

    storage.put_directory(saved, key)  # the next run writes it again: whole this time
    assert storage.names(checkpoint_key(JOB)) == ["step-32"]
    assert read(storage.local_directory(key, tmp_path / "cache")) == ADAPTER


def test_the_newest_whole_state_is_the_one_to_resume_from(storage, tmp_path, monkeypatch):
    assert latest_resume_step(storage, JOB) is None
    for step in (20, 100, 9):
        state = folder(tmp_path / f"checkpoint-{step}", {"optimizer.pt": f"step {step}".encode()})
        storage.put_directory(state, resume_key(JOB, step))
    newer = folder(tmp_path / "checkpoint-200", {"optimizer.pt": b"half", "rng.pth": b"x"})
    killed_while_writing(storage, monkeypatch, newer, resume_key(JOB, 200))
    with storage.atomic_write(f"{resume_key(JOB)}/notes") as out:
        out.write(b"not a step")

    assert storage.names(resume_key(JOB)) == ["notes", "step-100", "step-20", "step-9"]
    assert latest_resume_step(storage, JOB) == 100  # by number, not by name
    state = storage.local_directory(resume_key(JOB, 100), tmp_path / "cache")
    assert read(state) == {"optimizer.pt": b"step 100"}


def test_a_folder_of_directories_is_fetched_with_its_whole_ones(storage, tmp_path, monkeypatch):
    storage.put_directory(
        folder(tmp_path / "train", {"data.arrow": b"rows"}), tokenized_key(JOB, "train")
    )
    killed_while_writing(
        storage,
        monkeypatch,
        folder(tmp_path / "eval", {"a": b"1", "b": b"2"}),
        tokenized_key(JOB, "eval"),
    )

    assert storage.names(tokenized_key(JOB)) == ["train"]
    kept = storage.local_directory(tokenized_key(JOB), tmp_path / "cache")
    assert (kept / "train" / "data.arrow").read_bytes() == b"rows"
    assert not (kept / "eval").exists()


def test_nothing_there_is_no_directory(storage, tmp_path):
    assert storage.names(adapter_key(JOB)) == []
    assert not storage.exists(adapter_key(JOB))
    with pytest.raises(FileNotFoundError):
        storage.local_directory(adapter_key(JOB), tmp_path / "cache")
    with pytest.raises(FileNotFoundError):
        storage.open(file_key("file-missing"))


def test_a_staged_adapter_moves_into_place_replacing_the_old_one(storage, tmp_path):
    staged = staged_adapter_key(JOB, "run-2")
    storage.put_directory(folder(tmp_path / "old", {"old.bin": b"old"}), adapter_key(JOB))
    storage.put_directory(folder(tmp_path / "new", ADAPTER), staged)

    storage.move(staged, adapter_key(JOB))
    assert storage.names(job_key(JOB)) == ["adapter"]
    assert not storage.exists(staged)
    assert read(storage.local_directory(adapter_key(JOB), tmp_path / "cache")) == ADAPTER
    assert visible(stored(storage)) == sorted(f"{adapter_key(JOB)}/{name}" for name in ADAPTER)


def test_a_file_moves_into_place(storage):
    with storage.atomic_write("jobs/x/exports/staged.tar.gz") as out:
        out.write(b"archive")
    storage.move("jobs/x/exports/staged.tar.gz", "jobs/x/exports/exp-1.tar.gz")
    assert storage.names("jobs/x/exports") == ["exp-1.tar.gz"]
    assert stored(storage) == ["jobs/x/exports/exp-1.tar.gz"]


def test_deleting_removes_files_and_directories_and_may_be_repeated(storage, tmp_path):
    with storage.atomic_write(file_key("file-a")) as out:
        out.write(b"x")
    storage.put_directory(folder(tmp_path / "a", ADAPTER), adapter_key(JOB))
    storage.put_directory(folder(tmp_path / "c", ADAPTER), checkpoint_key(JOB, 2))
    storage.put_directory(folder(tmp_path / "r", {"optimizer.pt": b"s"}), resume_key(JOB, 2))

    storage.delete(file_key("file-a"))
    storage.delete(file_key("file-a"))
    assert not storage.exists(file_key("file-a"))
    storage.delete(resume_key(JOB, 2))
    assert storage.names(resume_key(JOB)) == []
    assert {"adapter", "checkpoints"} <= set(storage.names(job_key(JOB)))

    storage.delete(job_key(JOB))  # a deleted model's folder, every directory in it
    storage.delete(job_key(JOB))
    assert not storage.exists(adapter_key(JOB))
    assert storage.names(checkpoint_key(JOB)) == []
    assert stored(storage) == []


def test_a_dataset_streams_from_storage_line_by_line(storage):
    lines = [b'{"text": "%d"}\n' % i for i in range(200_000)]  # 3.2 MB
    with storage.atomic_write(file_key("file-big")) as out:
        out.writelines(lines)
    with storage.open(file_key("file-big")) as stream:
        assert next(iter(stream)) == lines[0]
        assert stream.read(14) == lines[1]
        assert sum(1 for _ in stream) == len(lines) - 2


def test_the_readiness_probe_leaves_nothing(storage):
    storage.check_writable()
    assert stored(storage) == []


# What is S3's own.


# The methods whose second argument is where they write to (the first, where they read from).
TWO_PATHS = ("put", "put_file", "copy", "mv", "get")


class Calls:
    """The calls made on a file system's write methods, in order: (method, what it writes
    to), and what the ones that read from a path read."""

    def __init__(self, storage: ArtifactStorage, monkeypatch: pytest.MonkeyPatch) -> None:
        self.made: list[tuple[str, Any]] = []
        self.sources: list[Any] = []
        for method in ("put", "put_file", "pipe_file", "rm", "rm_file", "copy", "mv", "get"):
            original = getattr(storage.fs, method)
            monkeypatch.setattr(storage.fs, method, self._spy(method, original))

    def _spy(self, method: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def call(path: Any, *args: Any, **kwargs: Any) -> Any:
            if method in TWO_PATHS:
                self.made.append((method, args[0]))
                self.sources.append(path)
            else:
                self.made.append((method, path))
            return original(path, *args, **kwargs)

        return call

    def methods(self) -> list[str]:
        return [method for method, _ in self.made]


def test_on_s3_a_directory_is_uploaded_once_between_its_markers(s3_storage, tmp_path, monkeypatch):
    key = checkpoint_key(JOB, 16)
    final = s3_storage.path(key)
    calls = Calls(s3_storage, monkeypatch)
    s3_storage.put_directory(folder(tmp_path / "saved", ADAPTER), key)

    assert calls.methods() == ["pipe_file", "put", "pipe_file", "rm_file"]  # no copy, no move
    assert calls.made[0][1] == f"{final}/{WRITING_MARKER}"
    assert sorted(calls.made[1][1]) == sorted(f"{final}/{name}" for name in ADAPTER)
    assert calls.made[2][1] == f"{final}/{WHOLE_MARKER}"
    assert calls.made[3][1] == f"{final}/{WRITING_MARKER}"
    assert stored(s3_storage) == sorted(
        [*(f"{key}/{name}" for name in ADAPTER), f"{key}/{WHOLE_MARKER}"]
    )


def test_on_s3_a_file_is_one_upload_to_its_final_key(s3_storage, monkeypatch):
    calls = Calls(s3_storage, monkeypatch)
    with s3_storage.atomic_write(file_key("file-a")) as out:
        out.write(b"x")
    staged = s3_storage.staging_path("files")
    staged.write_bytes(b"y")
    s3_storage.publish(staged, file_key("file-b"))

    assert calls.made == [
        ("put_file", s3_storage.path(file_key("file-a"))),
        ("put_file", s3_storage.path(file_key("file-b"))),
    ]
    written, published = calls.sources
    assert Path(written).parent == Path(tempfile.gettempdir())  # a local temporary file
    assert not Path(written).exists()
    assert published == str(staged)
    assert stored(s3_storage) == [file_key("file-a"), file_key("file-b")]


def test_on_s3_a_folder_being_deleted_is_hidden_before_its_files_go(
    s3_storage, tmp_path, monkeypatch
):
    storage = s3_storage
    storage.put_directory(folder(tmp_path / "a", ADAPTER), adapter_key(JOB))
    storage.put_directory(folder(tmp_path / "c", ADAPTER), checkpoint_key(JOB, 2))
    calls = Calls(storage, monkeypatch)
    storage.delete(job_key(JOB))

    folder_path = storage.path(job_key(JOB))
    assert calls.methods() == ["pipe_file", "rm", "rm", "rm_file"]
    assert calls.made[0][1] == f"{folder_path}/{WRITING_MARKER}"
    assert sorted(calls.made[1][1]) == [
        f"{storage.path(adapter_key(JOB))}/{WHOLE_MARKER}",
        f"{storage.path(checkpoint_key(JOB, 2))}/{WHOLE_MARKER}",
    ]
    assert calls.made[3][1] == f"{folder_path}/{WRITING_MARKER}"
    assert stored(storage) == []


def test_on_s3_a_directory_is_fetched_once_then_read_from_the_cache(
    s3_storage, tmp_path, monkeypatch
):
    s3_storage.put_directory(folder(tmp_path / "a", ADAPTER), adapter_key(JOB))
    first = s3_storage.local_directory(adapter_key(JOB), tmp_path / "cache")
    assert first == tmp_path / "cache" / adapter_key(JOB)
    assert read(first) == ADAPTER  # no marker among them
    calls = Calls(s3_storage, monkeypatch)
    assert s3_storage.local_directory(adapter_key(JOB), tmp_path / "cache") == first
    assert calls.made == []


def test_the_s3_settings_reach_the_server(s3_bucket, monkeypatch):
    monkeypatch.setenv("AFINA_STORAGE_URL", s3_bucket.url("from-settings"))
    monkeypatch.setenv("AFINA_S3_ENDPOINT_URL", s3_bucket.endpoint_url)
    monkeypatch.setenv("AFINA_S3_ACCESS_KEY_ID", S3_KEY)
    monkeypatch.setenv("AFINA_S3_SECRET_ACCESS_KEY", S3_SECRET)
    monkeypatch.setenv("AFINA_S3_REGION", "eu-west-3")
    settings = Settings(_env_file=None)
    assert settings.storage_options() == {
        "key": S3_KEY,
        "secret": S3_SECRET,
        "client_kwargs": {"endpoint_url": s3_bucket.endpoint_url, "region_name": "eu-west-3"},
    }
    assert S3_SECRET not in repr(settings)

    storage = ArtifactStorage(settings.storage_url, settings.storage_options())
    storage.check_writable()
    with storage.atomic_write(file_key("file-a")) as out:
        out.write(b"x")
    assert s3_bucket.objects("from-settings") == [file_key("file-a")]


def test_without_s3_settings_the_standard_aws_variables_are_used(s3_bucket, monkeypatch):
    for name in ("ENDPOINT_URL", "ACCESS_KEY_ID", "SECRET_ACCESS_KEY", "REGION"):
        monkeypatch.delenv(f"AFINA_S3_{name}", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_bucket.endpoint_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET)
    settings = Settings(_env_file=None, storage_url=s3_bucket.url("from-aws-env"))
    assert settings.storage_options() == {}
    s3fs.S3FileSystem.clear_instance_cache()  # one made before would not read them again
    try:
        storage = ArtifactStorage(settings.storage_url, settings.storage_options())
        with storage.atomic_write(file_key("file-a")) as out:
            out.write(b"x")
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    assert s3_bucket.objects("from-aws-env") == [file_key("file-a")]


def test_a_local_storage_url_takes_no_s3_options(tmp_path):
    settings = Settings(
        _env_file=None, data_dir=tmp_path, s3_endpoint_url="http://127.0.0.1:1", s3_region="x"
    )
    assert settings.storage_options() == {}
