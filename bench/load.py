"""Load `afina serve` as a busy team (or an attacker) would, and print what it costs.

Starts `afina serve` (embedded default, a key set) in a temp dir, uploads a small dataset,
then runs the phases asked for against one read route (`--route job` polls a job, `file`
reads a file object):

    burst N       N requests at once, one connection each; /healthz probed meanwhile
    rate R        open-loop: R requests a second for --seconds, sent on schedule whether or
                  not earlier ones were answered (latency counts from the scheduled time, so
                  a backlog shows); then how long until a poll is back to its idle latency

each while the server is idle, while a job trains on the demo model (`--while training`) or
while a loop uploads a dataset (`--while uploading`). For each it prints the achieved rate,
p50/p95/p99/max latency, the answers by status, timeouts, the slowest /healthz, and the API
process's CPU per answered request (from /proc: the API process alone, not its worker).

The client is a few lines of asyncio over raw keep-alive sockets, so that it costs the
machine little next to the server it measures. Loopback traffic only.

    .venv/bin/python bench/load.py --burst 200 --rate 200 --while idle training uploading
"""

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from train_job import AFINA, afina_serve  # a sibling script: started as bench/load.py

KEY = "sk-bench-load"
TIMEOUT_SECONDS = 10.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


class Connection:
    """One keep-alive HTTP/1.1 connection that sends a prepared request and reads the answer
    (Content-Length bodies only, which is what afina's JSON answers have)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.reused = False  # answered a request before: the server may have closed it since

    @classmethod
    async def open(cls, port: int) -> "Connection":
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def request(self, raw: bytes) -> tuple[int, bool]:
        """The status, and whether the connection can be used again."""
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        await self.reader.readexactly(int(headers.get("content-length", "0")))
        return status, headers.get("connection", "").lower() != "close"

    def close(self) -> None:
        self.writer.close()


def get_request(path: str) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n\r\n"
    ).encode()


@dataclass
class Results:
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    healthz: list[float] = field(default_factory=list)

    def record(self, started: float, status: int | str) -> None:
        self.latencies.append(time.perf_counter() - started)
        self.statuses[str(status)] += 1


async def timed(raw: bytes, port: int, pool: list[Connection], results: Results, started: float):
    connection = pool.pop() if pool else None
    try:
        try:
            if connection is None:
                connection = await Connection.open(port)
            status, reusable = await asyncio.wait_for(connection.request(raw), TIMEOUT_SECONDS)
        except (ConnectionResetError, asyncio.IncompleteReadError):
            if connection is None or not connection.reused:
                raise
            # The server closed this idle keep-alive connection as it was reused: what any
            # HTTP client does then is send the request again on a new one.
            connection.close()
            connection = await Connection.open(port)
            status, reusable = await asyncio.wait_for(connection.request(raw), TIMEOUT_SECONDS)
        results.record(started, status)
        if reusable:
            connection.reused = True
            pool.append(connection)
            connection = None
    except TimeoutError:
        results.record(started, "timeout")
    except (OSError, asyncio.IncompleteReadError, ValueError) as error:
        results.record(started, type(error).__name__)
    finally:
        if connection is not None:
            connection.close()


async def probe_healthz(port: int, results: Results, stop: asyncio.Event) -> None:
    raw = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    pool: list[Connection] = []
    while not stop.is_set():
        probe = Results()
        await timed(raw, port, pool, probe, time.perf_counter())
        results.healthz.append(probe.latencies[0] if probe.statuses.get("200") else 99.0)
        await asyncio.sleep(0.05)
    for connection in pool:
        connection.close()


async def burst(port: int, path: str, count: int) -> Results:
    results = Results()
    stop = asyncio.Event()
    prober = asyncio.create_task(probe_healthz(port, results, stop))
    connections = await asyncio.gather(*(Connection.open(port) for _ in range(count)))
    raw = get_request(path)
    started = time.perf_counter()
    await asyncio.gather(*(timed(raw, port, [c], results, started) for c in connections))
    stop.set()
    await prober
    for connection in connections:
        connection.close()
    return results


async def open_loop(port: int, path: str, rate: float, seconds: float) -> Results:
    results = Results()
    stop = asyncio.Event()
    prober = asyncio.create_task(probe_healthz(port, results, stop))
    raw = get_request(path)
    pool: list[Connection] = []
    tasks = set()
    begin = time.perf_counter()
    for index in range(int(rate * seconds)):
        scheduled = begin + index / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(timed(raw, port, pool, results, scheduled))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)
    stop.set()
    await prober
    for connection in pool:
        connection.close()
    return results


async def seconds_to_normal(port: int, path: str, normal: float, limit: float = 60.0) -> float:
    """Seconds from now until five polls in a row answer 200 within 2x the idle p50 (+2 ms)."""
    raw, pool, began, good = get_request(path), [], time.perf_counter(), 0
    while good < 5 and time.perf_counter() - began < limit:
        probe = Results()
        await timed(raw, port, pool, probe, time.perf_counter())
        ok = probe.statuses.get("200") and probe.latencies[0] <= 2 * normal + 0.002
        good = good + 1 if ok else 0
        await asyncio.sleep(0.02)
    for connection in pool:
        connection.close()
    return time.perf_counter() - began


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else 0.0


def report(label: str, results: Results, wall: float, cpu: float, recovery: float | None):
    answered = sum(n for status, n in results.statuses.items() if status.isdigit())
    ms = [1000 * value for value in results.latencies]
    statuses = " ".join(f"{status}:{n}" for status, n in sorted(results.statuses.items()))
    row = (
        f"{label:<28} {answered / wall:7.1f}/s  p50 {percentile(ms, 0.5):7.1f}  "
        f"p95 {percentile(ms, 0.95):7.1f}  p99 {percentile(ms, 0.99):7.1f}  "
        f"max {max(ms, default=0):7.1f} ms  "
        f"healthz max {1000 * max(results.healthz, default=0):6.1f} ms  "
        f"cpu/req {1000 * cpu / max(answered, 1):5.2f} ms  [{statuses}]"
    )
    if recovery is not None:
        row += f"  normal again after {recovery:.1f} s"
    print(row, flush=True)


def chat_lines(count: int, words: int) -> bytes:
    generator = random.Random(0)
    vocabulary = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    lines = []
    for _ in range(count):
        text = " ".join(generator.choices(vocabulary, k=words))
        chat = [{"role": "user", "content": text}, {"role": "assistant", "content": text}]
        lines.append(json.dumps({"messages": chat}) + "\n")
    return "".join(lines).encode()


class Uploads:
    """Uploads a dataset again and again, with curl (a process of its own, so that it takes
    nothing from the polling client), until stopped; keeps each upload's end-to-end rate."""

    def __init__(self, base: str, dataset: Path) -> None:
        self.command = [
            "curl", "--silent", "--show-error", "--fail", "--output", "/dev/null",
            "--header", f"Authorization: Bearer {KEY}",
            "--form", "purpose=fine-tune", "--form", f"file=@{dataset};type=application/jsonl",
            f"{base}/v1/files",
        ]  # fmt: skip
        self.megabytes = dataset.stat().st_size / 1e6
        self.rates: list[float] = []  # MB/s of each upload, request sent to answer read
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stopping.is_set():
            began = time.perf_counter()
            subprocess.run(self.command, check=True)
            self.rates.append(self.megabytes / (time.perf_counter() - began))

    def __enter__(self) -> "Uploads":
        self.thread.start()
        time.sleep(0.5)  # the first upload is under way
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stopping.set()
        self.thread.join()

    def summary(self) -> str:
        rates = sorted(self.rates)
        return (
            f"{len(rates)} uploads of {self.megabytes:.0f} MB, end to end "
            f"{rates[len(rates) // 2]:.1f} MB/s median, {rates[0]:.1f}-{rates[-1]:.1f}"
            if rates
            else "no upload finished"
        )


def start_training(client: httpx.Client, workdir: Path) -> str:
    model = workdir / "demo-model"
    subprocess.run([AFINA, "demo-model", str(model)], check=True, capture_output=True)
    uploaded = client.post(
        "/v1/files",
        data={"purpose": "fine-tune"},
        files={"file": ("train.jsonl", chat_lines(400, 12), "application/jsonl")},
    )
    uploaded.raise_for_status()
    body = {
        "model": str(model),
        "training_file": uploaded.json()["id"],
        "hyperparameters": {"n_epochs": 50, "batch_size": 4},
    }
    job = client.post("/v1/fine_tuning/jobs", json=body)
    job.raise_for_status()
    job_id = job.json()["id"]
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if client.get(f"/v1/fine_tuning/jobs/{job_id}").json()["progress"]["steps_done"] > 0:
            return job_id
        time.sleep(0.5)
    sys.exit("the training job did not start in 300 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--route", choices=["job", "file"], default="job")
    parser.add_argument("--burst", type=int, nargs="*", default=[100, 200])
    parser.add_argument("--rate", type=float, nargs="*", default=[100, 200])
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument(
        "--while",
        dest="during",
        nargs="+",
        default=["idle"],
        choices=["idle", "training", "uploading"],
    )
    parser.add_argument("--upload-megabytes", type=float, default=200)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="afina-load-") as tmp:
        workdir = Path(tmp)
        with afina_serve(workdir, AFINA_API_KEYS=KEY) as (base, server):
            port = int(base.rsplit(":", 1)[1])
            headers = {"Authorization": f"Bearer {KEY}"}
            with httpx.Client(base_url=base, headers=headers, timeout=60) as client:
                job_id = start_training(client, workdir) if "training" in args.during else None
                small = client.post(
                    "/v1/files",
                    data={"purpose": "fine-tune"},
                    files={"file": ("small.jsonl", chat_lines(10, 5), "application/jsonl")},
                ).json()["id"]
                if args.route == "job" and job_id is None:
                    job_id = client.post(
                        "/v1/fine_tuning/jobs",
                        json={"model": "org/never-trained", "training_file": small},
                    ).json()["id"]
                    client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
            path = f"/v1/fine_tuning/jobs/{job_id}" if args.route == "job" else f"/v1/files/{small}"
            upload = workdir / "upload.jsonl"
            line_bytes = len(chat_lines(100, 20)) / 100
            upload.write_bytes(chat_lines(int(args.upload_megabytes * 1e6 / line_bytes), 20))
            print(f"afina serve pid {server.pid}, {os.cpu_count()} cores, route {path}")
            for during in args.during:
                if during == "training" and job_id is None:
                    continue
                run_phases(during, port, path, server.pid, args, base, upload)


def steps_done(base: str, job_path: str) -> int:
    answer = httpx.get(f"{base}{job_path}", headers={"Authorization": f"Bearer {KEY}"})
    return answer.json()["progress"]["steps_done"]


def run_phases(during, port, path, pid, args, base, upload) -> None:
    idle = asyncio.run(open_loop(port, path, 20, 2))
    normal = percentile(idle.latencies, 0.5)
    training_rate = None
    if during == "training":  # how fast the worker trains with no load, to compare
        first, began = steps_done(base, path), time.perf_counter()
        time.sleep(args.seconds)
        training_rate = (steps_done(base, path) - first) / (time.perf_counter() - began)
        print(f"training: the worker does {training_rate:.2f} steps/s with no load")
    context = Uploads(base, upload) if during == "uploading" else _nothing()
    with context as uploads:
        for count in args.burst:
            cpu, began = cpu_seconds(pid), time.perf_counter()
            results = asyncio.run(burst(port, path, count))
            report(
                f"{during}: burst {count}",
                results,
                time.perf_counter() - began,
                cpu_seconds(pid) - cpu,
                None,
            )
        for rate in args.rate:
            steps = steps_done(base, path) if training_rate else 0
            cpu, began = cpu_seconds(pid), time.perf_counter()
            results = asyncio.run(open_loop(port, path, rate, args.seconds))
            wall, used = time.perf_counter() - began, cpu_seconds(pid) - cpu
            if training_rate:
                loaded = (steps_done(base, path) - steps) / wall
                print(
                    f"training: {loaded:.2f} steps/s under {rate:.0f} req/s "
                    f"({loaded / training_rate:.0%} of its speed with no load)"
                )
            recovery = asyncio.run(seconds_to_normal(port, path, normal))
            label = f"{during}: {rate:.0f} req/s {args.seconds:.0f} s"
            report(label, results, wall, used, recovery)
        if uploads is not None:
            print(f"{during}: {uploads.summary()}")


@contextmanager
def _nothing() -> Iterator[None]:
    yield None


if __name__ == "__main__":
    main()
