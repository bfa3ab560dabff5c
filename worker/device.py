"""What this worker trains on, as the registry shows it: its first GPU, or the CPU and the
machine's memory."""

import os
import re
from pathlib import Path

import torch

from afina.jobs.workers import Device
from afina.worker.training.checkpointing import free_memory

_MEMINFO = Path("/proc/meminfo")
_CPUINFO = Path("/proc/cpuinfo")


def _proc_field(path: Path, pattern: str) -> str | None:
    try:
        found = re.search(pattern, path.read_text(), re.MULTILINE)
    except OSError:
        return None
    return found.group(1).strip() if found else None


def this_device() -> Device:
    cores = len(os.sched_getaffinity(0))
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(0)
        return Device("cuda", torch.cuda.get_device_name(0), total, free, cores)
    total = _proc_field(_MEMINFO, r"^MemTotal:\s+(\d+) kB")
    name = _proc_field(_CPUINFO, r"^model name\s*:(.*)$") or "CPU"
    return Device("cpu", name, int(total or 0) * 1024, free_memory(), cores)
