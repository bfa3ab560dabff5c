"""Time the gzip levels of a model archive (`core.archive`): a safetensors file of bf16 random
weights, packed by tarfile as `write_archive` packs one, at each level in turn, alternating,
so that a noisy machine shows in every figure. Prints each run's size and speed.

    .venv/bin/python bench/archive_compression.py --mib 128 --levels 1 6 --rounds 2
"""

import argparse
import io
import tarfile
import time

import torch
from safetensors.torch import save


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=128, help="weights to pack, in MiB")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 6])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    weights = torch.randn(args.mib * 2**19, dtype=torch.float32).to(torch.bfloat16)
    data = save({"w": weights})
    for _ in range(args.rounds):
        for level in args.levels:
            out = io.BytesIO()
            started = time.perf_counter()
            with tarfile.open(fileobj=out, mode="w:gz", compresslevel=level) as archive:
                info = tarfile.TarInfo("model.safetensors")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
            seconds = time.perf_counter() - started
            print(
                f"level {level}: {len(data) / 2**20:.0f} MiB -> {out.tell() / 2**20:.1f} MiB "
                f"in {seconds:.2f} s ({len(data) / 2**20 / seconds:.0f} MiB/s)"
            )


if __name__ == "__main__":
    main()
