"""What this worker trains on: its first GPU, or the CPU and the machine's memory; what the
registry shows of it, and the memory a run may still use."""

import os
import re
from pathlib import Path

import torch

from afina.jobs.workers import Device

_MEMINFO = Path("/proc/meminfo")
_CPUINFO = Path("/proc/cpuinfo")


def _proc_field(path: Path, pattern: str) -> str | None:
    try:
        found = re.search(pattern, path.read_text(), re.MULTILINE)
    except OSError:
        return None
    return found.group(1).strip() if found else None


def _meminfo_bytes(field: str) -> int:
    """A /proc/meminfo figure in bytes; 0 where the system does not say."""
    return int(_proc_field(_MEMINFO, rf"^{field}:\s+(\d+) kB") or 0) * 1024


def free_memory() -> int:
    """Bytes a run may still use: free GPU memory, or the memory the OS calls available
    (0 when it does not say: a run then checkpoints)."""
    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return free
    return _meminfo_bytes("MemAvailable")


def ranks_available() -> int:
    """The most ranks a distributed run may have here: the GPUs this process sees, or its
    CPU cores on a node without one."""
    return torch.cuda.device_count() or len(os.sched_getaffinity(0))


def this_device() -> Device:
    cores = len(os.sched_getaffinity(0))
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(0)
        name = torch.cuda.get_device_name(0)
        return Device("cuda", name, total, free, cores, ranks_available())
    name = _proc_field(_CPUINFO, r"^model name\s*:(.*)$") or "CPU"
    return Device("cpu", name, _meminfo_bytes("MemTotal"), free_memory(), cores, ranks_available())
