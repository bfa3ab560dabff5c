"""Time a tiny fine-tuning job end to end, as a user runs it, and say where the time goes.

Runs `afina demo-model` and `afina serve` (embedded default: SQLite, the SQLite broker and a
worker child) in a temp dir, uploads a chat dataset, creates a job with the openai client and
polls it to `succeeded`, then reads the job's timestamps from the database:

    queue     created -> a worker claimed it (broker polling)
    start-up  claimed -> first training step done (files, tokenizing, loading the model)
    training  first step -> last step
    finish    last step -> succeeded (saving the adapter, the final update)

    .venv/bin/python bench/train_job.py --examples 64 --epochs 3 --jobs 3
"""

import argparse
import json
import os
import random
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from itertools import pairwise
from pathlib import Path

import httpx
import openai

AFINA = Path(sys.executable).with_name("afina")


def dataset(count: int) -> str:
    generator = random.Random(0)
    lines = []
    for _ in range(count):
        a, b = generator.randint(0, 9), generator.randint(0, 9)
        chat = [
            {"role": "user", "content": f"What is {a} + {b}?"},
            {"role": "assistant", "content": f"The answer is {a + b}."},
        ]
        lines.append(json.dumps({"messages": chat}) + "\n")
    return "".join(lines)


def wait_until_up(base: str, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/healthz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        if server.poll() is not None:
            sys.exit("afina serve exited")
        time.sleep(0.1)
    sys.exit("afina serve did not come up")


@contextmanager
def afina_serve(workdir: Path, **variables: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`afina serve` on a free loopback port, embedded (whatever database, broker or storage
    the shell names), with its data in `workdir/data`, its log in `workdir/serve.log` and
    these variables set; its URL and process once it answers. It is stopped at the end
    (killed if SIGTERM has not stopped it in 60 s)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "AFINA_DATA_DIR": str(workdir / "data")}
    for name in ("AFINA_DATABASE_URL", "AFINA_BROKER_URL", "AFINA_STORAGE_URL"):
        env.pop(name, None)
    env |= variables
    with (workdir / "serve.log").open("wb") as log:
        server = subprocess.Popen(
            [AFINA, "serve", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        base = f"http://127.0.0.1:{port}"
        try:
            wait_until_up(base, server)
            yield base, server
        finally:
            server.terminate()
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                print("afina serve did not stop in 60 s after SIGTERM: killed", flush=True)
                server.kill()
                server.wait()


def timings(database: Path, job_id: str) -> dict[str, float]:
    with sqlite3.connect(database) as connection:
        created, started, finished = connection.execute(
            "SELECT created_at, started_at, finished_at FROM jobs WHERE id = ?", (job_id,)
        ).fetchone()
        first, last = connection.execute(
            "SELECT min(at), max(at) FROM job_metrics WHERE job_id = ?", (job_id,)
        ).fetchone()
    moments = [datetime.fromisoformat(v) for v in (created, started, first, last, finished)]
    names = ("queue", "start-up", "training", "finish")
    steps = pairwise(moments)
    spans = {n: (b - a).total_seconds() for n, (a, b) in zip(names, steps, strict=True)}
    spans["total"] = (moments[-1] - moments[0]).total_seconds()
    return spans


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=3, help="jobs run one after the other")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="afina-bench-"))
    subprocess.run([AFINA, "demo-model", str(workdir / "demo")], check=True, capture_output=True)
    (workdir / "train.jsonl").write_text(dataset(args.examples))
    started = time.monotonic()
    with afina_serve(workdir) as (base, _server):
        print(f"afina serve answering after {time.monotonic() - started:.1f} s")
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
        with (workdir / "train.jsonl").open("rb") as data:
            training_file = client.files.create(file=data, purpose="fine-tune")
        hyperparameters = {"n_epochs": args.epochs, "batch_size": args.batch_size}
        print(f"{args.examples} chat examples, {hyperparameters}")
        print("job  steps  queue  start-up  training  finish  total (s)")
        for number in range(1, args.jobs + 1):
            job = client.fine_tuning.jobs.create(
                model=str(workdir / "demo"),
                training_file=training_file.id,
                hyperparameters=hyperparameters,
            )
            while job.status not in ("succeeded", "failed", "cancelled"):
                time.sleep(0.1)
                job = client.fine_tuning.jobs.retrieve(job.id)
            if job.status != "succeeded":
                sys.exit(f"job {job.id} {job.status}: {job.error}")
            spans = timings(workdir / "data" / "afina.db", job.id)
            steps = job.to_dict()["progress"]["steps_done"]
            print(
                f"{number:>3}  {steps:>5}  {spans['queue']:5.2f}  {spans['start-up']:8.2f}"
                f"  {spans['training']:8.2f}  {spans['finish']:6.2f}  {spans['total']:5.2f}"
            )


if __name__ == "__main__":
    main()
