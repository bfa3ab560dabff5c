"""Artifact storage under one root: a local directory or any fsspec URL.

Objects are addressed by keys built from ids alone (`files/{id}.jsonl`,
`jobs/{id}/adapter/`, `jobs/{id}/checkpoints/step-{n}/`); a name a client
sent is metadata and never reaches a path. Writes go to a temporary name first and are
renamed into place, so a reader never sees half a file.
"""

import os
import posixpath
import secrets
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import BinaryIO

import fsspec
from fsspec.implementations.local import LocalFileSystem

# In the name of an object being written: it is renamed to its key once whole.
TEMPORARY_MARK = ".tmp-"


def file_key(file_id: str) -> str:
    return f"files/{file_id}.jsonl"


def job_key(job_id: str) -> str:
    """The folder of everything a job keeps."""
    return f"jobs/{job_id}"


def adapter_key(job_id: str) -> str:
    return f"jobs/{job_id}/adapter"


def staged_adapter_key(job_id: str, run_id: str) -> str:
    """Where a run uploads its adapter before the run that marks the job succeeded moves it to
    `adapter_key`: a run that lost its job never replaces the adapter of the run that
    finished it."""
    return f"jobs/{job_id}/adapter-{run_id}"


def checkpoint_key(job_id: str, step: int | None = None) -> str:
    """A checkpoint's adapter and tokenizer; without a step, the folder of all of them."""
    base = f"jobs/{job_id}/checkpoints"
    return base if step is None else f"{base}/step-{step}"


def export_key(job_id: str, export_id: str | None = None) -> str:
    """A merged export's archive (`{export id}.tar.gz`); without an id, the folder of all of
    a job's exports."""
    base = f"jobs/{job_id}/exports"
    return base if export_id is None else f"{base}/{export_id}.tar.gz"


def resume_key(job_id: str, step: int | None = None) -> str:
    """Where a job's whole trainer state (optimizer, scheduler, RNG) is kept, so that a run
    that stopped can go on from `step`; without a step, the folder of all of them."""
    base = f"jobs/{job_id}/resume"
    return base if step is None else f"{base}/step-{step}"


def tokenized_key(job_id: str, name: str | None = None) -> str:
    """Where a job's tokenized datasets are kept for its later runs (`name`: train, eval)."""
    base = f"jobs/{job_id}/tokenized"
    return base if name is None else f"{base}/{name}"


def latest_resume_step(storage: "ArtifactStorage", job_id: str) -> int | None:
    """The step of the newest complete trainer state of the job, if there is one."""
    steps = [
        int(name.removeprefix("step-"))
        for name in storage.names(resume_key(job_id))
        if name.startswith("step-") and name.removeprefix("step-").isdigit()
    ]
    return max(steps, default=None)


class ArtifactStorage:
    def __init__(self, url: str) -> None:
        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.root = self.root.rstrip("/")

    def path(self, key: str) -> str:
        return f"{self.root}/{key}"

    @contextmanager
    def atomic_write(self, key: str) -> Iterator[BinaryIO]:
        """Yield a file to write; it appears under `key` only if the block ends cleanly."""
        final = self.path(key)
        temporary = f"{final}{TEMPORARY_MARK}{secrets.token_hex(8)}"
        self.fs.makedirs(posixpath.dirname(final), exist_ok=True)
        try:
            with self.fs.open(temporary, "wb") as out:
                yield out
            self.fs.mv(temporary, final)
        except BaseException:
            self._remove(temporary)
            raise

    def staging_path(self, folder: str) -> Path:
        """A new local path to write an object to before `publish` puts it under `folder`:
        in `folder` itself on local storage (publishing is a rename), else in the system's
        temporary directory. The caller removes it if it does not publish it."""
        name = f"upload{TEMPORARY_MARK}{secrets.token_hex(8)}"
        if not isinstance(self.fs, LocalFileSystem):
            return Path(tempfile.gettempdir()) / name
        directory = Path(self.path(folder))
        directory.mkdir(parents=True, exist_ok=True)
        return directory / name

    def publish(self, staged: Path, key: str) -> None:
        """Put the whole file at `staged` (from `staging_path`) under `key`, and remove it."""
        if isinstance(self.fs, LocalFileSystem):
            final = Path(self.path(key))
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, final)
            return
        try:
            with staged.open("rb") as source, self.atomic_write(key) as out:
                shutil.copyfileobj(source, out, 1024 * 1024)
        finally:
            staged.unlink(missing_ok=True)

    def put_directory(self, local: Path, key: str, *, names: Iterable[str] | None = None) -> None:
        """Copy a local directory (or just `names` in it) to `key`, replacing what was there;
        it appears whole or not at all."""
        final = self.path(key)
        temporary = f"{final}{TEMPORARY_MARK}{secrets.token_hex(8)}"
        try:
            self.fs.makedirs(temporary, exist_ok=True)
            for name in names if names is not None else sorted(p.name for p in local.iterdir()):
                self.fs.put(str(local / name), f"{temporary}/{name}", recursive=True)
            self._remove(final)
            self.fs.mv(temporary, final, recursive=True)
        except BaseException:
            self._remove(temporary)
            raise

    def local_directory(self, key: str, cache: Path) -> Path:
        """A local directory holding what is under `key`: the object itself on local
        storage, else a copy fetched once into `cache` (keys are immutable once written)."""
        if isinstance(self.fs, LocalFileSystem):
            return Path(self.path(key))
        target = cache / key
        if not target.is_dir():
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f"{target.name}{TEMPORARY_MARK}{secrets.token_hex(8)}")
            self.fs.get(self.path(key) + "/", str(partial) + "/", recursive=True)
            partial.rename(target)
        return target

    def move(self, source: str, key: str) -> None:
        """Put what is under `source` at `key`, replacing what was there (a rename on local
        storage, a copy then a delete on object stores)."""
        self._remove(self.path(key))
        self.fs.mv(self.path(source), self.path(key), recursive=True)

    def names(self, key: str) -> list[str]:
        """The names of the objects directly under `key` that are whole (not being written)."""
        # Object stores' file systems keep listings for ever; other processes write here.
        self.fs.invalidate_cache(self.path(key))
        try:
            paths = self.fs.ls(self.path(key), detail=False)
        except FileNotFoundError:
            return []
        names = (posixpath.basename(path.rstrip("/")) for path in paths)
        return sorted(name for name in names if TEMPORARY_MARK not in name)

    def size(self, key: str) -> int:
        return int(self.fs.size(self.path(key)))

    def exists(self, key: str) -> bool:
        return self.fs.exists(self.path(key))

    def open(self, key: str) -> BinaryIO:
        return self.fs.open(self.path(key), "rb")

    def delete(self, key: str) -> None:
        self._remove(self.path(key))

    def check_writable(self) -> None:
        """Raise if the root cannot take a new object (used by the readiness probe)."""
        key = f".probe/{secrets.token_hex(8)}"
        with self.atomic_write(key) as out:
            out.write(b"ok")
        self.delete(key)

    def _remove(self, path: str) -> None:
        with suppress(FileNotFoundError):  # already gone: removing is idempotent
            self.fs.rm(path, recursive=True)
