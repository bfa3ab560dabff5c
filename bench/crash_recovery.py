"""Time how `afina serve` gets over a training worker killed in the middle of a job.

Runs `afina demo-model` and `afina serve` (embedded default: SQLite, the SQLite broker and a
worker child) in a temp dir with AFINA_WORKER_TIMEOUT_SECONDS set, trains a tiny job once
without interruption, then the same job again, killing serve's worker child with SIGKILL a
few steps after a checkpoint, and reads from the database where the time went:

    detect   kill -> job queued again (serve sees its worker die and takes the job back)
    claim    queued again -> running again (serve's new worker takes the job)
    resume   running again -> first new step (data, model and trainer state loaded)
    redone   steps done before the kill after the checkpoint resumed from: done twice
    total    created -> succeeded, against the uninterrupted run

    .venv/bin/python bench/crash_recovery.py --worker-timeout 30
"""

import argparse
import json
import os
import signal
import sqlite3
import subprocess
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import openai
import psutil
from train_job import AFINA, afina_serve, dataset


def moment(value: str) -> datetime:
    """A timestamp as the embedded database keeps it (UTC, with or without its zone)."""
    parsed = datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


class Database:
    def __init__(self, path: Path) -> None:
        self.path = path

    def one(self, query: str, *params: object) -> tuple:
        with sqlite3.connect(self.path) as connection:
            return connection.execute(query, params).fetchone()

    def event(self, job_id: str, prefix: str) -> tuple[datetime, dict]:
        """When the job's first event starting with `prefix` was written, and its data."""
        at, data = self.one(
            "SELECT created_at, data FROM job_events WHERE job_id = ? AND message LIKE ? "
            "ORDER BY created_at LIMIT 1",
            job_id,
            prefix + "%",
        )
        return moment(at), json.loads(data or "null") or {}

    def wall_time(self, job_id: str) -> float:
        created, finished = self.one(
            "SELECT created_at, finished_at FROM jobs WHERE id = ?", job_id
        )
        return (moment(finished) - moment(created)).total_seconds()


def the_worker(server: subprocess.Popen[bytes], other_than: int = 0) -> int:
    """serve's worker child, once there is one other than `other_than`."""
    while True:
        children = [p.pid for p in psutil.Process(server.pid).children() if p.pid != other_than]
        if children:
            return children[0]
        time.sleep(0.05)


def run_job(client: openai.OpenAI, model: str, training_file: str, args: argparse.Namespace) -> str:
    job = client.fine_tuning.jobs.create(
        model=model,
        training_file=training_file,
        hyperparameters={"batch_size": args.batch_size},
        extra_body={"training": {"max_steps": args.steps, "save_steps": args.save_steps}},
    )
    return job.id


def steps_done(client: openai.OpenAI, job_id: str) -> tuple[str, int]:
    job = client.fine_tuning.jobs.retrieve(job_id)
    return job.status, job.to_dict()["progress"]["steps_done"]


def wait_for_end(client: openai.OpenAI, job_id: str) -> None:
    while (status := steps_done(client, job_id)[0]) not in ("succeeded", "failed", "cancelled"):
        time.sleep(0.1)
    if status != "succeeded":
        raise SystemExit(f"job {job_id} {status}: {client.fine_tuning.jobs.retrieve(job_id).error}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--worker-timeout",
        type=float,
        default=30,
        help="AFINA_WORKER_TIMEOUT_SECONDS (default: the shipped default, 30)",
    )
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50)  # up to 50: a metric every step
    parser.add_argument("--save-steps", type=int, default=20)
    parser.add_argument(
        "--kill-at", type=int, default=30, help="kill the worker once this step is done"
    )
    args = parser.parse_args()
    if not args.save_steps <= args.kill_at < args.steps:
        parser.error("need --save-steps <= --kill-at < --steps")

    workdir = Path(tempfile.mkdtemp(prefix="afina-bench-"))
    model = str(workdir / "demo")
    subprocess.run([AFINA, "demo-model", model], check=True, capture_output=True)
    (workdir / "train.jsonl").write_text(dataset(args.examples))
    database = Database(workdir / "data" / "afina.db")
    timeout = str(args.worker_timeout)
    with afina_serve(workdir, AFINA_WORKER_TIMEOUT_SECONDS=timeout) as (base, server):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
        with (workdir / "train.jsonl").open("rb") as data:
            training_file = client.files.create(file=data, purpose="fine-tune").id
        print(
            f"AFINA_WORKER_TIMEOUT_SECONDS={args.worker_timeout:g} (heartbeat and reconciler "
            f"every {args.worker_timeout / 6:.1f} s); job: {args.examples} chat examples, "
            f"{args.steps} steps of batch {args.batch_size}, a checkpoint every "
            f"{args.save_steps} steps; serve log: {workdir / 'serve.log'}"
        )
        wait_for_end(client, run_job(client, model, training_file, args))  # warm-up
        plain = run_job(client, model, training_file, args)
        wait_for_end(client, plain)
        started, _ = database.event(plain, "Job started")
        first, last = (
            moment(at)
            for at in database.one(
                "SELECT min(at), max(at) FROM job_metrics WHERE job_id = ?", plain
            )
        )
        print(
            f"uninterrupted: {database.wall_time(plain):.2f} s (running -> first step "
            f"{(first - started).total_seconds():.2f} s, then "
            f"{(last - first).total_seconds() / (args.steps - 1):.3f} s a step)"
        )

        crashed = run_job(client, model, training_file, args)
        while (progress := steps_done(client, crashed))[1] < args.kill_at:
            if progress[0] not in ("queued", "running"):
                raise SystemExit(f"job {crashed} ended ({progress[0]}) before the kill")
            time.sleep(0.05)
        worker = the_worker(server)
        os.kill(worker, signal.SIGKILL)
        killed = datetime.now(UTC)
        killed_clock = time.monotonic()
        new_worker = the_worker(server, other_than=worker)
        new_worker_after = time.monotonic() - killed_clock
        wait_for_end(client, crashed)

        requeued, lost = database.event(crashed, "Worker lost")
        at_kill = lost["step"]  # the dead run's last progress
        (checkpoint,) = database.one(
            "SELECT max(step) FROM job_checkpoints WHERE job_id = ? AND step <= ?",
            crashed,
            at_kill,
        )
        running, _ = database.event(crashed, "Job started (attempt 2)")
        _, resumed = database.event(crashed, "Resuming from the checkpoint")
        first_new_step = moment(
            database.one(
                "SELECT min(at) FROM job_metrics WHERE job_id = ? AND step > ?",
                crashed,
                resumed["step"],
            )[0]
        )
        spans = {
            "detect   kill -> queued again": requeued - killed,
            "claim    queued again -> running again": running - requeued,
            "resume   running again -> first new step": first_new_step - running,
        }
        print(
            f"killed the worker (pid {worker}) at step {at_kill}, last checkpoint at step "
            f"{checkpoint}; serve started another (pid {new_worker}) {new_worker_after:.2f} s "
            "later"
        )
        for name, span in spans.items():
            print(f"  {name:<42} {span.total_seconds():6.2f} s")
        print(
            f"  redone   steps done twice                   {at_kill - resumed['step']:6d}"
            f"  (resumed from step {resumed['step']})"
        )
        total, baseline = database.wall_time(crashed), database.wall_time(plain)
        print(
            f"  total    created -> succeeded              {total:6.2f} s  "
            f"(uninterrupted {baseline:.2f} s: +{total - baseline:.2f} s)"
        )


if __name__ == "__main__":
    main()
