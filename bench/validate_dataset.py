"""Throughput and memory of upload validation on a generated chat dataset.

    .venv/bin/python bench/validate_dataset.py [--megabytes 200]

Prints MB/s, examples/s and the peak Python heap while validating: the validator reads
line by line, so the peak should not grow with the file.
"""

import argparse
import json
import tempfile
import time
import tracemalloc
from pathlib import Path

from afina.core.datasets import validate_dataset
from afina.core.settings import Settings


def write_dataset(path: Path, megabytes: int) -> int:
    line = (
        json.dumps(
            {
                "messages": [
                    {"role": "system", "content": "You are a concise assistant."},
                    {"role": "user", "content": "Summarise the plot of a long novel. " * 8},
                    {"role": "assistant", "content": "A hero leaves, learns, returns. " * 12},
                ]
            }
        )
        + "\n"
    ).encode()
    count = megabytes * 1024 * 1024 // len(line)
    with path.open("wb") as out:
        for _ in range(count):
            out.write(line)
    return count


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--megabytes", type=int, default=200)
    args = parser.parse_args()
    max_line_bytes = Settings(_env_file=None).max_line_bytes
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.jsonl"
        lines = write_dataset(path, args.megabytes)
        size = path.stat().st_size
        started = time.perf_counter()
        with path.open("rb") as stream:
            report = validate_dataset(stream, max_line_bytes=max_line_bytes)
        elapsed = time.perf_counter() - started
        tracemalloc.start()  # a second pass: tracemalloc slows Python down
        with path.open("rb") as stream:
            validate_dataset(stream, max_line_bytes=max_line_bytes)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    if not report.ok or report.num_examples != lines:
        raise SystemExit(f"unexpected report: {report}")
    print(f"file            {size / 1e6:.1f} MB, {lines} chat examples")
    print(f"time            {elapsed:.2f} s")
    print(f"throughput      {size / 1e6 / elapsed:.1f} MB/s, {lines / elapsed:,.0f} examples/s")
    print(f"peak heap       {peak / 1e6:.2f} MB")
    print(f"token estimate  {report.estimated_tokens:,}")


if __name__ == "__main__":
    main()
