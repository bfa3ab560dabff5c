"""Throughput and memory of upload validation on a generated chat dataset; with `--serve`,
an end-to-end upload through a live `afina serve` while another process polls it.

    .venv/bin/python bench/validate_dataset.py [--megabytes 200] [--shape long|short]
    .venv/bin/python bench/validate_dataset.py --serve --megabytes 200 [--poll-ms 20] [--repeat 3]

Without `--serve` it prints MB/s, examples/s and the peak Python heap while validating in
this process: the validator reads line by line, so the peak should not grow with the file.

With `--serve` it starts `afina serve` (train_job.afina_serve: embedded default, a temp
data dir, loopback only), uploads one small file, then polls `GET /v1/files/{id}` every
`--poll-ms` from a process of its own, first for a few seconds alone, then while this
process uploads the generated file with `POST /v1/files` (`--repeat` times, a pause
before each). It prints each upload's wall time and MB/s (request sent to FileObject
received), the CPU time `afina serve` and its child processes spent meanwhile, and the
polling latency p50/p99/max, idle (in the pause) and during the upload. The machine's other
load shows in the idle figures: compare runs made close together.

`--shape long` is 820-byte chats (64k lines per 50 MB); `--shape short` is 100-byte chats
(a million lines is 100 MB), where the cost per line dominates.
"""

import argparse
import json
import multiprocessing
import os
import statistics
import tempfile
import time
import tracemalloc
from multiprocessing.connection import Connection
from pathlib import Path

import httpx

from afina.core.datasets import validate_dataset
from afina.core.settings import Settings

IDLE_SECONDS = 3.0


def example_line(shape: str) -> bytes:
    if shape == "short":
        messages = [
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "It is 4."},
        ]
    else:
        messages = [
            {"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": "Summarise the plot of a long novel. " * 8},
            {"role": "assistant", "content": "A hero leaves, learns, returns. " * 12},
        ]
    return (json.dumps({"messages": messages}) + "\n").encode()


def write_dataset(path: Path, megabytes: int, shape: str = "long") -> int:
    line = example_line(shape)
    count = megabytes * 1024 * 1024 // len(line)
    batch = 1024
    with path.open("wb") as out:
        for start in range(0, count, batch):
            out.write(line * min(batch, count - start))
    return count


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def poll(url: str, interval: float, control: Connection) -> None:
    """Poll `url` every `interval` seconds until told to stop; send back (start, latency)
    for each request. Runs in a spawned process, so that its timing has a GIL of its own."""
    samples: list[tuple[float, float]] = []
    with httpx.Client(timeout=60) as client:
        control.send("ready")
        following = time.perf_counter()
        while not control.poll():
            started = time.perf_counter()
            response = client.get(url)
            latency = time.perf_counter() - started
            if response.status_code != 200:
                raise SystemExit(f"poll answered {response.status_code}: {response.text}")
            samples.append((started, latency))
            following += interval
            time.sleep(max(0.0, following - time.perf_counter()))
    control.recv()
    control.send(samples)


def describe(label: str, latencies: list[float]) -> None:
    if not latencies:
        print(f"{label:<22}no samples")
        return
    ms = [1000 * latency for latency in latencies]
    print(
        f"{label:<22}n={len(ms)}  p50 {percentile(ms, 0.5):.1f} ms  p99 "
        f"{percentile(ms, 0.99):.1f} ms  max {max(ms):.1f} ms  mean {statistics.fmean(ms):.1f} ms"
    )


def cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU time of a process, and of its children it has waited for (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    own = (int(fields[11]) + int(fields[12])) / tick
    return own, (int(fields[13]) + int(fields[14])) / tick


def serve_and_upload(path: Path, lines: int, poll_ms: float, repeat: int) -> None:
    from train_job import afina_serve  # a sibling script: started as bench/validate_dataset.py

    size = path.stat().st_size
    print(f"file            {size / 1e6:.1f} MB, {lines} chat examples")
    rates, idle, during = [], [], []
    with tempfile.TemporaryDirectory() as tmp, afina_serve(Path(tmp)) as (base, server):
        client = httpx.Client(base_url=base, timeout=600)
        small = client.post(
            "/v1/files",
            data={"purpose": "fine-tune"},
            files={"file": ("small.jsonl", example_line("short"))},
        )
        small.raise_for_status()
        context = multiprocessing.get_context("spawn")
        ours, theirs = context.Pipe()
        poller = context.Process(
            target=poll, args=(f"{base}/v1/files/{small.json()['id']}", poll_ms / 1000, theirs)
        )
        poller.start()
        ours.recv()
        runs = []
        for _ in range(repeat):
            time.sleep(IDLE_SECONDS)
            with path.open("rb") as stream:
                cpu_before = cpu_seconds(server.pid)
                started = time.perf_counter()
                response = client.post(
                    "/v1/files",
                    data={"purpose": "fine-tune"},
                    files={"file": ("train.jsonl", stream, "application/jsonl")},
                )
                ended = time.perf_counter()
                cpu_after = cpu_seconds(server.pid)
            body = response.json()
            if response.status_code != 200 or body["validation"]["num_examples"] != lines:
                raise SystemExit(f"unexpected answer {response.status_code}: {response.text[:500]}")
            client.delete(f"/v1/files/{body['id']}").raise_for_status()
            runs.append((started, ended, cpu_before, cpu_after))
        time.sleep(0.5)
        ours.send("stop")
        samples = ours.recv()
        poller.join()
        client.close()
    previous_end = 0.0
    for number, (started, ended, cpu_before, cpu_after) in enumerate(runs, start=1):
        elapsed = ended - started
        rates.append(size / 1e6 / elapsed)
        api, children = (a - b for a, b in zip(cpu_after, cpu_before, strict=True))
        print(f"--- upload {number}")
        print(f"upload          {elapsed:.2f} s, {rates[-1]:.1f} MB/s end to end")
        print(f"server CPU      {api:.2f} s in afina serve, {children:.2f} s in its children")
        idle.append([lat for at, lat in samples if previous_end + 0.5 <= at < started - 0.1])
        during.append([lat for at, lat in samples if started <= at < ended])
        describe("polling idle", idle[-1])
        describe("polling in upload", during[-1])
        previous_end = ended
    if repeat > 1:
        print(f"--- all {repeat}: median {statistics.median(rates):.1f} MB/s end to end")
        describe("polling idle", [lat for run in idle for lat in run])
        describe("polling in upload", [lat for run in during for lat in run])


def validate_here(path: Path, lines: int) -> None:
    max_line_bytes = Settings(_env_file=None).max_line_bytes
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--megabytes", type=int, default=200)
    parser.add_argument("--shape", choices=["long", "short"], default="long")
    parser.add_argument("--serve", action="store_true", help="upload through `afina serve`")
    parser.add_argument("--poll-ms", type=float, default=20, help="polling period (--serve)")
    parser.add_argument("--repeat", type=int, default=1, help="uploads in a row (--serve)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.jsonl"
        lines = write_dataset(path, args.megabytes, args.shape)
        if args.serve:
            serve_and_upload(path, lines, args.poll_ms, args.repeat)
        else:
            validate_here(path, lines)


if __name__ == "__main__":
    main()
