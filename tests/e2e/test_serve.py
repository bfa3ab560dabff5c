"""The README's offline flow as a new user runs it: `afina demo-model`, `afina serve` (API and
a worker child, embedded default), then the official openai client from upload to a
fine-tuned model and a chat with it; stopping `afina serve` stops its worker too."""

import json
import os
import socket
import sqlite3
import subprocess
import time

import httpx
import openai

from tests.support import AFINA, afina_serve, child_pids


def registered_workers(base: str) -> list[dict]:
    """The workers `GET /v1/workers` lists, once the embedded one has registered."""
    deadline = time.monotonic() + 60
    while not (listed := httpx.get(f"{base}/v1/workers").json()["data"]):
        assert time.monotonic() < deadline, "the embedded worker never registered"
        time.sleep(0.2)
    return listed


def test_the_offline_flow_from_demo_model_to_fine_tuned_model(tmp_path):
    built = subprocess.run(
        [AFINA, "demo-model", "demo"], cwd=tmp_path, capture_output=True, text=True
    )
    assert built.returncode == 0, built.stderr
    model = str(tmp_path / "demo")
    assert (tmp_path / "demo" / "config.json").is_file()
    lines = [
        {
            "messages": [
                {"role": "user", "content": f"Say {i}"},
                {"role": "assistant", "content": f"{i}"},
            ]
        }
        for i in range(20)
    ]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))

    with afina_serve(tmp_path) as (base, server):
        (worker_pid,) = child_pids(server.pid)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
        with (tmp_path / "train.jsonl").open("rb") as data:
            training_file = client.files.create(file=data, purpose="fine-tune")
        (worker,) = registered_workers(base)
        assert worker["device"]["kind"] == "cpu"
        assert worker["device"]["memory_total"] > 0
        body = {
            "model": model,
            "training_file": training_file.id,
            "hyperparameters": {"n_epochs": 2},
        }
        plan = httpx.post(f"{base}/v1/fine_tuning/jobs/estimate", json=body).json()
        assert plan["fits"]["workers"] == [worker["id"]], plan
        assert plan["estimated_from"] == "flops_model"
        job = client.fine_tuning.jobs.create(
            model=model,
            training_file=training_file.id,
            suffix="demo",
            hyperparameters={"n_epochs": 2},
        )
        deadline = time.monotonic() + 120
        while job.status not in ("succeeded", "failed", "cancelled"):
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-4000:]
            time.sleep(0.5)
            job = client.fine_tuning.jobs.retrieve(job.id)
        assert job.status == "succeeded", job.error
        assert job.fine_tuned_model.startswith(f"ft:{model}:default:demo:")
        assert [job.id for job in client.fine_tuning.jobs.list(limit=5)] == [job.id]
        events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
        assert events[0].message.startswith("Job succeeded")
        checkpoints = list(client.fine_tuning.jobs.checkpoints.list(job.id))
        assert checkpoints[0].step_number == job.to_dict()["progress"]["total_steps"]

        reply = client.chat.completions.create(
            model=job.fine_tuned_model, messages=[{"role": "user", "content": "Say 3"}]
        )
        assert reply.model == job.fine_tuned_model
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert reply.usage.completion_tokens > 0
        assert job.fine_tuned_model in [listed.id for listed in client.models.list()]
        # the worker keeps the throughput it measured: the next estimate uses it
        (worker,) = registered_workers(base)
        (measured,) = worker["throughput"].values()
        assert measured > 0
        plan = httpx.post(f"{base}/v1/fine_tuning/jobs/estimate", json=body).json()
        assert plan["estimated_from"] == "measured_throughput"
    assert server.returncode == 0
    assert not os.path.exists(f"/proc/{worker_pid}"), "the worker outlived afina serve"
    with sqlite3.connect(tmp_path / "data" / "afina.db") as database:
        assert database.execute("SELECT id FROM workers").fetchall() == [], "it stayed registered"


def test_the_worker_stops_when_afina_serve_is_killed(tmp_path):
    with afina_serve(tmp_path) as (_base, server):
        (worker_pid,) = child_pids(server.pid)
        server.kill()
        deadline = time.monotonic() + 30
        while os.path.exists(f"/proc/{worker_pid}") and _state(worker_pid) != "Z":
            assert time.monotonic() < deadline, "the worker outlived a killed afina serve"
            time.sleep(0.2)


def _state(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_sigterm_stops_serve_while_clients_pile_up_and_stall(tmp_path):
    """Slow clients, stalled uploads and a burst of reads in flight: SIGTERM still stops
    `afina serve` by itself, within its graceful shutdown (20 s) and a margin."""
    with afina_serve(tmp_path, "--no-worker") as (base, server):
        port = int(base.rsplit(":", 1)[1])
        stalled = []
        for _ in range(20):  # headers that never end
            connection = socket.create_connection(("127.0.0.1", port))
            connection.sendall(b"GET /v1/files HTTP/1.1\r\nHost: localhost\r\n")
            stalled.append(connection)
        for _ in range(10):  # uploads that stop half way
            connection = socket.create_connection(("127.0.0.1", port))
            connection.sendall(
                b"POST /v1/files HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100000\r\n"
                b"Content-Type: multipart/form-data; boundary=x\r\n\r\n--x\r\n"
            )
            stalled.append(connection)
        reads = []
        for _ in range(100):
            connection = socket.create_connection(("127.0.0.1", port))
            connection.sendall(b"GET /v1/files HTTP/1.1\r\nHost: localhost\r\n\r\n")
            reads.append(connection)
        started = time.monotonic()
        server.terminate()
        server.wait(timeout=45)
        assert time.monotonic() - started < 45
        assert server.returncode == 0
        for connection in stalled + reads:
            connection.close()
