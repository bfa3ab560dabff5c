"""A full disk: telling its errors apart, measuring free space, and the reserve that lets a
full SQLite database still take the writes that free space (deleting a file, cancelling a
job).

On the embedded default the database, the broker and the artifacts share the data dir's
disk. SQLite needs room for any write, a delete too: it appends to its write-ahead log, and
moves those pages into the database file at the next checkpoint. So a few MiB are kept
aside, in a preallocated file beside the database (`SpaceReserve`), and released when a
write that frees space meets a full disk; it is made again once the disk has room.
"""

import errno
import logging
import os
import secrets
import sqlite3
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from sqlalchemy.engine import make_url

logger = logging.getLogger(__name__)

MiB = 1024 * 1024
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_DISK_FULL_SQLSTATE = "53100"  # PostgreSQL's disk_full
# What errors say when they keep no errno (SQLite's text; Rust's io::Error in safetensors).
_FULL_WORDS = ("database or disk is full", "no space left on device", "disk quota exceeded")

R = TypeVar("R")


def _chain(error: BaseException) -> Iterable[BaseException]:
    """The error, what it was raised from or during, and a SQLAlchemy error's DBAPI error."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        orig = getattr(current, "orig", None)  # sqlalchemy.exc.DBAPIError
        pending += [current.__cause__, current.__context__]
        if isinstance(orig, BaseException):
            pending.append(orig)


def is_disk_full(error: BaseException) -> bool:
    """Whether the error, or one it came from, is a full disk (or a quota): ENOSPC or EDQUOT,
    SQLite's SQLITE_FULL, PostgreSQL's disk_full."""
    for current in _chain(error):
        if isinstance(current, OSError) and current.errno in _FULL_ERRNOS:
            return True
        if getattr(current, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            return True
        if getattr(current, "sqlstate", None) == _DISK_FULL_SQLSTATE:  # psycopg
            return True
        if any(words in str(current).lower() for words in _FULL_WORDS):
            return True
    return False


def free_bytes(path: Path) -> int:
    """The bytes an unprivileged process may still write on the disk holding `path` (or its
    nearest existing parent)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def sqlite_directory(url: str) -> Path | None:
    """The directory of a SQLite database file (the broker's `sqla+sqlite:` too); None for
    any other database or an in-memory one."""
    parsed = make_url(url.removeprefix("sqla+"))
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database).expanduser().resolve().parent


def local_directories(
    data_dir: Path, database_url: str, broker_url: str, storage_url: str
) -> list[Path]:
    """The local directories the service writes to, one per disk: the data dir (the workers'
    scratch space), a SQLite database or broker, and artifact storage that is a local path."""
    candidates = [data_dir, sqlite_directory(database_url), sqlite_directory(broker_url)]
    if "://" not in storage_url or storage_url.startswith("file://"):
        candidates.append(Path(storage_url.removeprefix("file://")))
    found: dict[int, Path] = {}
    for directory in candidates:
        if directory is None:
            continue
        existing = directory
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        found.setdefault(existing.stat().st_dev, directory)
    return list(found.values())


def nearly_full(directories: Iterable[Path], min_free: int) -> str | None:
    """What is wrong when one of the directories' disks has less than `min_free` bytes left
    (None when none has), e.g. "3.2 MiB free under /data"."""
    for directory in directories:
        free = free_bytes(directory)
        if free < min_free:
            return f"{free / MiB:.1f} MiB free under {directory}"
    return None


class SpaceReserve:
    """A file of `size` bytes kept aside on the disk of a SQLite database: when that disk is
    full, releasing it gives SQLite the room a delete or a cancel needs. It is made only while
    the disk has room for it twice over, so making it never fills a disk."""

    NAME = ".afina-space-reserve"

    def __init__(self, directory: Path, size: int) -> None:
        self.path = directory / self.NAME
        self.size = size

    def ensure(self) -> bool:
        """Make the reserve if it is missing and the disk has room; True if it is there."""
        if self.path.exists():
            return True
        if self.size <= 0 or free_bytes(self.path.parent) < 2 * self.size:
            return False
        partial = self.path.with_name(f"{self.NAME}.{secrets.token_hex(4)}")
        try:
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.posix_fallocate(fd, 0, self.size)  # blocks of its own, not a sparse file
            finally:
                os.close(fd)
            os.replace(partial, self.path)
        except OSError as error:
            partial.unlink(missing_ok=True)
            logger.warning("could not keep %d bytes aside at %s: %s", self.size, self.path, error)
            return False
        logger.info("keeping %d bytes aside at %s for a full disk", self.size, self.path)
        return True

    def release(self) -> bool:
        """Give the reserve's space back to the disk; True if there was one to release."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            return False
        logger.warning(
            "the disk under %s is full: released the %d bytes kept aside for it",
            self.path.parent,
            self.size,
        )
        return True


def sqlite_reserve(database_url: str, size: int) -> SpaceReserve | None:
    """The reserve for a SQLite database; None for any other database, or a size of 0."""
    directory = sqlite_directory(database_url)
    if directory is None or size <= 0:
        return None
    return SpaceReserve(directory, size)


def freeing_space(
    write: Callable[[], R], reserve: SpaceReserve | None, undo: Callable[[], None]
) -> R:
    """Run a write that frees space (a delete, a cancel). Should it meet a full disk, `undo`
    what it began (roll back), release the reserve and try once more."""
    try:
        return write()
    except Exception as error:
        if not is_disk_full(error) or reserve is None:
            raise
        undo()
        reserve.release()  # if another request has not already
    return write()
