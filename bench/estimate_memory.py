"""The memory estimate against what a real run takes: afina's training code on a random-weight
Llama, each configuration in a process of its own, and the estimate's memory for it
(`core.estimate.memory`, what `POST .../estimate` answers with, here with the run's settings
given directly).

Measured: on a GPU `torch.cuda.max_memory_allocated` over the run (what the estimate
counts); on the CPU the process's peak resident set during training less its resident set
before the model was loaded (Python, torch and the libraries are not the run's). Printed per
configuration: the estimate's total, the measured peak, and their ratio; then what three more
examples a step add (batch 4 less batch 1), estimated and measured: the part of the estimate
that grows with the tokens of a step, without the fixed costs a CPU process adds.

    .venv/bin/python bench/estimate_memory.py                  # CPU: hidden 512, 8 layers
    .venv/bin/python bench/estimate_memory.py --hidden 2048 --layers 16 --lengths 512 1024 2048
"""

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

CONFIGS = {  # name -> (quantization bits, batch size, gradient checkpointing)
    "lora fp32, batch 1": (None, 1, False),
    "lora fp32, batch 4": (None, 4, False),
    "lora fp32, batch 4, checkpointing": (None, 4, True),
    "qlora 4-bit, batch 4": (4, 4, False),
}
STEPS = 3


def rss(field: str) -> int:
    found = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(found.group(1)) * 1024 if found else 0


class Recorder:
    """The run's reporter: keeps the "Training done" event's figures."""

    def __init__(self) -> None:
        self.done: dict[str, Any] = {}

    def event(self, message: str, *, data: dict[str, Any] | None = None) -> None:
        if message.startswith("Training done"):
            self.done = data or {}

    def configured(self, config: Any) -> None: ...

    def tokenized(self, name: str, directory: Path) -> None: ...

    def metric(self, step: int, values: dict[str, float | None]) -> None: ...

    def progress(self, *args: Any) -> bool:
        return True

    def save_before_stopping(self) -> bool:
        return False

    def checkpoint(self, step: int, directory: str, metrics: dict[str, float | None]) -> None: ...


def child(model: str, data: str, name: str, length: int, workdir: str) -> None:
    """One configuration's run; prints its figures as JSON on the last line."""
    import torch

    from afina.core.job_config import ConfigRequest, resolve_config
    from afina.worker.training.run import TrainingRun, train

    bits, batch, checkpointing = CONFIGS[name]
    request = ConfigRequest.model_validate(
        {
            "hyperparameters": {"n_epochs": 1, "batch_size": batch},
            "quantization": {"bits": bits},
            "training": {
                "max_seq_length": length,
                "gradient_checkpointing": checkpointing,
                "max_steps": STEPS,
                "padding_free": False,
            },
        }
    )
    config = resolve_config(request, num_examples=batch * STEPS, model_max_length=length)
    cuda = torch.cuda.is_available()
    before = 0 if cuda else rss("VmRSS")
    recorder = Recorder()
    run = TrainingRun(
        model=model,
        config=config,
        seed=0,
        training_data=lambda: open(data, "rb"),  # noqa: SIM115
        validation_data=None,
        workdir=Path(workdir),
        max_line_bytes=1 << 24,
    )
    train(run, recorder)
    peak = recorder.done["peak_memory_bytes"] - before
    print(json.dumps({"measured": peak, "device": "cuda" if cuda else "cpu"}))


def estimate(model: str, name: str, length: int, device: str) -> dict[str, Any]:
    """The estimate's memory for this configuration, as the API works it out."""
    from afina.core.base_models import read_local_config
    from afina.core.estimate import ModelShape, memory

    bits, batch, checkpointing = CONFIGS[name]
    shape = ModelShape.of(read_local_config(model))
    assert shape is not None
    return memory(
        shape,
        bits=bits,
        double_quant=True,
        dtype_bytes=4 if device == "cpu" else 2,
        lora_r=16,
        target_modules="all-linear",
        tokens_per_step=batch * length,  # every example fills max_seq_length, padded batches
        checkpointing=checkpointing,
    ).model_dump()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--lengths", type=int, nargs="+", default=[256])
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        model, data, name, length, workdir = args.child
        child(model, data, name, int(length), workdir)
        return
    import torch

    from afina.worker.demo_model import ModelShape, build_demo_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory(prefix="afina-memory-") as tmp:
        shape = ModelShape(
            hidden_size=args.hidden,
            intermediate_size=int(args.hidden * 2.75),
            num_hidden_layers=args.layers,
            num_attention_heads=args.hidden // 64,
            num_key_value_heads=max(1, args.hidden // 256),
            max_position_embeddings=max(args.lengths),
            vocab_size=32000,
        )
        model = str(build_demo_model(Path(tmp) / "model", shape=shape))
        print(f"random Llama {shape}, on {device}")
        print(f"{'configuration':<36} {'tokens':>6} {'estimate':>10} {'measured':>10}  ratio")
        for length in args.lengths:
            data = Path(tmp) / f"data-{length}.jsonl"
            words = " ".join(["tell me about the weather"] * length)
            data.write_text("".join(json.dumps({"text": words}) + "\n" for _ in range(64)))
            figures = {}
            for name in CONFIGS:
                workdir = tempfile.mkdtemp(dir=tmp)
                output = subprocess.run(
                    [sys.executable, __file__, "--child", model, str(data), name, str(length),
                     workdir],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout  # fmt: skip
                measured = json.loads(output.strip().splitlines()[-1])["measured"]
                total = estimate(model, name, length, device)["total"]
                figures[name] = (total, measured)
                print(
                    f"{name:<36} {length:>6} {total / 2**20:>7.0f} MiB {measured / 2**20:>7.0f} MiB"
                    f"  {measured / total:5.2f}"
                )
            (one, one_measured), (four, four_measured) = (
                figures["lora fp32, batch 1"],
                figures["lora fp32, batch 4"],
            )
            added, added_measured = four - one, four_measured - one_measured
            print(
                f"{'3 more examples a step':<36} {length:>6} {added / 2**20:>7.0f} MiB "
                f"{added_measured / 2**20:>7.0f} MiB  {added_measured / added:5.2f}"
            )


if __name__ == "__main__":
    main()
