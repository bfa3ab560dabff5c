"""Generation throughput and latency: N concurrent requests over K adapters, batched vs. one
at a time, through the real HTTP path.

Builds the demo model (or takes `--model DIR`), starts `afina serve` in a temp dir, trains K
small adapters on it, then for each mode restarts the server with that mode's
AFINA_MAX_BATCH_SIZE (1 = one request at a time) and sends N streamed `/v1/completions`
requests at once, round-robin over the adapters, each generating exactly `--tokens` tokens
(`ignore_eos`). It prints tokens/s over the whole burst, and per request the time to the
first token and to the last.

    .venv/bin/python bench/generate.py --requests 32 --adapters 4 --tokens 64
"""

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

AFINA = Path(sys.executable).with_name("afina")
ANSWERS = ["yes", "no", "maybe", "never", "always", "sometimes", "often", "rarely"]


def serve(workdir: Path, port: int, batch_size: int, worker: bool) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "AFINA_DATA_DIR": str(workdir / "data"),
        "AFINA_MAX_BATCH_SIZE": str(batch_size),
        "AFINA_MAX_LOADED_ADAPTERS": "16",
    }
    args = [str(AFINA), "serve", "--port", str(port)] + ([] if worker else ["--no-worker"])
    log = (workdir / f"serve-{batch_size}.log").open("wb")
    server = subprocess.Popen(args, env=env, cwd=workdir, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/healthz").status_code == 200:
                return server
        except httpx.TransportError:
            pass
        if server.poll() is not None:
            sys.exit(f"afina serve exited; see {log.name}")
        time.sleep(0.1)
    sys.exit("afina serve did not come up")


def stop(server: subprocess.Popen[bytes]) -> None:
    server.terminate()
    server.wait(60)


def train_adapters(base: str, model: str, count: int) -> list[str]:
    jobs = []
    for answer in ANSWERS[:count]:
        lines = "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"Question {i}?"},
                        {"role": "assistant", "content": answer},
                    ]
                }
            )
            + "\n"
            for i in range(32)
        )
        file = httpx.post(
            f"{base}/v1/files",
            files={"file": ("data.jsonl", lines.encode())},
            data={"purpose": "fine-tune"},
        ).json()
        job = httpx.post(
            f"{base}/v1/fine_tuning/jobs",
            json={
                "model": model,
                "training_file": file["id"],
                "suffix": answer,
                "method": {
                    "type": "supervised",
                    "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 8}},
                },
            },
        ).json()
        jobs.append(job["id"])
    names = []
    for job_id in jobs:
        while (job := httpx.get(f"{base}/v1/fine_tuning/jobs/{job_id}").json())["status"] in (
            "queued",
            "running",
        ):
            time.sleep(0.5)
        if job["status"] != "succeeded":
            sys.exit(f"job {job_id} ended {job['status']}: {job['error']}")
        names.append(job["fine_tuned_model"])
    return names


async def one_request(client: httpx.AsyncClient, model: str, tokens: int) -> tuple[float, float]:
    """(seconds to the first token, seconds to the end) of one streamed completion."""
    body = {
        "model": model,
        "prompt": "The quick brown fox",
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    start = time.perf_counter()
    first = None
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if first is None and line.startswith("data: {"):
                first = time.perf_counter() - start
    return first or 0.0, time.perf_counter() - start


async def burst(base: str, models: list[str], requests: int, tokens: int) -> dict[str, float]:
    limits = httpx.Limits(max_connections=requests)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:
        await one_request(client, models[0], 2)  # warm: the base and first adapter load
        for model in models:
            await one_request(client, model, 2)
        start = time.perf_counter()
        results = await asyncio.gather(
            *(one_request(client, models[i % len(models)], tokens) for i in range(requests))
        )
        wall = time.perf_counter() - start
    firsts = sorted(r[0] for r in results)
    ends = sorted(r[1] for r in results)
    return {
        "wall_s": wall,
        "tokens_per_s": requests * tokens / wall,
        "first_p50_s": statistics.median(firsts),
        "end_p50_s": statistics.median(ends),
        "end_p95_s": ends[int(0.95 * (len(ends) - 1))],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=4, choices=range(1, len(ANSWERS) + 1))
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16, help="AFINA_MAX_BATCH_SIZE")
    parser.add_argument("--model", help="a local model directory (default: the demo model)")
    parser.add_argument("--port", type=int, default=8431)
    options = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="afina-bench-") as temp:
        workdir = Path(temp)
        model = options.model
        if model is None:
            model = str(workdir / "demo")
            subprocess.run([str(AFINA), "demo-model", model], check=True, capture_output=True)
        base = f"http://127.0.0.1:{options.port}"
        server = serve(workdir, options.port, 1, worker=True)
        try:
            models = train_adapters(base, model, options.adapters)
        finally:
            stop(server)
        print(
            f"{options.requests} concurrent requests over {options.adapters} adapters, "
            f"{options.tokens} tokens each, model {model}"
        )
        print(f"{'mode':<22}{'wall s':>8}{'tok/s':>9}{'first p50':>11}{'end p50':>9}{'p95':>8}")
        for label, batch_size in (
            ("one at a time", 1),
            (f"batched ({options.batch_size})", options.batch_size),
        ):
            server = serve(workdir, options.port, batch_size, worker=False)
            try:
                figures = asyncio.run(burst(base, models, options.requests, options.tokens))
            finally:
                stop(server)
            print(
                f"{label:<22}{figures['wall_s']:>8.2f}{figures['tokens_per_s']:>9.0f}"
                f"{figures['first_p50_s']:>11.2f}{figures['end_p50_s']:>9.2f}"
                f"{figures['end_p95_s']:>8.2f}"
            )


if __name__ == "__main__":
    main()
