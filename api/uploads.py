"""The body of `POST /v1/files`: its file written to disk, and validated by a process of its
own, while it arrives.

FastAPI reads a multipart form with Starlette's parser, which spools a file one network
chunk at a time (a thread-pool hop for each) into a temporary file, to be copied into
storage after validation in a thread of the API process, which held the GIL against the
event loop for seconds. The upload route (`UploadRoute`) reads its form here instead, with
python-multipart as Starlette does and the same limits and errors, and keeps its `file`
part as a `StagedUpload`:

- up to `IN_MEMORY_BYTES` and `IN_MEMORY_LINES`, in memory: the route validates it in its
  thread, in milliseconds (bad lines cost most: 1024 of them, about 20 ms), rather than
  pay for a new process (half a second);
- past that, in a staging file (`ArtifactStorage.staging_path`: beside the stored files on
  local storage, so storing it is a rename), written from the thread pool `FLUSH_BYTES` at
  a time, while `python -m afina.core.check_dataset` (`DatasetCheck`) validates the file
  as it grows, in a process of its own: it takes none of the API's GIL, and it has mostly
  caught up when the last byte arrives. At most `MAX_CHECKS` run at once; an upload that
  finds none free is checked once it is whole.

A refused or failed upload leaves nothing: the staging file is removed and its check stopped
when the form is closed (after the response), or at once if the body cannot be read. An
error of the storage while the file is written (a full disk) is kept and raised by the route
(`StagedUpload.report`) as it was raised: inside form parsing, FastAPI would make it a 400.
"""

import codecs
import io
import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import aclosing, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from fastapi import Request, Response
from fastapi.routing import APIRoute
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, Headers, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException

from afina.core.datasets import DatasetReport, validate_dataset
from afina.core.storage import ArtifactStorage

logger = logging.getLogger(__name__)

FILE_FIELD = "file"  # the form field that carries the dataset
STAGING_FOLDER = "files"  # where stored files are: a staging file is renamed into it
IN_MEMORY_BYTES = 1024 * 1024
IN_MEMORY_LINES = 1024
FLUSH_BYTES = 1024 * 1024
MAX_CHECKS = 4 * (os.cpu_count() or 1)
# How much nicer a check runs than the API: it takes a core while a large file arrives, and
# everyone's requests come first (a busy machine validates more slowly, never answers later).
CHECK_NICENESS = 10
_check_slots = threading.BoundedSemaphore(MAX_CHECKS)


def check_niceness() -> int:
    return min(19, os.getpriority(os.PRIO_PROCESS, 0) + CHECK_NICENESS)


class DatasetCheck:
    """`python -m afina.core.check_dataset` on a staging file: validation in a new
    interpreter (never a fork of this threaded process). A line on its stdin says the file
    has grown; the end of its stdin, that it is whole."""

    def __init__(self, path: Path, max_line_bytes: int) -> None:
        # Its own session, as the training worker's: a Ctrl-C at the terminal stops
        # `afina serve`, which stops this. Its arguments are ours: a path and a number.
        self.process = subprocess.Popen(  # noqa: S603
            [sys.executable, "-m", "afina.core.check_dataset", str(path), str(max_line_bytes)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        with suppress(OSError):  # it may have ended already
            os.setpriority(os.PRIO_PROCESS, self.process.pid, check_niceness())
        self._slots: threading.BoundedSemaphore | None = None  # the one `start` took
        self._ended = False

    @classmethod
    def start(cls, path: Path, max_line_bytes: int, *, wait: bool) -> "DatasetCheck | None":
        """A check of the file at `path`; None if all `MAX_CHECKS` run and `wait` is false."""
        slots = _check_slots
        if not slots.acquire(blocking=wait):
            return None
        try:
            check = cls(path, max_line_bytes)
        except BaseException:
            slots.release()
            raise
        check._slots = slots
        return check

    def grew(self) -> None:
        # The check may have ended already (it failed): `report` says so.
        with suppress(BrokenPipeError, ValueError):
            assert self.process.stdin is not None
            self.process.stdin.write(b"\n")
            self.process.stdin.flush()

    def whole(self) -> None:
        with suppress(BrokenPipeError):
            assert self.process.stdin is not None
            self.process.stdin.close()

    def report(self) -> DatasetReport:
        """The verdict on the whole file (it blocks until the check ends)."""
        self.whole()
        try:
            assert self.process.stdout is not None
            output = self.process.stdout.read()
            status = self.process.wait()
        finally:
            self._end()
        if status != 0:
            raise RuntimeError(f"the dataset check exited with status {status}")
        return DatasetReport.from_dict(json.loads(output))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._end()

    def _end(self) -> None:
        if not self._ended:
            self._ended = True
            for pipe in (self.process.stdin, self.process.stdout):
                if pipe is not None:
                    with suppress(BrokenPipeError):
                        pipe.close()
            if self._slots is not None:
                self._slots.release()


class StagedUpload(UploadFile):
    """The `file` part of the upload form: in memory while it is small, else a staging file
    that a `DatasetCheck` validates as it is written. The route takes its `report`, then
    `publish`es it or leaves it; `close` (the form's, after the response) removes what is
    left."""

    def __init__(
        self, filename: str, headers: Headers, storage: ArtifactStorage, max_line_bytes: int
    ) -> None:
        super().__init__(io.BytesIO(), size=0, filename=filename, headers=headers)
        self._storage = storage
        self._max_line_bytes = max_line_bytes
        self.path: Path | None = None  # the staging file, once the part is too large
        self._out: BinaryIO | None = None
        self._check: DatasetCheck | None = None
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._lines = 0  # while in memory
        self._storage_error: OSError | None = None
        self._discarded = False

    @property
    def staged(self) -> bool:
        return self.path is not None or self._storage_error is not None

    async def write(self, data: bytes) -> None:
        assert self.size is not None
        self.size += len(data)
        if self._discarded:
            return
        if not self.staged and not self._pending:
            self._lines += data.count(b"\n")
            if self.size <= IN_MEMORY_BYTES and self._lines <= IN_MEMORY_LINES:
                self.file.write(data)
                return
        self._pending.append(data)
        self._pending_bytes += len(data)
        if self._pending_bytes >= FLUSH_BYTES:
            await self._flush(last=False)

    async def finish(self) -> None:
        """The part has ended."""
        if self._discarded:
            return
        if self.staged or self._pending:
            await self._flush(last=True)
        else:
            self.file.seek(0)

    async def _flush(self, *, last: bool) -> None:
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        await run_in_threadpool(self._write_out, pending, last)

    def _write_out(self, pending: list[bytes], last: bool) -> None:
        if self._storage_error is None:
            try:
                if self._out is None:
                    self._stage()
                assert self._out is not None
                self._out.writelines(pending)
                self._out.flush()
                if last:
                    self._out.close()
            except OSError as error:  # raised again by `report`, so that handlers see it
                self._storage_error = error
                self.discard()
        if self._check is not None and last:
            self._check.whole()
        elif self._check is not None:
            self._check.grew()

    def _stage(self) -> None:
        self.path = self._storage.staging_path(STAGING_FOLDER)
        self._out = self.path.open("wb")
        self._out.write(self.file.getvalue())  # type: ignore[attr-defined]
        self.file = io.BytesIO()
        try:
            self._check = DatasetCheck.start(self.path, self._max_line_bytes, wait=False)
        except OSError:  # no process now: `report` starts one once the file is whole
            logger.exception("could not start a dataset check while %s arrived", self.path)

    def report(self) -> DatasetReport:
        """Validate the whole file (blocking: from a thread). Raises the storage error that
        stopped the file being written, if one did."""
        if self._storage_error is not None:
            raise self._storage_error
        if self.path is None:
            self.file.seek(0)
            return validate_dataset(self.file, max_line_bytes=self._max_line_bytes)
        if self._check is None:
            self._check = DatasetCheck.start(self.path, self._max_line_bytes, wait=True)
            assert self._check is not None
        return self._check.report()

    def publish(self, key: str) -> None:
        """Store the file under `key` (once `report` has passed it)."""
        if self.path is None:
            with self._storage.atomic_write(key) as out:
                out.write(self.file.getvalue())  # type: ignore[attr-defined]
        else:
            self._storage.publish(self.path, key)
            self.path = None

    def discard(self) -> None:
        """Stop the check and remove the staging file, unless published; idempotent."""
        self._discarded = True
        if self._check is not None:
            self._check.stop()
            self._check = None
        if self._out is not None:
            with suppress(OSError):  # a write that failed on a full disk fails again here
                self._out.close()
            self._out = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None
        self.file.close()

    async def close(self) -> None:
        await run_in_threadpool(self.discard)


@dataclass
class _Part:
    content_disposition: bytes = b""
    name: str = ""
    data: bytearray = field(default_factory=bytearray)
    upload: UploadFile | None = None
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)


class _FormParser:
    """Starlette's MultiPartParser (same limits, same errors, same form), but for where a
    file goes: the `file` part into a `StagedUpload`; any other file part is counted and
    dropped (the route reads no other); a second `file` part replaces the first, as in
    FastAPI, which takes the last."""

    def __init__(
        self,
        headers: Headers,
        storage: ArtifactStorage,
        max_line_bytes: int,
        *,
        max_files: int | float,
        max_fields: int | float,
        max_part_size: int,
    ) -> None:
        self.headers = headers
        self.storage = storage
        self.max_line_bytes = max_line_bytes
        self.max_files = max_files
        self.max_fields = max_fields
        self.max_part_size = max_part_size
        self.items: list[tuple[str, str | UploadFile]] = []
        self.uploads: list[StagedUpload] = []  # every one made, whether its part ended or not
        self._files = 0
        self._fields = 0
        self._charset = "utf-8"
        self._part = _Part()
        self._header_name = b""
        self._header_value = b""
        self._to_write: list[tuple[UploadFile, bytes]] = []
        self._to_finish: list[UploadFile] = []

    def _decode(self, data: bytes | bytearray) -> str:
        try:
            return data.decode(self._charset)
        except (UnicodeDecodeError, LookupError):
            return data.decode("latin-1")

    def on_part_begin(self) -> None:
        self._part = _Part()

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._part.upload is None:
            if len(self._part.data) + len(chunk) > self.max_part_size:
                raise MultiPartException(
                    f"Part exceeded maximum size of {int(self.max_part_size / 1024)}KB."
                )
            self._part.data.extend(chunk)
        else:
            self._to_write.append((self._part.upload, chunk))

    def on_part_end(self) -> None:
        if self._part.upload is None:
            self.items.append((self._part.name, self._decode(self._part.data)))
        else:
            self._to_finish.append(self._part.upload)
            self.items.append((self._part.name, self._part.upload))

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        name = self._header_name.lower()
        if name == b"content-disposition":
            self._part.content_disposition = self._header_value
        self._part.headers.append((name, self._header_value))
        self._header_name = b""
        self._header_value = b""

    def on_headers_finished(self) -> None:
        _disposition, options = parse_options_header(self._part.content_disposition)
        try:
            self._part.name = self._decode(options[b"name"])
        except KeyError:
            raise MultiPartException(
                'The Content-Disposition header field "name" must be provided.'
            ) from None
        if b"filename" not in options:
            self._fields += 1
            if self._fields > self.max_fields:
                raise MultiPartException(
                    f"Too many fields. Maximum number of fields is {self.max_fields}."
                )
            return
        self._files += 1
        if self._files > self.max_files:
            raise MultiPartException(
                f"Too many files. Maximum number of files is {self.max_files}."
            )
        filename = self._decode(options[b"filename"])
        headers = Headers(raw=self._part.headers)
        if self._part.name != FILE_FIELD:
            self._part.upload = _DroppedUpload(filename, headers)
            return
        for earlier in self.uploads:  # FastAPI takes the last `file`
            earlier.discard()
        upload = StagedUpload(filename, headers, self.storage, self.max_line_bytes)
        self.uploads.append(upload)
        self._part.upload = upload

    async def parse(self, stream: AsyncIterator[bytes]) -> FormData:
        _, params = parse_options_header(self.headers["Content-Type"])
        charset = params.get(b"charset", "utf-8")
        if isinstance(charset, bytes):
            charset = charset.decode("latin-1")
        try:
            self._charset = codecs.lookup(charset).name
        except LookupError:
            self._charset = "latin-1"
        try:
            boundary = params[b"boundary"]
        except KeyError:
            raise MultiPartException("Missing boundary in multipart.") from None
        callbacks: Any = {
            name: getattr(self, name)
            for name in (
                "on_part_begin",
                "on_part_data",
                "on_part_end",
                "on_header_field",
                "on_header_value",
                "on_header_end",
                "on_headers_finished",
            )
        }
        try:
            parser = MultipartParser(boundary, callbacks)
            async for chunk in stream:
                parser.write(chunk)
                for upload, data in self._to_write:
                    await upload.write(data)
                for upload in self._to_finish:
                    if isinstance(upload, StagedUpload):
                        await upload.finish()
                self._to_write.clear()
                self._to_finish.clear()
            parser.finalize()
        except BaseException as error:
            for upload in self.uploads:
                upload.discard()
            if isinstance(error, FormParserError):
                raise MultiPartException("Invalid multipart data.") from error
            raise
        kept = {id(value) for _name, value in self.items}
        for upload in self.uploads:  # a part the body never ended is not in the form
            if id(upload) not in kept:
                upload.discard()
        return FormData(self.items)


class _DroppedUpload(UploadFile):
    """A file part the route does not read: counted, not kept."""

    def __init__(self, filename: str, headers: Headers) -> None:
        super().__init__(io.BytesIO(), size=0, filename=filename, headers=headers)

    async def write(self, data: bytes) -> None:
        assert self.size is not None
        self.size += len(data)


class _UploadRequest(Request):
    async def _get_form(
        self,
        *,
        max_files: int | float = 1000,
        max_fields: int | float = 1000,
        max_part_size: int = 1024 * 1024,
    ) -> FormData:
        content_type, _ = parse_options_header(self.headers.get("Content-Type"))
        if self._form is None and content_type == b"multipart/form-data":
            parser = _FormParser(
                self.headers,
                self.app.state.storage,
                self.app.state.settings.max_line_bytes,
                max_files=max_files,
                max_fields=max_fields,
                max_part_size=max_part_size,
            )
            try:
                async with aclosing(self.stream()) as stream:
                    self._form = await parser.parse(stream)
            except MultiPartException as error:
                raise HTTPException(status_code=400, detail=error.message) from error
        return await super()._get_form(
            max_files=max_files, max_fields=max_fields, max_part_size=max_part_size
        )


class UploadRoute(APIRoute):
    """A route whose multipart form is read by `_FormParser`: its `file` parameter is a
    `StagedUpload`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def handle_upload(request: Request) -> Response:
            return await handle(_UploadRequest(request.scope, request.receive))

        return handle_upload
