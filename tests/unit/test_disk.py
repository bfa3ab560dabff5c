"""Telling a full disk from other errors, the local disks the service writes to, and the
reserve a write that frees space falls back on."""

import errno
import sqlite3
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.exc import OperationalError

from afina.core.disk import (
    SpaceReserve,
    freeing_space,
    is_disk_full,
    local_directories,
    sqlite_directory,
    sqlite_reserve,
)


def sqlite_full() -> sqlite3.OperationalError:
    error = sqlite3.OperationalError("database or disk is full")
    error.sqlite_errorcode = sqlite3.SQLITE_FULL  # type: ignore[attr-defined]
    return error


def raised_from(error: BaseException, cause: BaseException) -> BaseException:
    try:
        raise error from cause
    except BaseException as raised:
        return raised


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        OSError(errno.EDQUOT, "Disk quota exceeded"),
        sqlite_full(),
        OperationalError("INSERT ...", {}, sqlite_full()),  # as SQLAlchemy wraps it
        psycopg.errors.DiskFull("could not extend file"),
        raised_from(RuntimeError("saving failed"), OSError(errno.ENOSPC, "No space")),
        Exception("Error while serializing: I/O error: No space left on device (os error 28)"),
    ],
    ids=["enospc", "edquot", "sqlite", "sqlalchemy", "postgresql", "cause", "words"],
)
def test_a_full_disk_is_told_by_its_error(error: BaseException):
    assert is_disk_full(error)


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.EACCES, "Permission denied"),
        FileNotFoundError(errno.ENOENT, "No such file"),
        OperationalError("UPDATE ...", {}, sqlite3.OperationalError("database is locked")),
        RuntimeError("CUDA out of memory"),
    ],
    ids=["eacces", "enoent", "locked", "other"],
)
def test_other_errors_are_not_a_full_disk(error: BaseException):
    assert not is_disk_full(error)


def test_the_local_disks_are_each_named_once(tmp_path: Path):
    data = tmp_path / "data"
    directories = local_directories(
        data,
        f"sqlite:///{data / 'afina.db'}",
        f"sqla+sqlite:///{data / 'broker.db'}",
        str(data / "artifacts"),
    )
    assert directories == [data]  # one disk: named by the data dir, not yet made
    remote = local_directories(
        data, "postgresql+psycopg://db/afina", "redis://redis:6379/0", "s3://bucket/afina"
    )
    assert remote == [data]


def test_a_reserve_goes_with_a_sqlite_database_only(tmp_path: Path):
    assert sqlite_directory(f"sqlite:///{tmp_path / 'afina.db'}") == tmp_path
    assert sqlite_reserve("postgresql+psycopg://db/afina", 1024) is None
    assert sqlite_reserve("sqlite:///:memory:", 1024) is None
    assert sqlite_reserve(f"sqlite:///{tmp_path / 'afina.db'}", 0) is None
    reserve = sqlite_reserve(f"sqlite:///{tmp_path / 'afina.db'}", 1024)
    assert reserve is not None
    assert reserve.path == tmp_path / SpaceReserve.NAME


def test_a_write_that_frees_space_is_tried_again_once_with_the_reserve_released(tmp_path):
    reserve = SpaceReserve(tmp_path, 4096)
    assert reserve.ensure()
    assert reserve.path.stat().st_size == 4096
    calls: list[str] = []

    def delete() -> str:
        calls.append("delete")
        if len(calls) == 1:
            raise OperationalError("DELETE ...", {}, sqlite_full())
        return "deleted"

    assert freeing_space(delete, reserve, lambda: calls.append("rollback")) == "deleted"
    assert calls == ["delete", "rollback", "delete"]
    assert not reserve.path.exists()


def test_any_other_error_of_such_a_write_is_raised_as_it_is(tmp_path):
    reserve = SpaceReserve(tmp_path, 4096)
    assert reserve.ensure()

    def delete() -> None:
        raise OperationalError("DELETE ...", {}, sqlite3.OperationalError("database is locked"))

    with pytest.raises(OperationalError, match="locked"):
        freeing_space(delete, reserve, lambda: None)
    assert reserve.path.exists()
