"""Artifact storage under one root: a local directory or any fsspec URL (`s3://bucket/prefix`
with s3fs).

Objects are addressed by keys built from ids alone (`files/{id}.jsonl`,
`jobs/{id}/adapter/`, `jobs/{id}/checkpoints/step-{n}/`); a name a client
sent is metadata and never reaches a path. A reader never sees half of anything:

- On local storage a write goes to a temporary name (`TEMPORARY_MARK` in it) first and is
  renamed into place, a directory as a whole; listings skip temporary names.
- On an object store (S3) a rename is a copy and a delete, neither cheap nor atomic, and
  the one atomic write is the PUT of one object (a multipart upload too: the object appears
  when it completes). So a file is written to a local temporary file and then stored under
  its final key by one upload (`atomic_write`, `publish`): no temporary key, no copy.
  A directory (`put_directory`, `move`) is written in place under its key, between two
  marker objects: `{key}/.afina-writing` first, then the files, then `{key}/.afina-whole`,
  then the `.afina-writing` marker is deleted. A directory counts only while it holds
  `.afina-whole` and not `.afina-writing`: until then (and for good, if its writer died)
  `names()` of its folder leaves it out, `names()` of the directory itself is empty, and
  `exists()` and `local_directory()` do not find it. Deleting a folder writes its
  `.afina-writing` marker first and takes away every `.afina-whole` marker under it before
  the files, so a directory being deleted is never seen half gone. The markers are not
  listed, not downloaded and not copied. A folder that holds neither marker is a plain
  folder (`files/`, `jobs/{id}/resume/`): what counts in it is its file objects, its
  whole directories and the plain folders in it.
  One writer at a time per key (the job's run holds it): two processes writing the same
  directory at once on an object store may mix their files. Rewriting a directory that was
  already there hides it from the start; should the rewrite fail, it is gone rather than
  the old one kept.
"""

import os
import posixpath
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, BinaryIO, cast

import fsspec
from fsspec.implementations.local import LocalFileSystem

# In the name of an object being written: it is renamed to its key once whole.
TEMPORARY_MARK = ".tmp-"
# On an object store: a directory holding this is whole (written last)...
WHOLE_MARKER = ".afina-whole"
# ... unless it holds this too: it is being written or deleted (written first).
WRITING_MARKER = ".afina-writing"
MARKERS = frozenset({WHOLE_MARKER, WRITING_MARKER})
# Files uploaded at once by `put_directory` (each up to 100 MiB is read into memory whole).
UPLOAD_BATCH = 4


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


def trained_key(job_id: str, step: int | None) -> str:
    """The adapter of the job's fine-tuned model (`step` None), or of its checkpoint."""
    return adapter_key(job_id) if step is None else checkpoint_key(job_id, step)


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


def _split(tree: dict[str, int]) -> tuple[set[str], dict[str, dict[str, int]]]:
    """A folder's objects (relative paths) as the names of its own files and the objects of
    each of its subfolders."""
    files: set[str] = set()
    folders: dict[str, dict[str, int]] = {}
    for relative, size in tree.items():
        head, separator, rest = relative.partition("/")
        if separator:
            folders.setdefault(head, {})[rest] = size
        else:
            files.add(head)
    return files, folders


def _is_whole(files: set[str]) -> bool:
    return WHOLE_MARKER in files and WRITING_MARKER not in files


def _view(tree: dict[str, int]) -> dict[str, list[str]] | None:
    """What of a folder counts on an object store: each entry's name with the relative paths
    of its files (an empty list for an empty whole directory): its files, its whole
    directories, and its plain folders (no marker) with what counts in them. None when the
    folder is a directory being written or deleted."""
    files, folders = _split(tree)
    if WRITING_MARKER in files:
        return None
    if WHOLE_MARKER in files:  # a whole directory: all of it but the markers
        view: dict[str, list[str]] = {}
        for relative in sorted(tree):
            if posixpath.basename(relative) not in MARKERS:
                view.setdefault(relative.partition("/")[0], []).append(relative)
        return view
    view = {name: [name] for name in files if name not in MARKERS and TEMPORARY_MARK not in name}
    for name, subtree in folders.items():
        inner = None if TEMPORARY_MARK in name else _view(subtree)
        if inner is not None and (inner or _is_whole(_split(subtree)[0])):
            view[name] = [f"{name}/{relative}" for entry in inner.values() for relative in entry]
    return view


def _found(tree: dict[str, int]) -> dict[str, list[str]] | None:
    """`_view` of a folder where something counts; None when nothing does (nothing is stored
    there, or it is a directory being written or deleted)."""
    view = _view(tree)
    if view is None or not (view or _is_whole(_split(tree)[0])):
        return None
    return view


def _local_files(local: Path, names: Iterable[str]) -> list[tuple[Path, str]]:
    """The files of `names` in `local` (folders walked), each with its path relative to it."""
    found: list[tuple[Path, str]] = []
    for name in names:
        path = local / name
        if path.is_dir():
            found.extend(
                (child, child.relative_to(local).as_posix())
                for child in sorted(path.rglob("*"))
                if child.is_file()
            )
        elif path.exists():
            found.append((path, name))
        else:
            raise FileNotFoundError(path)
    return found


class ArtifactStorage:
    def __init__(self, url: str, options: dict[str, Any] | None = None) -> None:
        """`options`: the file system's own (fsspec storage options: an S3 endpoint,
        credentials)."""
        options = dict(options or {})
        if fsspec.utils.get_protocol(url) in ("s3", "s3a"):
            # s3fs would keep listings for ever; other processes write here.
            options.setdefault("use_listings_cache", False)
        self.fs, self.root = fsspec.core.url_to_fs(url, **options)
        self.root = self.root.rstrip("/")
        self.local = isinstance(self.fs, LocalFileSystem)

    def path(self, key: str) -> str:
        return f"{self.root}/{key}"

    @contextmanager
    def atomic_write(self, key: str) -> Iterator[BinaryIO]:
        """Yield a file to write; it appears under `key` only if the block ends cleanly."""
        final = self.path(key)
        if not self.local:  # written here, then stored by one upload
            with tempfile.NamedTemporaryFile(prefix=f"afina-write{TEMPORARY_MARK}") as staged:
                yield cast(BinaryIO, staged)
                staged.flush()
                self.fs.put_file(staged.name, final)
            return
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
        if not self.local:
            return Path(tempfile.gettempdir()) / name
        directory = Path(self.path(folder))
        directory.mkdir(parents=True, exist_ok=True)
        return directory / name

    def publish(self, staged: Path, key: str) -> None:
        """Put the whole file at `staged` (from `staging_path`) under `key`, and remove it:
        a rename on local storage, one upload to the final key on an object store."""
        if self.local:
            final = Path(self.path(key))
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, final)
            return
        try:
            self.fs.put_file(str(staged), self.path(key))
        finally:
            staged.unlink(missing_ok=True)

    def put_directory(self, local: Path, key: str, *, names: Iterable[str] | None = None) -> None:
        """Copy a local directory (or just `names` in it) to `key`, replacing what was there;
        it appears whole or not at all. On an object store each file is uploaded once, to
        its final key, between the directory's markers (see the module's docstring)."""
        chosen = list(names) if names is not None else sorted(p.name for p in local.iterdir())
        if not self.local:
            files = _local_files(local, chosen)
            final = self.path(key)

            def upload() -> set[str]:
                if files:
                    self.fs.put(
                        [str(path) for path, _ in files],
                        [f"{final}/{relative}" for _, relative in files],
                        batch_size=UPLOAD_BATCH,
                    )
                return {relative for _, relative in files}

            self._write_directory(final, upload)
            return
        final = self.path(key)
        temporary = f"{final}{TEMPORARY_MARK}{secrets.token_hex(8)}"
        try:
            self.fs.makedirs(temporary, exist_ok=True)
            for name in chosen:
                self.fs.put(str(local / name), f"{temporary}/{name}", recursive=True)
            self._remove(final)
            self.fs.mv(temporary, final, recursive=True)
        except BaseException:
            self._remove(temporary)
            raise

    def local_directory(self, key: str, cache: Path) -> Path:
        """A local directory holding what is under `key`: the object itself on local
        storage, else a copy fetched once into `cache` (keys are immutable once written) of
        what counts there: a whole directory, or a folder's files and whole directories.
        FileNotFoundError when there is none (or it is still being written)."""
        if self.local:
            directory = Path(self.path(key))
            if not directory.is_dir():
                raise FileNotFoundError(f"no directory at {directory}")
            return directory
        target = cache / key
        if target.is_dir():
            return target
        path = self.path(key)
        view = _found(self._tree(path)[1])
        if view is None:
            raise FileNotFoundError(f"no whole directory at {path}")
        relatives = [relative for entry in view.values() for relative in entry]
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{target.name}{TEMPORARY_MARK}{secrets.token_hex(8)}")
        partial.mkdir()
        try:
            for relative in relatives:
                (partial / relative).parent.mkdir(parents=True, exist_ok=True)
            if relatives:
                self.fs.get(
                    [f"{path}/{relative}" for relative in relatives],
                    [str(partial / relative) for relative in relatives],
                )
            partial.rename(target)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        return target

    def move(self, source: str, key: str) -> None:
        """Put what is under `source` at `key`, replacing what was there (a rename on local
        storage; on an object store a server-side copy, written like `put_directory`, then
        the source's deletion)."""
        if self.local:
            self._remove(self.path(key))
            self.fs.mv(self.path(source), self.path(key), recursive=True)
            return
        origin, final = self.path(source), self.path(key)
        is_file, tree = self._tree(origin)
        if is_file and not tree:  # a copy replaces the object at once
            self.fs.copy(origin, final)
            self._remove(origin)
            return
        view = _found(tree)
        if view is None:
            raise FileNotFoundError(f"no whole directory at {origin}")
        relatives = [relative for entry in view.values() for relative in entry]

        def copy() -> set[str]:
            if relatives:
                self.fs.copy(
                    [f"{origin}/{relative}" for relative in relatives],
                    [f"{final}/{relative}" for relative in relatives],
                )
            return set(relatives)

        self._write_directory(final, copy)
        self._remove(origin)

    def names(self, key: str) -> list[str]:
        """The names of the objects directly under `key` that are whole (not being written)."""
        path = self.path(key)
        if not self.local:
            view = _view(self._tree(path)[1])
            return sorted(view or ())
        # Other file systems may keep listings; other processes write here.
        self.fs.invalidate_cache(path)
        try:
            paths = self.fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        names = (posixpath.basename(path.rstrip("/")) for path in paths)
        return sorted(name for name in names if TEMPORARY_MARK not in name)

    def size(self, key: str) -> int:
        return int(self.fs.size(self.path(key)))

    def exists(self, key: str) -> bool:
        """Whether `key` is a file or a directory, whole (on an object store: a whole
        directory, or a folder where something counts)."""
        if self.local:
            return self.fs.exists(self.path(key))
        is_file, tree = self._tree(self.path(key))
        return is_file or _found(tree) is not None

    def open(self, key: str) -> BinaryIO:
        """The object, to read as a stream (from an object store: by ranged reads as it is
        read, without a local copy)."""
        return self.fs.open(self.path(key), "rb")

    def delete(self, key: str) -> None:
        self._remove(self.path(key))

    def check_writable(self) -> None:
        """Raise if the root cannot take a new object (used by the readiness probe)."""
        key = f".probe/{secrets.token_hex(8)}"
        with self.atomic_write(key) as out:
            out.write(b"ok")
        self.delete(key)

    def _tree(self, path: str) -> tuple[bool, dict[str, int]]:
        """On an object store: whether an object is stored at `path` itself, and every object
        under the folder `path` (one listing), by its path relative to it, with its size."""
        self.fs.invalidate_cache(path)
        try:
            found = self.fs.find(path, withdirs=False, detail=True)
        except FileNotFoundError:
            return False, {}
        prefix = f"{path}/"
        is_file = False
        tree: dict[str, int] = {}
        for name, info in found.items():
            name = name.rstrip("/")
            if name == path:
                is_file = info.get("type") == "file"
            elif name.startswith(prefix):
                tree[name.removeprefix(prefix)] = int(info.get("size") or 0)
        return is_file, tree

    def _write_directory(self, final: str, write: Callable[[], set[str]]) -> None:
        """Write the directory at `final` on an object store: its writing marker, the files
        (`write` stores them and returns their relative paths), the removal of what an
        earlier directory there had besides, the whole marker, the writing marker's removal.
        A failure leaves nothing there."""
        writing = f"{final}/{WRITING_MARKER}"
        self.fs.pipe_file(writing, b"")
        try:
            _, before = self._tree(final)
            written = write()
            stale = sorted(set(before) - written - MARKERS)
            if stale:
                self.fs.rm([f"{final}/{relative}" for relative in stale])
            self.fs.pipe_file(f"{final}/{WHOLE_MARKER}", b"")
            self.fs.rm_file(writing)
        except BaseException:
            with suppress(Exception):  # still hidden by its writing marker if this fails
                self._remove(final)
            raise

    def _remove(self, path: str) -> None:
        if self.local:
            with suppress(FileNotFoundError):  # already gone: removing is idempotent
                self.fs.rm(path, recursive=True)
            return
        is_file, tree = self._tree(path)
        if is_file:
            with suppress(FileNotFoundError):
                self.fs.rm_file(path)
        if not tree:
            return
        # Hidden first (the folder itself, then every directory in it), then the rest.
        writing = f"{path}/{WRITING_MARKER}"
        self.fs.pipe_file(writing, b"")
        wholes = [f"{path}/{r}" for r in tree if posixpath.basename(r) == WHOLE_MARKER]
        rest = [f"{path}/{r}" for r in sorted(tree) if posixpath.basename(r) != WHOLE_MARKER]
        for batch in (wholes, [name for name in rest if name != writing]):
            if batch:
                with suppress(FileNotFoundError):
                    self.fs.rm(batch)
        with suppress(FileNotFoundError):
            self.fs.rm_file(writing)
