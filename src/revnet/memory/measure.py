"""The peak memory of one piece of work, on CPU or CUDA: what the planner and the benchmarks read.

On CUDA the allocator's peak (``torch.cuda.max_memory_allocated``). On CPU, two sources:

- ``"allocator"``: the CPU allocator's allocation and free events, which PyTorch's profiler
  records when asked for memory (``profile_memory``), each with the total then allocated;
  the peak is the largest total minus the total before. What ``max_memory_allocated`` is on
  CUDA: tensors only, exact, the same on every call, whatever the process did before.
- ``"resident"`` (Linux): the peak resident set (``VmHWM`` in ``/proc/self/status``) after its
  mark was reset, above the resident level before; during the measurement large
  allocations are made to go back to the system when freed (glibc's mmap threshold, as
  ``MALLOC_MMAP_THRESHOLD_=65536``), so the peak follows live tensors. What the process
  costs the machine, docs/DESIGN.md's measure in a fresh process (``revnet bench memory``); in a
  process whose heap earlier work fragmented it moves by tens of percent between calls.

A third count needs no allocator at all: :func:`saved_bytes`, the bytes of the tensors autograd
keeps for backward in one forward (``torch.autograd.graph.saved_tensors_hooks``, through
:class:`SavedBytes`). Exact, the same on CPU and CUDA whatever the process did before, and cheap
(one forward, no backward); it leaves out the workspace and the gradients in flight at the
backward's peak, so it reads below the two peaks. What ``revnet train`` reports at its end.

The two peaks agree where the resident set is measured cleanly: the planner's peaks (allocator)
against the same plans' activation memory in fresh processes (resident), in
``docs/benchmarks/budget/budget.json`` (``revnet bench budget``): RevNet-110 88.3 / 88.1 MiB
all rebuilt, 1062.0 / 1062.9 MiB all stored; RevNet-164 3236.1 / 3237.4 MiB all stored.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ..engine.modes import kept_state

__all__ = ["SavedBytes", "allocated_peak_of", "freed_memory_returned", "keep_freed_memory", "nbytes",
           "peak_of", "proc_status", "reset_peak_rss", "saved_bytes", "trim_heap", "window_peaks_of"]


def proc_status(field: str) -> int:
    """A memory line of ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ...) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}; CPU memory needs Linux.")


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class SavedBytes:
    """Counts the distinct storages the autograd graph keeps for backward (not parameters).

    A context manager around a forward: every tensor a node saves passes through its
    ``saved_tensors_hooks`` and is counted once per storage. Code that keeps tensors for
    backward outside autograd's saved tensors (``torch.utils.checkpoint``'s inputs) adds them
    with :meth:`add` on :attr:`active`, the counter now open.
    """

    active: SavedBytes | None = None

    def __init__(self, net: nn.Module) -> None:
        # A sharded (FSDP2) parameter is a DTensor: its own storage is the local shard's.
        self.skip = {(p.to_local() if hasattr(p, "to_local") else p).untyped_storage().data_ptr()
                     for p in net.parameters()}
        self.seen: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def add(self, *tensors: torch.Tensor) -> None:
        for t in tensors:
            s = t.untyped_storage()
            if s.data_ptr() not in self.skip:
                self.seen[s.data_ptr()] = s.nbytes()

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self.add(t)
        # An alias, not t: a node saving its own output would otherwise hold a tensor holding the
        # node, a reference cycle in C++ that leaks the graph of every step measured in a process.
        return t.detach()

    @property
    def total(self) -> int:
        return sum(self.seen.values())

    def __enter__(self) -> SavedBytes:
        SavedBytes.active = self
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)
        SavedBytes.active = None


def saved_bytes(model: nn.Module, inputs: torch.Tensor,
                loss_fn: Callable[[torch.Tensor], torch.Tensor] | None = None, *,
                autocast: torch.dtype | None = None, forward_kwargs: dict[str, Any] | None = None) -> int:
    """Bytes autograd keeps for backward in one training step of ``model`` on ``inputs``.

    The forward and ``loss_fn`` run once under :class:`SavedBytes` (parameters are not
    counted); the graph is then dropped, with no backward. The model comes back as it was
    (switches, BatchNorm statistics, RNG streams: :func:`revnet.engine.modes.kept_state`), so
    it can be asked of a model in training, in each of its modes (e.g. after
    :func:`revnet.set_reversible` ``(model, False)``).

    Args:
        model: the model, in the mode to measure.
        inputs: one batch as the model takes it.
        loss_fn: ``loss_fn(output) -> scalar``; default ``output.float().square().mean()``.
        autocast: run the forward and ``loss_fn`` under ``torch.autocast`` in this dtype (a
            ``--amp bf16``/``fp16`` step); None: as the model and inputs are.
        forward_kwargs: passed to the forward, ``model(inputs, **forward_kwargs)`` (e.g. a
            language model's ``targets``, with ``loss_fn=lambda loss: loss``).

    Example:
        >>> import revnet, torch
        >>> from revnet.memory.measure import saved_bytes
        >>> model, x = revnet.create_model("revnet38"), torch.randn(8, 3, 32, 32)
        >>> rev = saved_bytes(model, x)
        >>> revnet.set_reversible(model, False)
        12
        >>> saved_bytes(model, x) > 3 * rev
        True
    """
    loss_fn = loss_fn or _square_mean
    cast = (torch.autocast(inputs.device.type, dtype=autocast) if autocast is not None
            else contextlib.nullcontext())
    with kept_state(model), SavedBytes(model) as saved, cast:
        loss_fn(model(inputs, **(forward_kwargs or {})))
    return saved.total


def _square_mean(output: torch.Tensor) -> torch.Tensor:
    return output.float().square().mean()


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current VmRSS (Linux >= 4.0)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
# Where glibc's own dynamic thresholds settle in a process that frees large tensors (the mmap
# threshold rises to the largest freed block, up to 32 MiB on 64-bit; trimming at twice that).
_SETTLED = ((_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, 64 << 20))
# keep_freed_memory(): blocks up to 1 GiB from the heap, and the heap never trimmed (-1 is
# SIZE_MAX to glibc).
_KEPT = ((_M_MMAP_THRESHOLD, 1 << 30), (_M_TRIM_THRESHOLD, -1))
_after = _SETTLED  # what freed_memory_returned restores on exit
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
    ones settle (or to :func:`keep_freed_memory`'s, once it was called): left at 64 KiB,
    every later large tensor would be mapped and faulted in anew (a RevNet-110 step at batch
    128 was measured 1.5x slower). Blocks nest; the outermost one decides. Work that measures
    the resident set several times should run inside one block: the heap that large
    allocations between two measurements would otherwise leave fragmented makes later peaks
    read high (measured: +70% after four plans, when the planner read the resident set).
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
        for param, value in _after:
            libc.mallopt(param, value)


def keep_freed_memory() -> bool:
    """Makes glibc keep the memory of freed tensors for the next ones, as CUDA's caching
    allocator does: blocks up to 1 GiB come from the heap instead of mappings of their own,
    and the heap is never trimmed. A training step then reuses the pages of the step before
    instead of having the kernel fault in and zero them again.

    By default glibc maps every block above its dynamic threshold (at most 32 MiB) anew and
    returns the heap's top once it holds twice that. On this project's 2-core virtual
    machines the page faults cost more than the arithmetic in large steps
    (``studies/page_faults.py``, RevNet-164 at batch 128, a 2-core AMD EPYC): plain autograd
    5.64 s with 1.16 million faults, 2.93 s after this call; the reversible step 5.36 s and
    3.53 s. The price: the process's resident memory stays at its peak, as a GPU's does
    under PyTorch. ``revnet train`` and ``revnet bench`` call it (on Linux, glibc).

    Returns:
        Whether glibc was told (False elsewhere, or where ``MALLOC_MMAP_THRESHOLD_`` set the
        process's thresholds at start-up).
    """
    global _after
    libc = _libc()
    if libc is None:
        return False
    _after = _KEPT
    if not _depth:  # inside a measurement, its block sets them on exit
        for param, value in _KEPT:
            libc.mallopt(param, value)
    return True


def peak_of(work: Callable[[], object], device: torch.device, *, source: str = "allocator") -> int:
    """Bytes that ``work()`` needed at its peak above what was allocated before it.

    ``source`` (CPU only): ``"allocator"`` (default) or ``"resident"``; see the module's
    docstring. Where the profiler cannot record (one is already running), the allocator's
    count falls back to the resident one, with a warning.
    """
    if source not in ("allocator", "resident"):
        raise ValueError(f"peak_of: source must be 'allocator' or 'resident', got {source!r}.")
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        work()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if source == "allocator":
        if not torch.autograd._profiler_enabled():
            return allocated_peak_of(work)
        warnings.warn("peak_of: a profiler is running, so the CPU allocator's events cannot be recorded "
                      "as well; measuring the peak resident set instead (less exact).", stacklevel=2)
    with freed_memory_returned():
        trim_heap()
        before = proc_status("VmRSS")
        reset_peak_rss()
        work()
        return proc_status("VmHWM") - before


def allocated_peak_of(work: Callable[[], object]) -> int:
    """The CPU allocator's peak during ``work()`` above its level before, from the allocation
    events PyTorch's profiler records (CPU activity, ``profile_memory``; nothing else kept).

    Memory allocated before ``work()`` and freed during it is not subtracted (the profiler
    knows no sizes for it), so the figure errs high, never low.
    """
    events, _ = _allocations(_recording(work))
    if not events:
        return 0
    _, size, total = events[0]
    return max(0, max(t for _, _, t in events) - (total - size))


def _recording(work: Callable[[], object]) -> Any:
    """Runs ``work()`` under PyTorch's profiler recording CPU allocations; its raw result."""
    from torch._C._profiler import ProfilerActivity, ProfilerConfig, ProfilerState, _ExperimentalConfig

    config = ProfilerConfig(ProfilerState.KINETO, False, True, False, False, False, _ExperimentalConfig())
    activities = {ProfilerActivity.CPU}
    with _stderr_without("USDT:"):  # kineto announces each start and stop on stderr
        torch.autograd._prepare_profiler(config, activities)
        torch.autograd._enable_profiler(config, activities)
    try:
        work()
    finally:
        with _stderr_without("USDT:"):
            result = torch.autograd._disable_profiler()
    return result


def _allocations(result: Any, marked: str = "") -> tuple[list[tuple[int, int, int]], list[tuple[int, str]]]:
    """CPU allocation events ``(time_ns, size, total after)`` in time order, and the ranges
    whose names start with ``marked`` as ``(time_ns, name)`` (none if ``marked`` is empty),
    from a profiler's result."""
    from torch._C._profiler import _EventType

    events, marks, stack = [], [], list(result.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
            events.append((e.start_time_ns, e.extra_fields.alloc_size, e.extra_fields.total_allocated))
        elif marked and e.name.startswith(marked):
            marks.append((e.start_time_ns, e.name[len(marked):]))
        stack.extend(e.children)
    events.sort()
    marks.sort()
    return events, marks


_MARK = "revnet.window:"


def window_peaks_of(work: Callable[[Callable[[str], None]], object], device: torch.device
                    ) -> list[tuple[str, int]]:
    """The peak of each window of ``work(mark)`` above what was allocated before it.

    ``work`` calls ``mark(name)`` to close the window before and open one called ``name``;
    the first window, from the start to the first mark, is called ``""``. The largest of the
    peaks is :func:`peak_of`'s. On CUDA from the allocator's peak, read and reset at each
    mark; on CPU from the allocation events PyTorch's profiler records (as
    :func:`allocated_peak_of`), split at the times of the marks. What the planner reads to
    learn where in a step memory peaks.
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        peaks: list[tuple[str, int]] = []
        current = [""]

        def cuda_mark(name: str) -> None:  # the caching allocator counts on the host, in launch order
            peaks.append((current[0], torch.cuda.max_memory_allocated(device) - before))
            torch.cuda.reset_peak_memory_stats(device)
            current[0] = name

        work(cuda_mark)
        torch.cuda.synchronize(device)
        return [*peaks, (current[0], torch.cuda.max_memory_allocated(device) - before)]
    if torch.autograd._profiler_enabled():
        raise RuntimeError("window_peaks_of: a profiler is already running, so the CPU allocator's "
                           "events cannot be recorded as well. Fix: measure outside the profiler.")

    def cpu_mark(name: str) -> None:
        with torch.autograd.profiler.record_function(_MARK + name):
            pass

    events, marks = _allocations(_recording(lambda: work(cpu_mark)), _MARK)
    if not events:
        return [("", 0), *((name, 0) for _, name in marks)]
    base = events[0][2] - events[0][1]
    level, i, peaks = base, 0, []
    for name, end in zip(["", *(n for _, n in marks)], [*(t for t, _ in marks), None], strict=True):
        top = level  # a window's peak: the level it opens at, and every total reached within it
        while i < len(events) and (end is None or events[i][0] < end):
            level = events[i][2]
            top = max(top, level)
            i += 1
        peaks.append((name, max(0, top - base)))
    return peaks


@contextlib.contextmanager
def _stderr_without(prefix: str) -> Iterator[None]:
    """Lines the C++ side writes to file descriptor 2 within the block, those starting with
    ``prefix`` left out (written through ``sys.stderr`` when the block ends)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = [line for line in tmp.read().decode(errors="replace").splitlines(keepends=True)
                    if not line.startswith(prefix)]
            if kept:
                sys.stderr.write("".join(kept))
