"""The peak memory of a training run, for its "Training done" event: on a GPU the most the
CUDA allocator held (`torch.cuda.max_memory_allocated`), on a CPU the process's peak resident
set (Linux's VmHWM, reset when the run starts: a worker runs many jobs in one process)."""

import contextlib
import re
import resource
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    # "5" resets the peak RSS to the current RSS; elsewhere than Linux the peak stays the
    # process's since it started.
    with contextlib.suppress(OSError):
        _CLEAR_REFS.write_text("5")


def peak_memory() -> tuple[int, str]:
    """Bytes, and what they measure."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(), "cuda_max_allocated"
    try:
        found = re.search(r"^VmHWM:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        found = None
    if found:
        return int(found.group(1)) * 1024, "peak_rss"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak_rss"
