"""The peak memory of one piece of work, on CPU (Linux) or CUDA: what the planner and the benchmarks read.

On CUDA the allocator's peak (``torch.cuda.max_memory_allocated``). On CPU the peak
resident set (``VmHWM`` in ``/proc/self/status``) after its mark was reset, above the
resident level before; large allocations are made to go back to the system when freed
(glibc's mmap threshold, as ``MALLOC_MMAP_THRESHOLD_=65536``), so the peak follows live
tensors.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import sys
from collections.abc import Callable

import torch

__all__ = ["nbytes", "peak_of", "proc_status", "reset_peak_rss", "return_freed_memory"]


def proc_status(field: str) -> int:
    """A memory line of ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ...) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}; CPU memory needs Linux.")


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current VmRSS (Linux >= 4.0)


def return_freed_memory() -> None:
    """glibc: allocations of 64 KiB and more get their own mappings, returned to the system when freed.

    What ``MALLOC_MMAP_THRESHOLD_=65536`` does at start-up (then this is a no-op); without it
    glibc keeps freed blocks, and a step that reuses them shows no peak in resident memory.
    """
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is not None or not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-3, 65536)  # M_MMAP_THRESHOLD


def peak_of(work: Callable[[], object], device: torch.device) -> int:
    """Bytes that ``work()`` needed at its peak above what was allocated before it."""
    cuda = device.type == "cuda"
    if not cuda:
        return_freed_memory()
    gc.collect()
    if cuda:
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        before = proc_status("VmRSS")
        reset_peak_rss()
    work()
    if cuda:
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    return proc_status("VmHWM") - before
