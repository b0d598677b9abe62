"""Benchmarks: what a RevNet saves in memory, what it costs in time, and what that buys.

Every function returns a plain, JSON-able dict that holds its own configuration. Four
ways to train the same kind of network are compared (``KINDS``):

- ``resnet``: an ordinary pre-activation ResNet (every activation stored);
- ``revnet``: the RevNet with reversible backprop (Gomez et al. 2017, Algorithm 1);
- ``revnet-plain``: the very same RevNet and weights under ordinary autograd;
- ``revnet-checkpoint``: the same RevNet with every coupling run through
  ``torch.utils.checkpoint`` (non-reentrant): its inputs are stored, its insides recomputed.

Measurement (DESIGN.md, "How to measure"): on CPU each memory point runs in a fresh
process with ``MALLOC_MMAP_THRESHOLD_=65536`` (freed tensors leave the process at once);
the peak resident set of one training step is read from ``/proc/self/status`` after the
high-water mark was reset just before the step. On CUDA, ``torch.cuda.max_memory_allocated``.
Either way the bytes saved for backward are counted too, as a cross-check. Times are
medians of repeats alternated between the compared runs in one process, after warm-up.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import autograd as _autograd
from . import fidelity
from .autograd import Recomputed, ReversibleSequence
from .coupling import EXACT_BITS, merge, set_exact, split
from .models import ResNet, RevNet, create_model

__all__ = [
    "DRIFT_PRECISIONS", "KINDS", "PAPER_PAIRS", "build", "capacity", "drift", "environment", "exact_cost",
    "format_bytes", "load_engine", "measure", "memory_point", "memory_sweep", "parse_bytes", "plot_capacity",
    "plot_drift", "plot_memory", "plot_speed", "run_mode", "speed", "train_step_rate",
]

KINDS = ("resnet", "revnet", "revnet-plain", "revnet-checkpoint")
RESNET_CHANNELS = (16, 16, 32, 64)   # the paper's CIFAR ResNets (Table 1)
REVNET_CHANNELS = (32, 32, 64, 128)  # RevNet-110 / RevNet-164 (Table 1)
# (ResNet, RevNet) of about equal depth and parameters (paper Table 1).
PAPER_PAIRS = (("resnet32", "revnet38"), ("resnet110", "revnet110"), ("resnet164", "revnet164"))

Progress = Callable[[dict[str, Any]], None] | None


# --------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "tb": 10**12}


def parse_bytes(text: str) -> int:
    """``"2GiB"`` -> 2147483648; also ``"512MiB"``, ``"1.5GB"``, ``"4096"`` (bytes)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a size; write e.g. 2GiB, 512MiB, 1.5GB or 4096.")
    value = float(m.group(1)) * _UNITS[unit]
    if value < 1:
        raise ValueError(f"size {text!r} must be at least one byte.")
    return int(value)


def format_bytes(n: float) -> str:
    """Bytes in MiB (or GiB from 10 GiB), for tables."""
    return f"{n / 2**30:.1f} GiB" if abs(n) >= 10 * 2**30 else f"{n / 2**20:.1f} MiB"


# --------------------------------------------------------------------------------------
# Models and the four ways to train them
# --------------------------------------------------------------------------------------

def depth_of(kind: str, units: int, block: str = "basic") -> int:
    """Layers with weights: ResNet ``6n+2`` (bottleneck ``9n+2``), RevNet ``12n+2`` (``18n+2``)."""
    per_unit = (3 if block == "bottleneck" else 2) * (1 if kind == "resnet" else 2)
    return 3 * per_unit * units + 2


def build(
    kind: str, units: int | None = None, *, model: str | None = None, block: str = "basic",
    in_chans: int = 3, num_classes: int = 10, device: str = "cpu", dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """A CIFAR network for ``kind``: registered ``model`` if given, else ``units`` per stage.

    Sweep networks use the paper's CIFAR widths: ResNet 16-16-32-64, RevNet 32-32-64-128.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}.")
    factory = {"device": device, "dtype": dtype, "in_chans": in_chans, "num_classes": num_classes}
    if model is not None:
        net = create_model(model, **factory)
    elif units is None:
        raise ValueError("build: give units per stage or a registered model name.")
    elif kind == "resnet":
        net = ResNet((units,) * 3, RESNET_CHANNELS, block=block, **factory)
    else:
        net = RevNet((units,) * 3, REVNET_CHANNELS, block=block, **factory)
    if isinstance(net, RevNet) == (kind == "resnet"):
        raise ValueError(f"model {model!r} is not a {'ResNet' if kind == 'resnet' else 'RevNet'} "
                         f"(kind {kind!r}).")
    return net


class _CheckpointedSequence(nn.Module):
    """Runs a :class:`ReversibleSequence`'s couplings through ``torch.utils.checkpoint``.

    Holds the sequence itself, so the modules and weights are the same. Note that the
    recomputation updates BatchNorm running statistics a second time (a known property of
    checkpointing that the reversible engine avoids); timing and memory are unaffected.
    """

    def __init__(self, seq: ReversibleSequence) -> None:
        super().__init__()
        self.seq = seq

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = split(x, self.seq.dim)  # (B, C/2, H, W) each
        for c in self.seq.couplings:
            if torch.is_grad_enabled():
                x1, x2 = checkpoint(c.forward_halves, x1, x2, use_reentrant=False)
                if _SavedBytes.active is not None:  # checkpoint keeps each block's inputs
                    _SavedBytes.active.add(x1, x2)
            else:
                x1, x2 = c.forward_halves(x1, x2)
        return merge(x1, x2, self.seq.dim)


class _CheckpointedUnit(nn.Module):
    """Runs a non-invertible unit (a stage opener) through ``torch.utils.checkpoint``."""

    def __init__(self, unit: nn.Module) -> None:
        super().__init__()
        self.unit = unit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return self.unit(x)
        if _SavedBytes.active is not None:  # checkpoint keeps the unit's input
            _SavedBytes.active.add(x)
        return checkpoint(self.unit, x, use_reentrant=False)


@contextlib.contextmanager
def run_mode(net: nn.Module, kind: str) -> Iterator[nn.Module]:
    """Sets up ``net`` to train as ``kind`` for the duration; the weights are untouched.

    ``revnet``: reversible sequences and recomputed stage openers; ``revnet-plain``: all
    under ordinary autograd; ``revnet-checkpoint``: every coupling and every opener through
    ``torch.utils.checkpoint``.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}.")
    units = [(parent, name, child) for parent in net.modules() for name, child in parent.named_children()
             if isinstance(child, (ReversibleSequence, Recomputed))]
    before = [u.reversible for _, _, u in units]
    try:
        for parent, name, unit in units:
            unit.reversible = kind == "revnet"
            if kind == "revnet-checkpoint":
                wrap = _CheckpointedSequence if isinstance(unit, ReversibleSequence) else _CheckpointedUnit
                setattr(parent, name, wrap(unit))
        yield net
    finally:
        for (parent, name, unit), rev in zip(units, before, strict=True):
            setattr(parent, name, unit)
            unit.reversible = rev


def _batch(net: nn.Module, batch: int, image_size: int, in_chans: int = 3,
           channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    p = next(net.parameters())
    x = torch.randn(batch, in_chans, image_size, image_size, device=p.device, dtype=p.dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, 10, (batch,), device=p.device)


def _train_step(net: nn.Module, x: torch.Tensor, y: torch.Tensor,
                saved: _SavedBytes | None = None) -> None:
    # Only the forward is counted: what backward recomputes and frees is not kept.
    with saved if saved is not None else contextlib.nullcontext():
        loss = F.cross_entropy(net(x), y)
    loss.backward()


def _sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------

class _SavedBytes:
    """Counts the distinct storages the autograd graph keeps for backward (not parameters)."""

    active: _SavedBytes | None = None

    def __init__(self, net: nn.Module) -> None:
        self.skip = {p.untyped_storage().data_ptr() for p in net.parameters()}
        self.seen: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def add(self, *tensors: torch.Tensor) -> None:
        for t in tensors:
            s = t.untyped_storage()
            if s.data_ptr() not in self.skip:
                self.seen[s.data_ptr()] = s.nbytes()

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self.add(t)
        return t

    @property
    def total(self) -> int:
        return sum(self.seen.values())

    def __enter__(self) -> _SavedBytes:
        _SavedBytes.active = self
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)
        _SavedBytes.active = None


def _proc_status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}; CPU memory needs Linux.")


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _drop_grad(p: torch.Tensor) -> None:
    p.grad = None  # post-accumulate-grad hook: gradients leave the measurement at once


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current VmRSS (Linux >= 4.0)


def memory_point(
    kind: str, units: int | None = None, *, model: str | None = None, block: str = "basic",
    batch: int = 32, image_size: int = 32, in_chans: int = 3, warmup_batch: int | None = None,
    grads: str = "freed", device: str = "cpu", dtype: str = "float32", seed: int = 0, exact: bool = False,
) -> dict[str, Any]:
    """Memory of one training step (forward, cross-entropy, backward), in this process.

    Prefer :func:`measure`, which gives CPU points a fresh process. The step runs once to
    warm up (at ``warmup_batch``, default ``batch``), gradients are freed, then it runs
    again under measurement.

    Args:
        grads: ``"freed"``: each parameter's gradient is dropped the moment it has been
            accumulated, so the peak holds activations, workspace and gradients still in
            flight: the activation measurement. ``"kept"``: gradients stay, as in an
            ordinary step: what the step needs in all (for :func:`capacity`).
        exact: a RevNet's couplings in exact mode (:func:`revnet.set_exact`).

    Returns:
        The configuration plus ``peak_bytes`` (the step's peak above the level before it),
        ``grad_bytes`` (the parameter gradients), ``activation_bytes`` (``peak_bytes``, or
        with ``"kept"`` ``peak_bytes - grad_bytes``, a lower bound), ``saved_bytes``
        (distinct storages kept for backward, parameters excluded), ``total_bytes`` (what
        the step needs in all: weights, buffers, the batch, gradients and the peak) and
        ``params``.
    """
    if grads not in ("freed", "kept"):
        raise ValueError(f"memory_point: grads must be 'freed' or 'kept', got {grads!r}.")
    torch.manual_seed(seed)
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    level = (lambda: torch.cuda.memory_allocated(dev)) if cuda else (lambda: _proc_status("VmRSS"))
    net = build(kind, units, model=model, block=block, in_chans=in_chans, device=device,
                dtype=getattr(torch, dtype))
    if exact and not set_exact(net, True):
        raise ValueError(f"memory_point: exact mode needs a RevNet, got kind {kind!r}.")
    x, y = _batch(net, batch, image_size, in_chans)
    with run_mode(net, kind):
        _train_step(net, *_batch(net, warmup_batch or batch, image_size, in_chans))
        net.zero_grad(set_to_none=True)
        gc.collect()
        _sync(dev)
        before = level()
        if cuda:
            torch.cuda.reset_peak_memory_stats(dev)
        else:
            _reset_peak_rss()
        params = [p for p in net.parameters() if p.requires_grad]
        hooks = [p.register_post_accumulate_grad_hook(_drop_grad) for p in params] if grads == "freed" else []
        saved = _SavedBytes(net)
        try:
            _train_step(net, x, y, saved)
            _sync(dev)
        finally:
            for h in hooks:
                h.remove()
        peak = torch.cuda.max_memory_allocated(dev) if cuda else _proc_status("VmHWM")
    grad_bytes = sum(map(_nbytes, params))
    # Tensors only (not the interpreter, libraries or thread stacks), as CUDA's allocator counts.
    resident = sum(map(_nbytes, [*net.parameters(), *net.buffers(), x, y]))
    kept = grad_bytes if grads == "kept" else 0
    return {
        "kind": kind, "units": units, "model": model, "block": block,
        "depth": depth_of(kind, units, block) if model is None else int(re.sub(r"\D", "", model)),
        "batch": batch, "image_size": image_size, "in_chans": in_chans, "device": device,
        "dtype": dtype, "exact": exact, "params": sum(p.numel() for p in params),
        "grads": grads, "peak_bytes": peak - before, "grad_bytes": grad_bytes,
        "activation_bytes": peak - before - kept, "saved_bytes": saved.total,
        "total_bytes": resident + grad_bytes - kept + peak - before,
        "method": "cuda.max_memory_allocated" if cuda else "VmHWM-VmRSS",
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
    }


def measure(timeout: float = 1800.0, **point: Any) -> dict[str, Any]:
    """:func:`memory_point` in a fresh process on CPU (in this one on CUDA).

    Raises:
        RuntimeError: the worker process failed; its stderr is in the message.
    """
    if torch.device(point.get("device", "cpu")).type == "cuda":
        return memory_point(**point)
    src = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536",
               PYTHONPATH=os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p),
               OMP_NUM_THREADS=str(torch.get_num_threads()))
    proc = subprocess.run([sys.executable, "-m", "revnet.bench_worker", json.dumps(point)],
                          capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"memory worker for {point} exited with {proc.returncode}:\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def memory_sweep(
    units: Sequence[int] = (1, 3, 9, 18, 36), kinds: Sequence[str] = KINDS, *,
    models: Sequence[str] = (), block: str = "basic", batch: int = 32, model_batch: int = 128,
    image_size: int = 32, device: str = "cpu", dtype: str = "float32", progress: Progress = None,
) -> dict[str, Any]:
    """Memory across depth, plus the paper's named models.

    Depths are matched: a RevNet with ``n`` units per stage (``12n+2`` layers, basic) is
    compared with a ResNet with ``2n`` units per stage (``6(2n)+2`` layers).

    Args:
        units: RevNet units per stage to sweep (the ResNet gets twice as many).
        kinds: which of :data:`KINDS` to run.
        models: registered models to measure at ``model_batch``; RevNets run in every
            RevNet kind of ``kinds``, ResNets as ``resnet``.
        block: residual function of the sweep networks.
        batch: batch of the sweep points.
        progress: called with each finished point.
    """
    plan = [{"kind": k, "units": 2 * n if k == "resnet" else n, "block": block, "batch": batch}
            for n in units for k in kinds]
    for name in models:
        rev = name.startswith("revnet")
        plan += [{"kind": k, "model": name, "batch": model_batch}
                 for k in kinds if (k != "resnet") == rev]
    points = []
    for p in plan:
        points.append(measure(**p, image_size=image_size, device=device, dtype=dtype))
        if progress is not None:
            progress(points[-1])
    config = {"units": list(units), "kinds": list(kinds), "models": list(models), "block": block,
              "batch": batch, "model_batch": model_batch, "image_size": image_size,
              "device": device, "dtype": dtype}
    return {"config": config, "points": points}


# --------------------------------------------------------------------------------------
# Speed
# --------------------------------------------------------------------------------------

def _stats(times: Sequence[float], images: int) -> dict[str, Any]:
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    med = statistics.median(times)
    return {"median_s": med, "p25_s": q[0], "p75_s": q[2], "min_s": min(times),
            "images_per_s": images / med, "times_s": list(times)}


def speed(
    model: str = "revnet38", *, kinds: Sequence[str] = ("revnet", "revnet-plain", "revnet-checkpoint"),
    reference: str | None = "resnet32", against: str | None = None, batch: int = 128,
    image_size: int = 32, repeats: int = 7, warmup: int = 2, inference_repeats: int = 15,
    channels_last: bool = False, device: str = "cpu", dtype: str = "float32", seed: int = 0,
    progress: Progress = None,
) -> dict[str, Any]:
    """Training-step and inference time of one RevNet run in several ways, alternated.

    One training step is forward, cross-entropy and backward (every parameter gets its
    gradient); the optimizer update, the same in every mode, is left out. The kinds run
    on the same model and weights; ``reference`` (a registered ResNet) is timed in the
    same loop for scale, and ``against`` (a git revision) adds the reversible run with
    that revision's engine, to measure an engine change side by side. The order is
    rotated every repeat. Inference is ``eval()`` under ``torch.no_grad()``, reversible
    against plain, where both must cost the same.

    Returns:
        ``train`` and ``inference``: per run, median / quartiles / min in seconds and
        images/s; ``ratios``: ratios of medians (``"revnet/revnet-plain"``, ...), and
        ``pair_ratios``: the spread of the per-repeat ratios.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError("speed: repeats must be >= 1 and warmup >= 0.")
    torch.manual_seed(seed)
    dt = getattr(torch, dtype)
    net = build("revnet", model=model, device=device, dtype=dt)
    Engine = Callable[..., torch.Tensor] | None
    runs: list[tuple[str, str, nn.Module, Engine]] = [(k, k, net, None) for k in kinds]
    if against is not None:
        runs.append((f"revnet@{against}", "revnet", net, load_engine(against)))
    if reference is not None:
        runs.append((reference, "resnet", build("resnet", model=reference, device=device, dtype=dt), None))
    for _, _, m, _ in runs:
        m.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    x, y = _batch(net, batch, image_size, channels_last=channels_last)

    def timed(kind: str, m: nn.Module, function: Engine) -> float:
        m.zero_grad(set_to_none=True)
        with run_mode(m, kind), _engine(function):
            _sync(device)
            t = time.perf_counter()
            _train_step(m, x, y)
            _sync(device)
            return time.perf_counter() - t

    times: dict[str, list[float]] = {run[0]: [] for run in runs}
    for _, *run in runs:
        for _ in range(warmup):
            timed(*run)
    for r in range(repeats):
        for name, *run in runs[r % len(runs):] + runs[:r % len(runs)]:
            times[name].append(timed(*run))
        if progress is not None:
            progress({"repeat": r, "times": {k: v[-1] for k, v in times.items()}})
    train = {name: _stats(v, batch) for name, v in times.items()}
    infer = _inference_times(net, x, inference_repeats, device) if inference_repeats else {}
    ratios, pairs = {}, {}
    base = kinds[0]
    for other in [k for k in times if k != base]:
        key = f"{base}/{other}"
        ratios[key] = train[base]["median_s"] / train[other]["median_s"]
        per = [a / b for a, b in zip(times[base], times[other], strict=True)]
        pairs[key] = {"median": statistics.median(per), "min": min(per), "max": max(per)}
    if infer:
        key = "inference revnet/revnet-plain"
        ratios[key] = infer["revnet"]["median_s"] / infer["revnet-plain"]["median_s"]
        per = [a / b for a, b in zip(infer["revnet"]["times_s"], infer["revnet-plain"]["times_s"],
                                     strict=True)]
        pairs[key] = {"median": statistics.median(per), "min": min(per), "max": max(per)}
    config = {"model": model, "kinds": list(kinds), "reference": reference, "against": against,
              "batch": batch, "image_size": image_size, "repeats": repeats, "warmup": warmup,
              "inference_repeats": inference_repeats, "channels_last": channels_last,
              "device": device, "dtype": dtype, "threads": torch.get_num_threads(), "seed": seed}
    return {"config": config, "train": train, "inference": infer, "ratios": ratios,
            "pair_ratios": pairs}


def train_step_rate(
    model: str = "revnet38", *, batch: int = 128, image_size: int = 32, in_chans: int = 3,
    amp: str = "none", channels_last: bool = False, reversible: bool = True, repeats: int = 7,
    warmup: int = 2, device: str = "cpu", seed: int = 0,
) -> dict[str, Any]:
    """Images per second of whole training steps as ``revnet train`` runs them.

    Forward (under bf16/fp16 autocast if ``amp``), cross-entropy, backward and an SGD
    (Nesterov, weight decay) update, on one random batch; median of ``repeats`` after
    ``warmup``. The data path is left out: this is the rate the loader has to keep up with.
    """
    if amp not in ("none", "bf16", "fp16"):
        raise ValueError(f"train_step_rate: amp must be 'none', 'bf16' or 'fp16', got {amp!r}.")
    if repeats < 1 or warmup < 0:
        raise ValueError("train_step_rate: repeats must be >= 1 and warmup >= 0.")
    torch.manual_seed(seed)
    net = create_model(model, num_classes=10, in_chans=in_chans).to(device)
    if isinstance(net, RevNet):
        net.reversible = reversible
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net.to(memory_format=fmt).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    x, y = _batch(net, batch, image_size, in_chans, channels_last=channels_last)
    dev = torch.device(device)
    autocast = (torch.autocast(dev.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
                if amp != "none" else contextlib.nullcontext())

    def step() -> float:
        _sync(device)
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        _sync(device)
        return time.perf_counter() - t

    for _ in range(warmup):
        step()
    stats = _stats([step() for _ in range(repeats)], batch)
    config = {"model": model, "batch": batch, "image_size": image_size, "in_chans": in_chans, "amp": amp,
              "channels_last": channels_last, "reversible": reversible, "repeats": repeats,
              "warmup": warmup, "device": device, "threads": torch.get_num_threads(), "seed": seed}
    return {"config": config, **stats}


def load_engine(rev: str) -> Callable[..., torch.Tensor]:
    """The reversible engine of git revision ``rev`` of this checkout (for ``against``).

    Returns ``run(seq, x)``, what a :class:`ReversibleSequence` calls in reversible mode
    (revisions that ran one ``_ReversibleFunction`` per sequence are adapted to it).

    Raises:
        RuntimeError: not a git checkout, or ``rev`` has no src/revnet/autograd.py.
    """
    root = Path(__file__).resolve().parents[2]
    try:
        source = subprocess.run(["git", "show", f"{rev}:src/revnet/autograd.py"], cwd=root,
                                capture_output=True, text=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"cannot read the engine of git revision {rev!r} in {root}: {e}") from e
    module = types.ModuleType("revnet._engine_at_" + re.sub(r"\W", "_", rev))
    module.__package__ = "revnet"  # its relative imports resolve to this version's modules
    exec(compile(source, f"{rev}:src/revnet/autograd.py", "exec"), module.__dict__)
    if hasattr(module, "_run_reversible"):
        return module._run_reversible
    function = module._ReversibleFunction

    def run(seq: ReversibleSequence, x: torch.Tensor) -> torch.Tensor:
        return function.apply(x, seq, *(p for p in seq.parameters() if p.requires_grad))

    run.__name__ = f"{function.__name__}@{rev}"
    return run


@contextlib.contextmanager
def _engine(run: Callable[..., torch.Tensor] | None) -> Iterator[None]:
    """Runs every ReversibleSequence through ``run`` (another revision's engine)."""
    current = _autograd._run_reversible
    if run is not None:
        _autograd._run_reversible = run
    try:
        yield
    finally:
        _autograd._run_reversible = current


def _inference_times(net: nn.Module, x: torch.Tensor, repeats: int, device: str) -> dict[str, Any]:
    times: dict[str, list[float]] = {"revnet": [], "revnet-plain": []}
    net.eval()
    try:
        with torch.no_grad():
            for r in range(repeats + 1):  # the first round warms up
                for kind in (("revnet", "revnet-plain") if r % 2 else ("revnet-plain", "revnet")):
                    with run_mode(net, kind):
                        _sync(device)
                        t = time.perf_counter()
                        net(x)
                        _sync(device)
                    if r:
                        times[kind].append(time.perf_counter() - t)
    finally:
        net.train()
    return {k: _stats(v, x.shape[0]) for k, v in times.items()}


# --------------------------------------------------------------------------------------
# Capacity: the largest batch and depth that train under a memory budget
# --------------------------------------------------------------------------------------

def _largest_under(
    budget: int, probe: Callable[[int], int], lo: int, hi: int, *, verify_max: int, step: float = 0.05,
) -> dict[str, Any]:
    """Largest integer ``v`` with ``probe(v) <= budget``, for a memory that is affine in ``v``.

    Fits the line through ``lo`` and ``hi``, then checks the prediction with real steps
    (while ``v <= verify_max``), moving by ``step`` (relative) until it brackets the limit.
    """
    probes: dict[int, int] = {v: probe(v) for v in (lo, hi)}
    slope = (probes[hi] - probes[lo]) / (hi - lo)
    base = probes[lo] - slope * lo
    predicted = int((budget - base) // slope) if slope > 0 else None
    fit, fail = max((v for v, b in probes.items() if b <= budget), default=None), None
    fail = min((v for v, b in probes.items() if b > budget), default=None)
    v = predicted if predicted is not None else verify_max
    for _ in range(6):
        v = min(v, verify_max)
        if v < 1 or v in probes or (fit is not None and v <= fit) or (fail is not None and v >= fail):
            break
        probes[v] = probe(v)
        if probes[v] <= budget:
            fit = v
            v = max(v + 1, int(v * (1 + step)))
        else:
            fail = v
            v = min(v - 1, int(v * (1 - step)))
    return {"largest": fit, "smallest_over": fail, "predicted": predicted,
            "verified": fit is not None and (fail is not None or fit == predicted),
            "bytes_per_step": slope, "fixed_bytes": base,
            "probes": [{"value": k, "total_bytes": b} for k, b in sorted(probes.items())]}


def capacity(
    budget: int, *, models: Sequence[str] = ("resnet110", "revnet110"),
    kinds: Sequence[str] = ("resnet", "revnet"), depth_batch: int = 32,
    image_size: int = 32, block: str = "basic", verify_max_batch: int = 1024,
    verify_max_units: int = 36, device: str = "cpu", dtype: str = "float32", progress: Progress = None,
) -> dict[str, Any]:
    """The largest batch (per model) and depth (per kind, at ``depth_batch``) under ``budget``.

    ``kinds`` may hold ``"resnet"`` and ``"revnet"`` (the depth search), or nothing.

    Memory is the whole training step's: weights, gradients, activations and workspace
    (``total_bytes`` of :func:`memory_point`). Both are affine in batch and in depth, so a
    line fitted through two small probes predicts the limit, which is then checked with
    real steps up to ``verify_max_batch`` / ``verify_max_units`` (a RevNet's depth limit
    usually lies far beyond; it is then reported as extrapolated, ``verified: False``).
    """
    def probe(**point: Any) -> int:
        try:
            result = measure(**point, image_size=image_size, device=device, dtype=dtype)
        except torch.cuda.OutOfMemoryError:  # on CUDA, the device's own limit came first
            return budget + 1
        if progress is not None:
            progress(result)
        return result["total_bytes"]

    by_batch = {}
    for name in models:
        kind = "revnet" if name.startswith("revnet") else "resnet"
        by_batch[name] = _largest_under(
            budget, lambda b, n=name, k=kind: probe(kind=k, model=n, batch=b, warmup_batch=min(b, 8),
                                                    grads="kept"),
            8, 32, verify_max=verify_max_batch)
    by_depth = {}
    for kind in kinds:
        scale = 2 if kind == "resnet" else 1  # ResNet units doubled: same depth as the RevNet
        r = _largest_under(
            budget, lambda u, k=kind: probe(kind=k, units=u, block=block, batch=depth_batch,
                                            warmup_batch=min(depth_batch, 8), grads="kept"),
            scale, 3 * scale, verify_max=scale * verify_max_units)
        for key in ("largest", "smallest_over", "predicted"):
            r[f"{key}_depth"] = None if r[key] is None else depth_of(kind, r[key], block)
        by_depth[kind] = r
    config = {"budget_bytes": budget, "models": list(models), "kinds": list(kinds),
              "depth_batch": depth_batch,
              "image_size": image_size, "block": block, "verify_max_batch": verify_max_batch,
              "verify_max_units": verify_max_units, "device": device, "dtype": dtype}
    return {"config": config, "batch": by_batch, "depth": by_depth}


# --------------------------------------------------------------------------------------
# Drift: how far rebuilt activations stray from the stored ones, and what exact mode costs
# --------------------------------------------------------------------------------------

DRIFT_PRECISIONS = ("float64", "float32", "bf16", "bf16-model")


def _precision(net: nn.Module, x: torch.Tensor, precision: str
               ) -> tuple[nn.Module, torch.Tensor, contextlib.AbstractContextManager]:
    """``float64``/``float32``: model and input in that dtype; ``bf16``: float32 weights under
    bf16 autocast, as ``revnet train --amp bf16`` runs (F and G in bf16, the residual stream
    kept in float32 by the engine); ``bf16-model``: weights, input and stream all bf16."""
    if precision not in DRIFT_PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {DRIFT_PRECISIONS}.")
    dtype = {"float64": torch.float64, "bf16-model": torch.bfloat16}.get(precision, torch.float32)
    ctx = (torch.autocast(x.device.type, dtype=torch.bfloat16) if precision == "bf16"
           else contextlib.nullcontext())
    return net.to(dtype), x.to(dtype), ctx


def drift(
    model: str = "revnet38", *, state_dict: dict[str, Any] | None = None, images: torch.Tensor | None = None,
    depths: Sequence[int] = (1, 2, 4, 8, 16, 32, 64), precisions: Sequence[str] = DRIFT_PRECISIONS,
    exact_precisions: Sequence[str] = ("float32", "bf16"), batch: int = 16, image_size: int = 32,
    in_chans: int = 3, num_classes: int = 10, device: str = "cpu", seed: int = 0,
    exact_bits: int = EXACT_BITS, progress: Progress = None,
) -> dict[str, Any]:
    """Reconstruction error of each reversible sequence's input after inverting N blocks.

    For each stage's :class:`ReversibleSequence`, its real input (from a forward of the
    whole model on ``images``, train-mode BatchNorm as in training) is run through its
    first N blocks and rebuilt from their output with the engine's arithmetic
    (:func:`revnet.fidelity.roundtrip`). Depths beyond the sequence's own length repeat
    its blocks cyclically (block ``i`` is block ``i mod len``): a deeper stack of the same
    kind of blocks, with trained weights where the model has them.

    Args:
        model: registered RevNet.
        state_dict: trained weights (e.g. ``torch.load("best.pt")["model"]``); the fresh
            initialisation (seed ``seed``) is always measured too.
        images: the batch (normalised images); default: ``batch`` random normal images.
        depths: numbers of blocks N.
        precisions: float mode in :data:`DRIFT_PRECISIONS` (see ``_precision``).
        exact_precisions: precisions also measured in exact mode (error 0 by design; a
            stream past the range is recorded as ``range_error``).
        exact_bits: fraction bits of exact mode's lattice.

    Returns:
        ``points``: one per (weights, precision, exact, sequence, depth) with
        ``max_abs_error`` and ``rel_error`` (max abs error / max |input|) and the input's
        and output's max magnitude; ``summary``: the worst sequence per configuration and depth.
    """
    if not depths or any(d < 1 for d in depths):
        raise ValueError(f"drift: depths must be positive block counts, got {list(depths)}.")
    torch.manual_seed(seed)
    if images is None:
        images = torch.randn(batch, in_chans, image_size, image_size)
    images = images.to(device)
    fresh = create_model(model, num_classes=num_classes, in_chans=images.shape[1]).to(device)
    if not isinstance(fresh, RevNet):
        raise ValueError(f"drift: {model!r} is not a RevNet.")
    weights = {"fresh": fresh.state_dict()}
    if state_dict is not None:
        weights["trained"] = state_dict
    plan = [(w, p, False) for w in weights for p in precisions]
    plan += [(w, p, True) for w in weights for p in exact_precisions]
    points = []
    for w, precision, exact in plan:
        net = create_model(model, num_classes=num_classes, in_chans=images.shape[1]).to(device)
        net.load_state_dict(weights[w])
        set_exact(net, exact, bits=exact_bits)
        net, x, ctx = _precision(net.train(), images, precision)
        with ctx:
            inputs = fidelity.sequence_inputs(net, lambda m, x=x: m(x))
            seqs = dict(net.named_modules())
            for name, inp in inputs.items():
                blocks = list(seqs[name].couplings)
                for n in depths:
                    chain = [blocks[i % len(blocks)] for i in range(n)]
                    point = {"weights": w, "precision": precision, "exact": exact, "sequence": name,
                             "depth": n, "blocks_in_sequence": len(blocks),
                             "input_max": inp.abs().max().item()}
                    try:
                        y, rebuilt = fidelity.roundtrip(chain, inp, seqs[name].dim)
                    except OverflowError as e:  # exact mode past its range: say where
                        point.update(max_abs_error=None, rel_error=None, output_max=None, range_error=str(e))
                    else:
                        point.update(fidelity.reconstruction_error(chain[0].entry(inp), rebuilt),
                                     output_max=y.abs().max().item())
                    points.append(point)
        if progress is not None:
            progress({"weights": w, "precision": precision, "exact": exact})
    summary = []
    for w, precision, exact in plan:
        for n in depths:
            key = (w, precision, exact, n)
            pts = [p for p in points if (p["weights"], p["precision"], p["exact"], p["depth"]) == key]
            ok = [p for p in pts if p["rel_error"] is not None]
            worst = max(ok, key=lambda p: p["rel_error"]) if ok else None
            summary.append({"weights": w, "precision": precision, "exact": exact, "depth": n,
                            "max_abs_error": max((p["max_abs_error"] for p in ok), default=None),
                            "rel_error": worst["rel_error"] if worst else None,
                            "worst_sequence": worst["sequence"] if worst else None,
                            "range_errors": sum("range_error" in p for p in pts)})
    config = {"model": model, "trained": state_dict is not None, "depths": list(depths),
              "precisions": list(precisions), "exact_precisions": list(exact_precisions),
              "exact_bits": exact_bits, "batch": images.shape[0], "image_size": images.shape[-1],
              "in_chans": images.shape[1],
              "device": device, "seed": seed, "batchnorm": "train mode (batch statistics)"}
    return {"config": config, "points": points, "summary": summary}


def exact_cost(
    model: str = "revnet38", *, batch: int = 128, image_size: int = 28, in_chans: int = 1,
    amps: Sequence[str] = ("none", "bf16"), repeats: int = 7, warmup: int = 2, memory: bool = True,
    device: str = "cpu", seed: int = 0, progress: Progress = None,
) -> dict[str, Any]:
    """What exact mode costs: training-step time and activation memory, exact vs float.

    Time: forward, cross-entropy and backward (reversible) of the same weights with the
    couplings in float and in exact mode, alternated in one process, for each autocast
    setting in ``amps``; ratios of medians. Memory: :func:`measure` (a fresh process on
    CPU) of one reversible training step in float32, float vs exact.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError("exact_cost: repeats must be >= 1 and warmup >= 0.")
    torch.manual_seed(seed)
    net = build("revnet", model=model, in_chans=in_chans, device=device)
    x, y = _batch(net, batch, image_size, in_chans)
    speed_runs = {}
    for amp in amps:
        ctx = (torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if amp == "bf16"
               else contextlib.nullcontext())

        def timed(exact: bool, ctx: Any = ctx) -> float:
            set_exact(net, exact)
            net.zero_grad(set_to_none=True)
            _sync(device)
            t = time.perf_counter()
            with ctx:
                loss = F.cross_entropy(net(x).float(), y)
            loss.backward()
            _sync(device)
            return time.perf_counter() - t

        times: dict[str, list[float]] = {"float": [], "exact": []}
        for _ in range(warmup):
            timed(False)
            timed(True)
        for r in range(repeats):
            for mode in (("float", "exact") if r % 2 else ("exact", "float")):
                times[mode].append(timed(mode == "exact"))
            if progress is not None:
                progress({"amp": amp, "repeat": r})
        stats = {k: _stats(v, batch) for k, v in times.items()}
        per = [a / b for a, b in zip(times["exact"], times["float"], strict=True)]
        spread = {"median": statistics.median(per), "min": min(per), "max": max(per)}
        speed_runs[amp] = {**stats, "ratio": stats["exact"]["median_s"] / stats["float"]["median_s"],
                           "pair_ratios": spread}
    set_exact(net, False)
    mem = {}
    if memory:
        point = {"kind": "revnet", "model": model, "batch": batch, "image_size": image_size,
                 "in_chans": in_chans, "device": device}
        for exact in (False, True):
            mem["exact" if exact else "float"] = measure(**point, exact=exact)
            if progress is not None:
                progress({"memory": exact})
    config = {"model": model, "batch": batch, "image_size": image_size, "in_chans": in_chans,
              "amps": list(amps), "repeats": repeats, "warmup": warmup, "device": device,
              "threads": torch.get_num_threads(), "seed": seed}
    return {"config": config, "speed": speed_runs, "memory": mem}


# --------------------------------------------------------------------------------------
# Where it ran
# --------------------------------------------------------------------------------------

def environment() -> dict[str, Any]:
    """Machine, versions, date and load: to be saved beside every result."""
    cpu = platform.processor()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    commit = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        def git(*args: str) -> str:
            return subprocess.run(["git", *args], capture_output=True, text=True,
                                  cwd=Path(__file__).parent, timeout=10).stdout.strip()

        commit = git("rev-parse", "--short", "HEAD") or None
        if commit and git("status", "--porcelain", "--untracked-files=no"):
            commit += " (with uncommitted changes)"
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
        "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "memory_bytes": _total_memory(), "loadavg": os.getloadavg(), "git_commit": commit,
    }


def _total_memory() -> int | None:
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as f:
        return int(f.readline().split()[1]) * 1024
    return None


# --------------------------------------------------------------------------------------
# Plots (matplotlib imported here only: the library does not need it otherwise)
# --------------------------------------------------------------------------------------

_STYLE = {"resnet": ("tab:red", "o"), "revnet": ("tab:blue", "s"),
          "revnet-plain": ("tab:orange", "^"), "revnet-checkpoint": ("tab:green", "D")}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_memory(sweep: dict[str, Any], path: str | Path) -> Path:
    """Activation memory against depth, one line per kind (and the named models); PNG."""
    plt = _pyplot()
    c = sweep["config"]
    named = [p for p in sweep["points"] if p["model"] is not None]
    fig, axes = plt.subplots(1, 2 if named else 1, figsize=(12 if named else 7, 4.5), dpi=120,
                             squeeze=False, gridspec_kw={"width_ratios": [3, 2] if named else [1]})
    ax = axes[0][0]
    for kind in c["kinds"]:
        pts = sorted((p["depth"], p["activation_bytes"] / 2**20) for p in sweep["points"]
                     if p["kind"] == kind and p["model"] is None)
        if pts:
            color, marker = _STYLE[kind]
            ax.plot(*zip(*pts, strict=True), marker=marker, color=color, label=kind)
    ax.set(xlabel="depth (layers with weights)", ylabel="activation memory of one training step (MiB)",
           title=f"Across depth: batch {c['batch']}, {c['image_size']}px, {c['device']}")
    ax.grid(alpha=0.3)
    ax.legend()
    if named:
        ax = axes[0][1]
        kinds = [k for k in KINDS if any(p["kind"] == k for p in named)]
        pairs = [pair for pair in PAPER_PAIRS if any(p["model"] in pair for p in named)]
        width = 0.8 / len(kinds)
        for i, kind in enumerate(kinds):
            vals = [next((p["activation_bytes"] / 2**20 for p in named
                          if p["kind"] == kind and p["model"] in pair), 0.0) for pair in pairs]
            bars = ax.bar([j + i * width for j in range(len(pairs))], vals, width,
                          color=_STYLE[kind][0], label=kind)
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
        ax.set_xticks([j + width * (len(kinds) - 1) / 2 for j in range(len(pairs))],
                      [f"{a} / {b}" for a, b in pairs], fontsize=8)
        ax.set(ylabel="MiB", title=f"The paper's models, batch {c['model_batch']}")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_speed(result: dict[str, Any], path: str | Path) -> Path:
    """Median training-step time per run (bars, quartiles as error bars); saved as PNG."""
    plt = _pyplot()
    names = list(result["train"])
    med = [result["train"][n]["median_s"] for n in names]
    err = [[m - result["train"][n]["p25_s"] for n, m in zip(names, med, strict=True)],
           [result["train"][n]["p75_s"] - m for n, m in zip(names, med, strict=True)]]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    bars = ax.bar(names, med, yerr=err, capsize=4,
                  color=[_STYLE.get(n, ("tab:gray", ""))[0] for n in names])
    ax.bar_label(bars, [f"{result['train'][n]['images_per_s']:.0f} img/s" for n in names],
                 label_type="center", fontsize=8, color="white")
    ax.tick_params(axis="x", labelsize=8, rotation=15)
    c = result["config"]
    ax.set(ylabel="seconds per training step (median)",
           title=f"{c['model']} vs {c['reference']}, batch {c['batch']}, {c['device']}"
                 f"{', channels_last' if c['channels_last'] else ''}")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_capacity(result: dict[str, Any], path: str | Path) -> Path:
    """Largest batch per model under the budget; saved as PNG."""
    plt = _pyplot()
    names = list(result["batch"])
    vals = [result["batch"][n]["largest"] or 0 for n in names]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    bars = ax.bar(names, vals, color=["tab:blue" if n.startswith("revnet") else "tab:red" for n in names])
    ax.bar_label(bars)
    ax.set(ylabel="largest batch that trains",
           title=f"Under a {format_bytes(result['config']['budget_bytes'])} budget "
                 f"({result['config']['device']})")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


_PRECISION_COLORS = {"float64": "tab:green", "float32": "tab:blue", "bf16": "tab:orange",
                     "bf16-model": "tab:red"}


def plot_drift(result: dict[str, Any], path: str | Path) -> Path:
    """Reconstruction error against depth (worst sequence), float modes as lines, exact mode
    as a note (its error is zero, off a log axis); saved as PNG."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), dpi=120)
    c = result["config"]
    for key, ax, label in (("rel_error", axes[0], "relative error (max |x' - x| / max |x|)"),
                           ("max_abs_error", axes[1], "max |x' - x|")):
        for row in _drift_lines(result):
            w, precision, pts = row
            pts = [(d, v) for d, v in pts[key] if v]  # zero does not go on a log axis
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o" if w == "trained" else "s",
                        ls="-" if w == "trained" else "--", label=f"{precision}, {w} weights",
                        color=_PRECISION_COLORS.get(precision, "tab:gray"))
        ax.set(xscale="log", yscale="log", xlabel="blocks inverted (N)", ylabel=label)
        ax.set_xticks(c["depths"], [str(d) for d in c["depths"]])
        ax.grid(alpha=0.3, which="both")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8)
    exact = [s for s in result["summary"] if s["exact"]]
    if exact:
        worst = max((s["max_abs_error"] or 0.0) for s in exact)
        over = sum(s["range_errors"] for s in exact)
        note = (f"exact mode ({', '.join(c['exact_precisions'])}):\nmax error {worst:g} at every depth"
                + (f"\n({over} point(s) left the range: see the table)" if over else ""))
        axes[1].text(0.98, 0.42, note, transform=axes[1].transAxes, fontsize=8, ha="right", va="center",
                     bbox={"facecolor": "white", "alpha": 0.8})
    fig.suptitle(f"{c['model']}: input of each reversible sequence rebuilt after N blocks "
                 f"(worst sequence; batch {c['batch']}, {c['image_size']}px, BN train mode)", fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def _drift_lines(result: dict[str, Any]) -> list[tuple[str, str, dict[str, list[tuple[int, float]]]]]:
    lines: dict[tuple[str, str], dict[str, list[tuple[int, float]]]] = {}
    for s in result["summary"]:
        if s["exact"]:
            continue
        line = lines.setdefault((s["weights"], s["precision"]), {"rel_error": [], "max_abs_error": []})
        line["rel_error"].append((s["depth"], s["rel_error"]))
        line["max_abs_error"].append((s["depth"], s["max_abs_error"]))
    return [(w, p, v) for (w, p), v in lines.items()]
