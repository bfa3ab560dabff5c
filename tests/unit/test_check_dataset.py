"""The dataset check the API runs in a process of its own: it reads a file while the upload
is still being written to it."""

import json
import os
import threading
import time

from afina.core.check_dataset import GrowingFile
from afina.core.datasets import validate_dataset

LINE = json.dumps(
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
)


def test_a_file_checked_while_it_grows_gets_the_report_of_the_whole_file(tmp_path):
    content = (LINE + "\n").encode() * 500 + b"[1]\n" + (LINE + "\n").encode() * 500
    path = tmp_path / "upload"
    path.write_bytes(b"")
    control_out, control_in = os.pipe()

    def write_in_pieces() -> None:
        with path.open("ab") as out:
            for start in range(0, len(content), 7919):  # pieces that cut lines anywhere
                out.write(content[start : start + 7919])
                out.flush()
                os.write(control_in, b"\n")
                time.sleep(0.001)
        os.close(control_in)

    writer = threading.Thread(target=write_in_pieces)
    writer.start()
    with os.fdopen(control_out, "rb") as control:
        growing = GrowingFile(str(path), control)
        report = validate_dataset(growing, max_line_bytes=4096)  # type: ignore[arg-type]
        growing.close()
    writer.join()
    with path.open("rb") as stream:
        whole = validate_dataset(stream, max_line_bytes=4096)
    assert report == whole
    assert (report.num_examples, [(e.line, e.message) for e in report.errors]) == (
        1000,
        [(501, "expected a JSON object, got an array")],
    )
