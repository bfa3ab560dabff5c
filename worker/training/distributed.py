"""Distributed data parallel training: one process a GPU (torchrun; gloo processes on a
CPU-only node), each rank running the same `train` on its share of each batch.

Rank 0 reports (the job's rows, its checkpoints) and saves the adapter; the other ranks
follow it. Every step the ranks agree, in one all-reduce, whether to go on and whether to
save first: a cancel or a pause that rank 0 learns of, or a stop that any rank is told
of, stops every rank at the same step, after the same checkpoint. A checkpoint is uploaded
once every rank has written its part (its RNG state) into the folder they share."""

import os
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from afina.core.job_config import JobConfig
from afina.worker.training.progress import Reporter


def start_rank() -> tuple[int, torch.device]:
    """Join the run's process group (torchrun's environment): this rank, and its device."""
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), device


class RankReporter:
    """The `Reporter` of one rank: rank 0 passes everything on to the job's reporter; every
    rank takes part in the decisions (`progress`, `checkpoint`)."""

    def __init__(
        self, reporter: Reporter | None, stop_requested: Callable[[], bool], device: torch.device
    ) -> None:
        self.reporter = reporter  # rank 0's; None on the others
        self.stop_requested = stop_requested  # this rank's worker is stopping
        self.device = device
        self.save = False

    def event(self, message: str, *, data: dict[str, Any] | None = None) -> None:
        if self.reporter is not None:
            self.reporter.event(message, data=data)

    def configured(self, config: JobConfig) -> None:
        if self.reporter is not None:
            self.reporter.configured(config)

    def tokenized(self, name: str, directory: Path) -> None:
        if self.reporter is not None:
            self.reporter.tokenized(name, directory)

    def metric(self, step: int, values: dict[str, float | None]) -> None:
        if self.reporter is not None:
            self.reporter.metric(step, values)

    def progress(
        self, steps_done: int, total_steps: int, epoch: float, estimated_finish: datetime | None
    ) -> bool:
        goes_on, save = True, False
        if self.reporter is not None:
            goes_on = self.reporter.progress(steps_done, total_steps, epoch, estimated_finish)
            save = not goes_on and self.reporter.save_before_stopping()
        if self.stop_requested():
            goes_on, save = False, True
        flags = torch.tensor([int(not goes_on), int(save)], device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        self.save = bool(flags[1])
        return not flags[0]

    def save_before_stopping(self) -> bool:
        return self.save

    def checkpoint(self, step: int, directory: str, metrics: dict[str, float | None]) -> None:
        dist.barrier()  # every rank's part of the checkpoint is written
        if self.reporter is not None:
            self.reporter.checkpoint(step, directory, metrics)
