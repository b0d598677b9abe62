"""The peak memory of one piece of work, on CPU (Linux) or CUDA: what the planner and the benchmarks read.

On CUDA the allocator's peak (``torch.cuda.max_memory_allocated``). On CPU the peak
resident set (``VmHWM`` in ``/proc/self/status``) after its mark was reset, above the
resident level before; during the measurement large allocations are made to go back to the
system when freed (glibc's mmap threshold, as ``MALLOC_MMAP_THRESHOLD_=65536``), so the peak
follows live tensors.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import sys
from collections.abc import Callable, Iterator

import torch

__all__ = ["freed_memory_returned", "nbytes", "peak_of", "proc_status", "reset_peak_rss", "trim_heap"]


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


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
# Where glibc's own dynamic thresholds settle in a process that frees large tensors (the mmap
# threshold rises to the largest freed block, up to 32 MiB on 64-bit; trimming at twice that).
_SETTLED = ((_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, 64 << 20))
_depth = 0  # open freed_memory_returned blocks


def _libc() -> ctypes.CDLL | None:
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is not None or not sys.platform.startswith("linux"):
        return None  # set for the whole process at start-up (the benchmarks' workers), or not glibc
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 (glibc: both exist)
    except (OSError, AttributeError):
        return None
    return libc


def trim_heap() -> None:
    """Gives the heap's free memory back to the system (glibc ``malloc_trim``), so the resident
    level counts live memory; a no-op elsewhere."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@contextlib.contextmanager
def freed_memory_returned() -> Iterator[None]:
    """Within the block, allocations of 64 KiB and more get their own mappings, returned to the
    system when freed, so resident memory follows live tensors.

    What ``MALLOC_MMAP_THRESHOLD_=65536`` does at start-up (then this does nothing); without it
    glibc keeps freed blocks, and a step that reuses them shows no peak in resident memory.
    On entry the heap's free memory goes back to the system (``malloc_trim``), so the level
    before the work counts live memory. On exit the thresholds go to where glibc's dynamic
    ones settle: left at 64 KiB, every later large tensor would be mapped and faulted in anew,
    and a training step after planning was measured 1.5x slower (RevNet-110, batch 128).
    Blocks nest; the outermost one decides. Work that measures several times (the planner)
    runs inside one block: the heap that large allocations between two measurements would
    otherwise leave fragmented makes later peaks read high (measured: +70% after four plans).
    """
    global _depth
    libc = _libc()
    if libc is None or _depth:  # nested: the outermost block set it up and restores it
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, 65536)
    libc.mallopt(_M_TRIM_THRESHOLD, 128 << 10)  # glibc's default: the heap's free top goes back too
    libc.malloc_trim(0)
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        for param, value in _SETTLED:
            libc.mallopt(param, value)


def peak_of(work: Callable[[], object], device: torch.device) -> int:
    """Bytes that ``work()`` needed at its peak above what was allocated before it."""
    cuda = device.type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        work()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with freed_memory_returned():
        trim_heap()
        before = proc_status("VmRSS")
        reset_peak_rss()
        work()
        return proc_status("VmHWM") - before
