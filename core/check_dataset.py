"""`python -m afina.core.check_dataset PATH MAX_LINE_BYTES`: validate a dataset file in a
process of its own, while it is still being written, and print the report as JSON.

The API starts it for an upload too large to keep in memory (api/uploads.py) as soon as the
upload is written to PATH, so that validation holds none of the API's GIL and runs while the
rest of the upload arrives. The file only grows: each line on stdin says it has grown, the
end of stdin says it is whole. Exit status 0 with the report on stdout, whatever the file
holds; anything else is a failure of the check itself.
"""

import json
import sys
from typing import BinaryIO, cast

from afina.core.datasets import validate_dataset


class GrowingFile:
    """A file read while another process appends to it: `read` waits for more at its end
    until `control` (the writer's pipe) ends."""

    def __init__(self, path: str, control: BinaryIO) -> None:
        self.file = open(path, "rb")  # noqa: SIM115 - closed by `close`
        self.control = control
        self.whole = False

    def read(self, size: int = -1) -> bytes:
        while True:
            data = self.file.read(size)
            if data or self.whole:
                return data
            # At the end of what is written so far: wait until the writer says more.
            self.whole = not self.control.readline()

    def close(self) -> None:
        self.file.close()


def main(argv: list[str]) -> int:
    path, max_line_bytes = argv[0], int(argv[1])
    stream = GrowingFile(path, sys.stdin.buffer)
    try:
        report = validate_dataset(cast(BinaryIO, stream), max_line_bytes=max_line_bytes)
    finally:
        stream.close()
    json.dump(report.as_dict(), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
