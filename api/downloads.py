"""Answering with a stored object, streamed in chunks as a download."""

from collections.abc import Iterator
from typing import BinaryIO
from urllib.parse import quote

from fastapi.responses import StreamingResponse

CHUNK_BYTES = 1024 * 1024


def stream_download(
    stream: BinaryIO, *, size: int, media_type: str, filename: str
) -> StreamingResponse:
    """Stream `stream` (opened by the caller, who answers for a missing object) to the
    client, and close it once sent."""

    def chunks() -> Iterator[bytes]:
        with stream:
            while chunk := stream.read(CHUNK_BYTES):
                yield chunk

    return StreamingResponse(
        chunks(),
        media_type=media_type,
        headers={
            "Content-Length": str(size),
            "Content-Disposition": f"attachment; filename*=UTF-8''{quote(filename)}",
        },
    )
