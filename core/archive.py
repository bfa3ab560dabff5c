"""`.tar.gz` archives of a model folder (a downloaded adapter, a merged export), written
from storage objects or local files under one top-level folder, so that unpacking gives
one directory that `from_pretrained` loads."""

import io
import tarfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import BinaryIO

from afina.core.storage import ArtifactStorage

# Model weights hardly compress: the fastest level costs little in size and much less time.
COMPRESS_LEVEL = 1


@dataclass(frozen=True)
class Member:
    name: str
    size: int
    open: Callable[[], BinaryIO]


def text_member(name: str, text: str) -> Member:
    data = text.encode()
    return Member(name, len(data), lambda: io.BytesIO(data))


def local_members(directory: Path) -> list[Member]:
    return [
        Member(path.name, path.stat().st_size, partial(path.open, "rb"))
        for path in sorted(directory.iterdir())
        if path.is_file()
    ]


def stored_members(storage: ArtifactStorage, key: str, *, skip: Iterable[str] = ()) -> list[Member]:
    """The files directly under `key` in storage, but those named in `skip`."""
    left_out = set(skip)
    return [
        Member(name, storage.size(f"{key}/{name}"), partial(storage.open, f"{key}/{name}"))
        for name in storage.names(key)
        if name not in left_out
    ]


def write_archive(out: BinaryIO, folder: str, members: Iterable[Member]) -> None:
    """Write `members` as `folder/{name}` into a gzipped tar on `out`."""
    now = time.time()
    with tarfile.open(fileobj=out, mode="w:gz", compresslevel=COMPRESS_LEVEL) as archive:
        for member in members:
            info = tarfile.TarInfo(f"{folder}/{member.name}")
            info.size, info.mtime, info.mode = member.size, now, 0o644
            with member.open() as source:
                archive.addfile(info, source)
