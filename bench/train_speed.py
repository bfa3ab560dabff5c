"""Training speed, side by side: the notebook QLoRA recipe as a bare script, and the same
data through real afina jobs (API -> queue -> worker), on the same model, epochs and batch.

The recipe is the widely copied Llama-2 guanaco QLoRA tutorial: 4-bit NF4 without double
quant (compute dtype float16 on a GPU, float32 on the CPU), LoRA r=64, alpha=16, dropout 0.1
on peft's default modules (q_proj, v_proj), batch 4, paged AdamW 32-bit (plain AdamW on the
CPU), lr 2e-4 constant, weight decay 0.001, max grad norm 0.3, no gradient checkpointing, no
packing, trl's SFTTrainer on a `text` field. Three runs per dataset:

    recipe          the bare script, in a process of its own
    afina           a job with afina's defaults: what a user sees
    afina (recipe)  a job with the recipe's LoRA, quantization and optimizer settings: what
                    afina's engine adds or costs on the same work

Each job runs on an `afina serve` of its own (embedded stack), posted once its worker is up.
For each run: time to adapter (load, tokenize, train, save; for a job POST -> `succeeded`),
non-pad tokens/s over the training loop and per CPU-second (all threads: the figure to
compare on a CPU that others share), peak memory (GPU: `torch.cuda.max_memory_allocated`;
CPU: the process's peak RSS, both from the start of training), and on a GPU the MFU (LoRA
training FLOPs over the GPU's dense bf16 peak); then each job's fixed overhead (POST -> first
step, last step -> `succeeded`) and the ratios to the recipe.

Without --model it builds a random-weight Llama: hidden 256, 4 layers on the CPU; on a GPU
~1B (hidden 2048, 16 layers, 32 heads / 8 KV heads, intermediate 8192, vocab 128256) so the
LM head costs what it costs in real models. Data: guanaco-like text rows (log-normal lengths,
median ~360 tokens, at most 1,024), and short chats.

    .venv/bin/python bench/train_speed.py                      # 200 guanaco rows, 1 epoch
    .venv/bin/python bench/train_speed.py --threads 1 --data guanaco,chats --repeat 3
    .venv/bin/python bench/train_speed.py --also training.padding_free=false  # a piece off
"""

import argparse
import json
import math
import os
import random
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from train_job import afina_serve

from afina.core.estimate import GPU_PEAK_FLOPS
from afina.core.estimate import ModelShape as EstimatedShape
from afina.worker.demo_model import ModelShape, build_demo_model

SMALL = ModelShape(
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
)
ONE_B = ModelShape(
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=4096,
    vocab_size=128256,
)
MAX_LENGTH = 1024
RECIPE_LORA = {"r": 64, "target_modules": ["q_proj", "v_proj"]}
TEXT = (
    "the model learns a task from examples and answers questions about data training loss "
    "adapter weights quantized layer attention token sequence batch step gradient optimizer "
    "what is capital france paris please translate sentence into french hello world yes no"
)


# ----------------------------------------------------------------------------- data


def _words_to_tokens(tokenizer: Any, generator: random.Random, length: int) -> str:
    """Random words cut to `length` tokens, as text."""
    words = TEXT.split(" ")
    text = " ".join(generator.choice(words) for _ in range(length))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:length]
    return tokenizer.decode(ids)


def guanaco_rows(tokenizer: Any, count: int, seed: int = 0) -> list[dict[str, Any]]:
    """`text` rows with openassistant-guanaco-like lengths: log-normal, median ~360 tokens,
    cut to 1,024."""
    generator = random.Random(seed)
    rows = []
    for _ in range(count):
        length = min(MAX_LENGTH - 2, max(24, round(generator.lognormvariate(math.log(360), 0.7))))
        human = _words_to_tokens(tokenizer, generator, length // 3)
        assistant = _words_to_tokens(tokenizer, generator, length - length // 3 - 8)
        rows.append({"text": f"### Human: {human}### Assistant: {assistant}"})
    return rows


def chat_rows(tokenizer: Any, count: int, seed: int = 0) -> list[dict[str, Any]]:
    """Short chats: a question of 8-40 tokens and an answer of 4-60."""
    generator = random.Random(seed)
    return [
        {
            "messages": [
                {"role": "user", "content": _words_to_tokens(tokenizer, generator, q)},
                {"role": "assistant", "content": _words_to_tokens(tokenizer, generator, a)},
            ]
        }
        for q, a in ((generator.randint(8, 40), generator.randint(4, 60)) for _ in range(count))
    ]


def as_text(tokenizer: Any, row: dict[str, Any]) -> dict[str, str]:
    """The recipe trains on a `text` field: a chat rendered with the chat template."""
    if "text" in row:
        return row
    return {"text": tokenizer.apply_chat_template(row["messages"], tokenize=False)}


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# ----------------------------------------------------------------------------- FLOPs


def lora_training_flops(config: dict[str, Any], lengths: list[int], lora: dict[str, Any]) -> float:
    """Model FLOPs of one LoRA pass over examples of these lengths (no recomputation), as
    afina's estimate counts them (`ModelShape.training_flops`)."""
    shape = EstimatedShape.of(config)
    assert shape is not None
    adapter = shape.lora_parameters(lora["r"], lora["target_modules"])
    return shape.training_flops(lengths, lora_parameters=adapter, checkpointing=False)


def gpu_peak_flops() -> float | None:
    import torch

    name = torch.cuda.get_device_name()
    return next((peak for key, peak in GPU_PEAK_FLOPS if key in name), None)


# ----------------------------------------------------------------------------- the recipe


def recipe_child(args: argparse.Namespace) -> None:
    """The notebook recipe, as a bare script; prints its figures as JSON on the last line."""
    started = time.monotonic()
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        TrainerCallback,
    )
    from trl import SFTConfig, SFTTrainer

    from afina.worker.training.memory import peak_memory, reset_peak_memory

    cuda = torch.cuda.is_available()
    imported = time.monotonic()
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.float16 if cuda else torch.float32,
        bnb_4bit_use_double_quant=False,
    )
    model = AutoModelForCausalLM.from_pretrained(
        args.model, quantization_config=quantization, device_map={"": 0} if cuda else None
    )
    model.config.use_cache = False
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    rows = [json.loads(line) for line in Path(args.recipe_child).read_text().splitlines()]
    dataset = Dataset.from_list([as_text(tokenizer, row) for row in rows])
    lora = LoraConfig(r=64, lora_alpha=16, lora_dropout=0.1, bias="none", task_type="CAUSAL_LM")
    training = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix="recipe-"),
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        optim="paged_adamw_32bit" if cuda else "adamw_torch",
        save_strategy="no",
        logging_steps=25,
        learning_rate=2e-4,
        weight_decay=0.001,
        fp16=False,
        bf16=False,
        max_grad_norm=0.3,
        warmup_steps=0.03,
        lr_scheduler_type="constant",
        gradient_checkpointing=False,
        packing=False,
        dataset_text_field="text",
        max_length=MAX_LENGTH,
        report_to="none",
        disable_tqdm=True,
        use_cpu=not cuda,
        include_num_input_tokens_seen="non_padding",
    )

    class Clock(TrainerCallback):
        def on_train_begin(self, *_: Any, **__: Any) -> None:
            reset_peak_memory()
            self.began, self.cpu_began = time.monotonic(), time.process_time()

        def on_train_end(self, *_: Any, **__: Any) -> None:
            self.seconds = time.monotonic() - self.began
            self.cpu_seconds = time.process_time() - self.cpu_began

    clock = Clock()
    trainer = SFTTrainer(
        model=model,
        train_dataset=dataset,
        peft_config=lora,
        processing_class=tokenizer,
        args=training,
        callbacks=[clock],
    )
    trainer.train()
    trainer.model.save_pretrained(Path(training.output_dir) / "adapter")
    memory, _ = peak_memory()
    lengths = [len(row["input_ids"]) for row in trainer.train_dataset]
    print(
        json.dumps(
            {
                "time_to_adapter": time.monotonic() - imported,
                "imports": imported - started,
                "train_seconds": clock.seconds,
                "cpu_seconds": clock.cpu_seconds,
                "tokens": trainer.state.num_input_tokens_seen,
                "peak_memory": memory,
                "lengths": lengths,
            }
        )
    )


def run_recipe(args: argparse.Namespace, data: Path) -> dict[str, Any]:
    command = [sys.executable, __file__, "--recipe-child", str(data), "--model", str(args.model)]
    command += ["--epochs", str(args.epochs), "--batch-size", str(args.batch_size)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        sys.exit(f"the recipe failed:\n{done.stderr[-4000:]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    figures["tokens_per_second"] = figures["tokens"] / figures["train_seconds"]
    return figures


# ----------------------------------------------------------------------------- afina jobs


def _set(body: dict[str, Any], assignment: str) -> None:
    """`training.padding_free=false` -> body["training"]["padding_free"] = False."""
    path, _, value = assignment.partition("=")
    *parents, key = path.split(".")
    for parent in parents:
        body = body.setdefault(parent, {})
    body[key] = json.loads(value)


def job_bodies(args: argparse.Namespace, cuda: bool) -> dict[str, dict[str, Any]]:
    base = {"model": str(args.model), "seed": 0}
    base["hyperparameters"] = {"n_epochs": args.epochs, "batch_size": args.batch_size}
    recipe = {
        **base,
        "lora": {"r": 64, "alpha": 16, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]},
        "quantization": {
            "bits": 4,
            "quant_type": "nf4",
            "double_quant": False,
            "compute_dtype": "float16" if cuda else "float32",
        },
        "training": {
            "learning_rate": 2e-4,
            "weight_decay": 0.001,
            "max_grad_norm": 0.3,
            "warmup_ratio": 0.03,
            "lr_scheduler": "constant",
            "max_seq_length": MAX_LENGTH,
        },
    }
    bodies = {"afina": json.loads(json.dumps(base)), "afina (recipe)": recipe}
    for body in bodies.values():
        for assignment in args.set:
            _set(body, assignment)
    for variant in args.also:  # afina's defaults with a piece switched
        body = json.loads(json.dumps(bodies["afina"]))
        for assignment in variant.split():
            _set(body, assignment)
        bodies[f"afina {variant}"] = body
    return bodies


def _moment(value: str) -> datetime:
    return datetime.fromisoformat(value)


def job_figures(database: Path, job_id: str) -> dict[str, Any]:
    """A finished job's figures, from its rows."""
    with sqlite3.connect(database) as connection:
        created, finished, tokens = connection.execute(
            "SELECT created_at, finished_at, trained_tokens FROM jobs WHERE id = ?", (job_id,)
        ).fetchone()
        events = connection.execute(
            "SELECT created_at, message, data FROM job_events WHERE job_id = ?", (job_id,)
        ).fetchall()
        (last_step,) = connection.execute(
            "SELECT max(at) FROM job_metrics WHERE job_id = ?", (job_id,)
        ).fetchone()
    began = next(_moment(at) for at, text, _ in events if text.startswith("Training start"))
    (done,) = [json.loads(data) for _, text, data in events if text.startswith("Training done")]
    return {
        "time_to_adapter": (_moment(finished) - _moment(created)).total_seconds(),
        "tokens": tokens,
        "tokens_per_second": done["tokens_per_second"],
        "cpu_seconds": done["cpu_seconds"],
        "peak_memory": done["peak_memory_bytes"],
        "start_up": (began - _moment(created)).total_seconds(),
        "finish": (_moment(finished) - _moment(last_step)).total_seconds(),
    }


def run_job(workdir: Path, data: Path, body: dict[str, Any]) -> dict[str, Any]:
    """One job on a worker of its own, already up when the job is posted: its peak RSS is
    this job's, not what earlier jobs left in the process."""
    workdir.mkdir(parents=True)
    with afina_serve(workdir) as (base, _server), httpx.Client(base_url=f"{base}/v1") as client:
        wait_for_worker(workdir / "serve.log")
        with data.open("rb") as stream:
            uploaded = client.post(
                "/files", files={"file": stream}, data={"purpose": "fine-tune"}, timeout=60
            ).json()
        response = client.post("/fine_tuning/jobs", json={**body, "training_file": uploaded["id"]})
        if response.status_code != 200:
            sys.exit(f"job refused: {response.text}")
        job = response.json()
        while job["status"] not in ("succeeded", "failed", "cancelled"):
            time.sleep(0.05)
            job = client.get(f"/fine_tuning/jobs/{job['id']}").json()
    if job["status"] != "succeeded":
        sys.exit(f"job {job['id']} {job['status']}: {job['error']}")
    figures = job_figures(workdir / "data" / "afina.db", job["id"])
    figures["config"] = job["config"]
    return figures


def wait_for_worker(log: Path) -> None:
    """Until the worker child of `afina serve` consumes its queue (Celery logs "ready")."""
    deadline = time.monotonic() + 120
    while "ready." not in log.read_text(errors="replace"):
        if time.monotonic() > deadline:
            sys.exit(f"the worker never came up: see {log}")
        time.sleep(0.1)


# ----------------------------------------------------------------------------- report


def _median(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the median tokens/s."""
    return sorted(rounds, key=lambda figures: figures["tokens_per_second"])[len(rounds) // 2]


def _per_cpu_second(figures: dict[str, Any]) -> float:
    return figures["tokens"] / figures["cpu_seconds"]


def _row(
    name: str, figures: dict[str, Any], flops: float | None, peak: float | None, width: int
) -> str:
    mfu = ""
    if flops is not None and peak:
        seconds = figures["tokens"] / figures["tokens_per_second"]
        mfu = f"  {100 * flops / seconds / peak:5.1f}%"
    return (
        f"  {name:<{width}} {figures['time_to_adapter']:8.1f} s"
        f"  {figures['tokens_per_second']:9.0f}  {_per_cpu_second(figures):12.0f}"
        f"  {figures['peak_memory'] / 2**30:7.2f} GiB{mfu}"
    )


def report(
    name: str,
    results: dict[str, dict[str, Any]],
    config: dict[str, Any],
    peak: float | None,
) -> None:
    """The table, each job's fixed overhead, then the ratios to the recipe. tokens per
    CPU-second (all threads) is the figure to compare on a CPU that others share: it does not
    count the time the runs waited for a core."""
    recipe = results.get("recipe")
    lengths = recipe["lengths"] if recipe else None
    width = max(map(len, results)) + 2
    print(f"\n{name}")
    header = f"  {'run':<{width}} to adapter   tokens/s  tokens/cpu-s  peak memory"
    print(header + "  MFU" * bool(peak))
    for run, figures in results.items():
        flops = None
        if lengths is not None and peak:
            lora = figures["config"]["lora"] if "config" in figures else RECIPE_LORA
            flops = lora_training_flops(config, lengths, lora) * figures.get("epochs", 1)
        print(_row(run, figures, flops, peak, width))
    for run, figures in results.items():
        if run != "recipe":
            print(
                f"  {run} overhead: {figures['start_up']:.2f} s POST -> first step, "
                f"{figures['finish']:.2f} s last step -> succeeded"
            )
    if recipe:
        for run, figures in results.items():
            if run != "recipe":
                speed = recipe["time_to_adapter"] / figures["time_to_adapter"]
                throughput = figures["tokens_per_second"] / recipe["tokens_per_second"]
                per_cpu = _per_cpu_second(figures) / _per_cpu_second(recipe)
                print(
                    f"  {run} / recipe: {speed:.2f}x time to adapter, {throughput:.2f}x "
                    f"tokens/s, {per_cpu:.2f}x tokens/cpu-s"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a local model directory (default: built)")
    parser.add_argument("--rows", type=int, default=200, help="guanaco-like rows")
    parser.add_argument("--chats", type=int, default=400, help="short chat rows")
    parser.add_argument("--data", default="guanaco", help="guanaco, chats or 'guanaco,chats'")
    parser.add_argument("--runs", default="recipe,afina,afina (recipe)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--set", action="append", default=[], help="job field=JSON, every job")
    parser.add_argument(
        "--also",
        action="append",
        default=[],
        help="one more job: the defaults with 'field=JSON [field=JSON ...]'",
    )
    parser.add_argument("--repeat", type=int, default=1, help="rounds; the median is shown")
    parser.add_argument(
        "--threads", type=int, help="CPU threads of every run (OMP_NUM_THREADS); one is steadiest"
    )
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak")
    parser.add_argument("--recipe-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.recipe_child:
        recipe_child(args)
        return

    if args.threads:  # before torch starts, here and in every process started from here
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch
    from transformers import AutoConfig, AutoTokenizer

    cuda = torch.cuda.is_available()
    workdir = Path(tempfile.mkdtemp(prefix="afina-speed-"))
    if args.model is None:
        shape = ONE_B if cuda else SMALL
        print(f"building a random-weight Llama: {shape}")
        args.model = build_demo_model(
            workdir / "model", shape=shape, dtype="bfloat16" if cuda else "float32"
        )
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model_config = AutoConfig.from_pretrained(args.model).to_dict()
    peak = args.peak_tflops * 1e12 if args.peak_tflops else (gpu_peak_flops() if cuda else None)
    device = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(
        f"{device}; {args.epochs} epoch(s), batch {args.batch_size}, median of {args.repeat} "
        f"round(s); every job: {args.set}"
    )
    if cuda and peak is None:
        print("unknown GPU peak: give --peak-tflops for the MFU")
    datasets = {
        "guanaco": lambda: guanaco_rows(tokenizer, args.rows),
        "chats": lambda: chat_rows(tokenizer, args.chats),
    }
    runs = [*args.runs.split(","), *(f"afina {variant}" for variant in args.also)]
    for name in args.data.split(","):
        data = write_jsonl(workdir / f"{name}.jsonl", datasets[name]())
        rounds: dict[str, list[dict[str, Any]]] = {run: [] for run in runs}
        for round_ in range(args.repeat):  # the runs take turns: a busy spell hits them all
            if "recipe" in runs:
                rounds["recipe"].append(run_recipe(args, data))
            for number, (run, body) in enumerate(job_bodies(args, cuda).items()):
                if run in runs:
                    serve = workdir / f"{name}-{round_}-{number}"
                    rounds[run].append(run_job(serve, data, body))
        results = {run: _median(figures) for run, figures in rounds.items() if figures}
        for figures in results.values():
            figures["epochs"] = args.epochs
        rows = len(data.read_text().splitlines())
        report(f"{name} ({rows} rows)", results, model_config, peak)
    config = results.get("afina", {}).get("config")
    if config:
        print(f"\nafina's resolved config: {json.dumps(config)}")


if __name__ == "__main__":
    main()
