"""Training: ``fit(config) -> metrics``, with checkpoints that survive interruption.

A run directory holds ``config.json``, ``metrics.jsonl`` (one JSON object per log line),
``last.pt`` and ``best.pt`` (written atomically), ``summary.json`` and ``curves.png``.
Under ``torchrun`` the same loop runs DistributedDataParallel, rank 0 writing the run
directory (docs/DISTRIBUTED.md).
The learning rate is a pure function of the step, the data order and augmentation are
pure functions of ``(seed, epoch, step)``, and the RNG states are checkpointed, so a
resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import pickle
import signal
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import data as data_mod
from . import fidelity
from .autograd import Recomputed, ReversibleSequence
from .coupling import AdditiveCoupling, set_exact
from .distributed import DistInfo, DistributedError, init_from_env, is_group_failure, lost_contact, shutdown
from .fidelity import DRIFT_ACTIONS
from .models import create_model, list_models

__all__ = [
    "RECIPES",
    "TrainConfig",
    "TrainingDivergedError",
    "evaluate_checkpoint",
    "fit",
    "lr_at",
    "plot_run",
]

log = logging.getLogger(__name__)


def _group_norm(channels: int, **factory: Any) -> nn.GroupNorm:
    """GroupNorm with up to 8 groups: statistics per sample, so DDP needs no synchronisation."""
    return nn.GroupNorm(math.gcd(channels, 8), channels, **factory)


_NORMS: dict[str, Any] = {"batch": nn.BatchNorm2d, "group": _group_norm}  # TrainConfig.norm -> layer


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Saved as ``config.json`` and inside every checkpoint."""

    model: str = "revnet38"  # registry name (revnet.list_models())
    dataset: str = "fashion-mnist"  # one of revnet.data.DATASETS
    data_dir: str | None = None  # folder of the data set; None: revnet.data.default_data_dir
    epochs: float = 1.6  # passes over the training set, may be fractional (ignored when steps is set)
    steps: int | None = None  # total optimiser steps; overrides epochs
    batch_size: int = 128  # global: samples per optimiser step over all processes (each gets 1/world_size)
    lr: float = 0.2  # peak learning rate
    momentum: float = 0.9  # SGD momentum
    nesterov: bool = True  # Nesterov momentum
    weight_decay: float = 5e-4  # L2 on every parameter (as the paper's code)
    schedule: str = "onecycle"  # "onecycle" (linear warm-up, cosine to 0) or "step" (x0.1 at milestones)
    warmup: float = 0.15  # onecycle: fraction of steps spent warming up
    milestones: tuple[int, ...] = ()  # step schedule: steps at which lr is multiplied by 0.1
    crop_pad: int = 0  # random-crop zero padding in pixels (0: none; the short default learns faster without)
    flip: bool = True  # random horizontal flip
    label_smoothing: float = 0.0  # cross-entropy label smoothing
    seed: int = 0  # model init, data order and augmentation
    device: str = "auto"  # "auto" (cuda if present), "cpu", "cuda", "cuda:1", ...
    amp: str = "auto"  # "auto" (resolve_amp), "none", "bf16" or "fp16" (fp16 uses a GradScaler)
    reversible: bool = True  # False: the same model with plain backprop (the baseline)
    channels_last: bool = True  # memory layout of activations (faster convolutions on CPU)
    eval_every: int | None = None  # evaluate every N steps; None: at each epoch's end
    log_every: int = 50  # steps between metrics.jsonl lines
    ckpt_every: int = 200  # steps between last.pt checkpoints (also at each eval)
    out: str = "runs/default"  # run directory
    recipe: str = "fashion-mnist"  # the recipe these values started from (informational)
    synthetic: dict[str, int] = field(default_factory=dict)  # options of the synthetic data set
    norm: str = "batch"  # "batch" (BatchNorm, the paper) or "group" (GroupNorm: no cross-sample statistics)
    accum_steps: int = 1  # micro-batches per optimiser step on each process (DDP syncs only the last)
    lr_scaling: str = "none"  # "none": lr as given; "linear": peak lr x world size (Goyal et al. 2017)
    sync_bn: bool = False  # under DDP, BatchNorm -> SyncBatchNorm (global-batch statistics; CUDA only)
    dist_timeout: float = 600.0  # seconds a rendezvous or collective waits for the other processes
    exact: bool = False  # RevNet couplings in exact (fixed-point) mode: bit-exact rebuilds (revnet.set_exact)
    grad_angle_every: int | None = None  # every N steps: angle of reversible vs plain-autograd gradient
    drift_guard_every: int | None = None  # every N steps: rebuild each sequence's input and compare
    drift_guard_threshold: float = 0.1  # guard: relative rebuild error (max abs / max |input|) tolerated
    drift_guard_action: str = "warn"  # guard, past the threshold: "warn", "exact" or "store" (activations)

    def __post_init__(self) -> None:
        checks = [
            (self.model in list_models(), f"unknown model {self.model!r}; known: {list_models()}"),
            (self.dataset in data_mod.DATASETS,
             f"unknown dataset {self.dataset!r}; known: {data_mod.DATASETS}"),
            (self.batch_size > 0, f"batch_size must be > 0, got {self.batch_size}"),
            (self.epochs > 0 or (self.steps or 0) > 0, "need epochs > 0 or steps > 0"),
            (self.steps is None or self.steps > 0, f"steps must be > 0, got {self.steps}"),
            (self.lr > 0 and math.isfinite(self.lr), f"lr must be a positive number, got {self.lr}"),
            (self.schedule in ("onecycle", "step"),
             f"schedule must be 'onecycle' or 'step', got {self.schedule!r}"),
            (self.amp in AMP_MODES, f"amp must be one of {AMP_MODES}, got {self.amp!r}"),
            (0 <= self.warmup < 1, f"warmup must be a fraction in [0, 1), got {self.warmup}"),
            (self.log_every > 0 and self.ckpt_every > 0, "log_every and ckpt_every must be > 0"),
            (self.norm in _NORMS, f"norm must be one of {sorted(_NORMS)}, got {self.norm!r}"),
            (self.accum_steps >= 1, f"accum_steps must be >= 1, got {self.accum_steps}"),
            (self.batch_size % self.accum_steps == 0,
             f"batch_size {self.batch_size} is not divisible by accum_steps {self.accum_steps}"),
            (self.lr_scaling in ("none", "linear"),
             f"lr_scaling must be 'none' or 'linear', got {self.lr_scaling!r}"),
            (self.dist_timeout > 0, f"dist_timeout must be > 0 seconds, got {self.dist_timeout}"),
            (not self.exact or self.model.startswith("revnet"),
             f"exact mode needs a RevNet (its couplings), got model {self.model!r}"),
            (all(n is None or n > 0 for n in (self.grad_angle_every, self.drift_guard_every)),
             "grad_angle_every and drift_guard_every must be > 0 (or None: off)"),
            (self.drift_guard_threshold > 0,
             f"drift_guard_threshold must be > 0, got {self.drift_guard_threshold}"),
            (self.drift_guard_action in DRIFT_ACTIONS,
             f"drift_guard_action must be one of {DRIFT_ACTIONS}, got {self.drift_guard_action!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"TrainConfig: {msg}.")


RECIPES: dict[str, dict[str, Any]] = {
    # Sized for a 2-core laptop CPU: RevNet-38 on Fashion-MNIST in a few minutes.
    "fashion-mnist": {},
    # The longer Fashion-MNIST recipe (docs/PARITY.md): 30 epochs with crop (pad 2) + flip,
    # about an hour and a half on a 2-core CPU; aims at >= 94% final test accuracy (20 epochs
    # ended at 93.96%).
    "fashion-mnist-long": dict(epochs=30, crop_pad=2, flip=True),
    # Gomez et al. 2017, Sec. 5 / official CIFAR config: batch 100, lr 0.1 -> 0.01 at 40k
    # -> 0.001 at 60k, 80k iterations, momentum 0.9, weight decay 2e-4, crop (pad 4) + flip.
    "paper-cifar": dict(
        dataset="cifar10", batch_size=100, lr=0.1, momentum=0.9, nesterov=False, weight_decay=2e-4,
        schedule="step", milestones=(40_000, 60_000), steps=80_000, crop_pad=4, flip=True,
        eval_every=2_000, ckpt_every=1_000, amp="none"),
    # ImageNet schedule of the paper (documented; this package ships no ImageNet loader):
    # batch 256, lr 0.1 x0.1 at 160k, 320k, 480k of 600k iterations, weight decay 1e-4.
    "paper-imagenet": dict(
        model="revnet104", batch_size=256, lr=0.1, momentum=0.9, nesterov=False, weight_decay=1e-4,
        schedule="step", milestones=(160_000, 320_000, 480_000), steps=600_000, crop_pad=4, flip=True,
        eval_every=10_000, ckpt_every=2_000, amp="none"),
}


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


# --------------------------------------------------------------------------------------
# Pieces of the loop
# --------------------------------------------------------------------------------------

def lr_at(step: int, total: int, config: TrainConfig) -> float:
    """Learning rate for optimiser step ``step`` (0-based) of ``total``."""
    if config.schedule == "step":
        return config.lr * 0.1 ** sum(step >= m for m in config.milestones)
    warm = int(config.warmup * total)
    if step < warm:
        return config.lr * (step + 1) / warm
    progress = (step - warm) / max(total - warm, 1)
    return config.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use --device cpu.")
    return device


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory so far: CUDA allocator peak, or the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource  # fallback off Linux: ru_maxrss is KiB on Linux, bytes on macOS

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


AMP_MODES = ("auto", "none", "bf16", "fp16")


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """Whether this CPU does bf16 arithmetic natively (x86 AVX512-BF16 or AMX, Arm BF16).

    Without it bf16 autocast is emulated and slower than float32. Read from /proc/cpuinfo;
    False where that file does not exist (macOS, Windows).
    """
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = {f for line in text.splitlines() if line.startswith(("flags", "Features"))
             for f in line.split(":", 1)[1].split()}
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def resolve_amp(amp: str, device: torch.device) -> str:
    """The precision ``amp="auto"`` means on ``device``; other values are returned as they are.

    CUDA: bf16 where the GPU supports it, else fp16 (with a GradScaler). CPU: bf16 where the
    CPU has native bf16 (:func:`cpu_has_fast_bf16`), else "none" (float32).
    """
    if amp != "auto":
        return amp
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu":
        return "bf16" if cpu_has_fast_bf16() else "none"
    return "none"


def _autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def _to_layout(x: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if config.channels_last else x


def evaluate(model: nn.Module, loader: data_mod.Loader, config: TrainConfig, device: torch.device,
             info: DistInfo | None = None) -> dict:
    """Test loss and accuracy over the whole loader (no grad: reversibility costs nothing).

    Under DDP each rank evaluates its shard of the test set (``loader`` built with its rank)
    and the sums are all-reduced, so every rank returns the same figures.
    """
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    with torch.no_grad(), _autocast(device, config.amp):
        for x, y in loader.epoch(0):
            logits = model(_to_layout(x, config)).float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
            count += y.numel()
    model.train()
    if info is not None:
        loss_sum, correct, count = info.sum([loss_sum, correct, count], device)
    return {"test_loss": loss_sum / max(count, 1), "test_accuracy": correct / max(count, 1)}


def _save_atomic(obj: Any, path: Path) -> None:
    """Writes to a temporary file beside ``path``, then renames: never a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _write_json(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


@contextlib.contextmanager
def _stop_on_signals(grace: float = 0.0) -> Iterator[dict[str, int]]:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint at the next step and stops.

    A second signal more than ``grace`` seconds after the first stops at once.
    """
    flag: dict[str, int] = {}
    first: list[float] = []

    def handler(signum: int, _frame: Any) -> None:
        if flag and time.monotonic() - first[0] >= grace:  # a second signal: stop at once
            raise KeyboardInterrupt
        if flag:
            return
        first.append(time.monotonic())
        flag["signal"] = signum
        log.warning("received %s: saving a checkpoint after this step", signal.Signals(signum).name)

    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------

@dataclass
class _Run:
    """Everything the loop mutates, in one place (saved to and restored from last.pt)."""

    config: TrainConfig
    device: torch.device
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    train: data_mod.Loader
    test: data_mod.Loader
    total: int
    out: Path
    net: nn.Module | None = None  # what the loop trains: the model, or its DistributedDataParallel wrapper
    dist: DistInfo = field(default_factory=DistInfo)
    lr_scale: float = 1.0  # peak lr = config.lr * lr_scale (world size with lr_scaling="linear")
    step: int = 0
    best: float = -1.0
    history: list[dict[str, Any]] = field(default_factory=list)


def per_process_batch(config: TrainConfig, world_size: int) -> int:
    """Samples each process sees per optimiser step: ``batch_size / world_size`` (exactly)."""
    if config.batch_size % world_size:
        raise ValueError(
            f"batch size {config.batch_size} is global (all processes together) and does not divide "
            f"evenly over {world_size} processes; pass a multiple of {world_size}, e.g. --batch-size "
            f"{max(world_size, config.batch_size // world_size * world_size)}.")
    per = config.batch_size // world_size
    if per % config.accum_steps:
        raise ValueError(
            f"the per-process batch {per} (= {config.batch_size} / {world_size} processes) is not "
            f"divisible by --accum-steps {config.accum_steps}; pick a batch size that is a multiple of "
            f"{world_size * config.accum_steps}.")
    return per


def _device_for(config: TrainConfig, info: DistInfo) -> torch.device:
    device = resolve_device(config.device)
    if info.enabled and device.type == "cuda":
        if config.device not in ("auto", "cuda"):
            raise ValueError(f"under torchrun each process uses cuda:LOCAL_RANK; got --device "
                             f"{config.device!r}. Pass --device cuda (or auto).")
        device = torch.device("cuda", info.local_rank)
    return device


def _setup(config: TrainConfig, info: DistInfo | None = None) -> _Run:
    from .autograd import set_reversible
    from .coupling import set_exact

    info = info or DistInfo()
    device = _device_for(config, info)
    if config.amp == "auto":  # resolved once: config.json and checkpoints hold the precision used
        config = dataclasses.replace(config, amp=resolve_amp(config.amp, device))
        if info.is_main:
            log.info("amp auto: %s on %s", config.amp, device)
    per_rank = per_process_batch(config, info.world_size)
    torch.manual_seed(config.seed)
    extra = dict(config.synthetic) if config.dataset == "synthetic" else {}
    train_ds = data_mod.load_dataset(config.dataset, "train", config.data_dir, **extra)
    test_ds = data_mod.load_dataset(config.dataset, "test", config.data_dir, **extra)
    model = create_model(config.model, num_classes=train_ds.num_classes, in_chans=train_ds.in_chans,
                         **({} if config.norm == "batch" else {"norm_layer": _NORMS[config.norm]}))
    set_reversible(model, config.reversible)
    set_exact(model, config.exact)
    model.to(device, memory_format=torch.channels_last if config.channels_last else torch.preserve_format)
    net = _wrap_ddp(model, config, info, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                nesterov=config.nesterov, weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler(device.type) if config.amp == "fp16" else None
    # Each global step takes the next batch_size samples of a seeded per-epoch permutation;
    # rank r trains on its slice r of them (revnet.data.Loader).
    train = data_mod.Loader(train_ds, per_rank, train=True, device=device, seed=config.seed,
                            pad=config.crop_pad, flip=config.flip, augment=config.crop_pad > 0 or config.flip,
                            rank=info.rank, world_size=info.world_size)
    # Evaluation is sharded too: each rank takes its part of every global test batch.
    test_batch = min(max(per_rank, 256), max(1, math.ceil(len(test_ds) / info.world_size)))
    test = data_mod.Loader(test_ds, test_batch, train=False, device=device,
                           rank=info.rank, world_size=info.world_size)
    total = config.steps or max(1, round(config.epochs * len(train)))
    lr_scale = float(info.world_size) if config.lr_scaling == "linear" else 1.0
    return _Run(config, device, model, optimizer, scaler, train, test, total, Path(config.out),
                net=net, dist=info, lr_scale=lr_scale)


def _wrap_ddp(model: nn.Module, config: TrainConfig, info: DistInfo, device: torch.device) -> nn.Module:
    """DistributedDataParallel around ``model`` (with SyncBatchNorm if asked); ``model`` alone if one process.

    No ``find_unused_parameters``: the reversible engine returns every parameter's gradient
    from its backward, once, so DDP's buckets fill (and all-reduce) as backward proceeds.
    """
    if not info.enabled:
        if config.sync_bn:
            log.info("--sync-bn has no effect in a single process")
        return model
    if config.sync_bn:
        if device.type == "cpu":
            raise ValueError(
                "--sync-bn needs CUDA: PyTorch's SyncBatchNorm has no CPU kernels "
                "(torch.batch_norm_stats). On CPU train with --norm group (no cross-sample "
                "statistics), or keep per-process BatchNorm (drop --sync-bn).")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _checkpoint(run: _Run) -> dict[str, Any]:
    return {
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler else None,
        "step": run.step,
        "best": run.best,
        "rng": _rng_state(run.device),
        "engine_modes": _engine_modes(run.model),
        "config": asdict(run.config),
        "world_size": run.dist.world_size,
        "torch": torch.__version__,
    }


def _engine_modes(model: nn.Module) -> dict[str, dict[str, bool]]:
    """The per-module engine switches, which the drift guard may flip during a run.

    ``reversible`` of every sequence and recomputed unit, ``exact`` of every additive
    coupling, by module path. They live outside the state dict, so ``last.pt`` carries
    them apart: a resumed run must not fall back to the float rebuild the guard left.
    """
    out: dict[str, dict[str, bool]] = {"reversible": {}, "exact": {}}
    for name, m in model.named_modules():
        if isinstance(m, ReversibleSequence | Recomputed):
            out["reversible"][name] = bool(m.reversible)
        if isinstance(m, AdditiveCoupling):
            out["exact"][name] = bool(m.exact)
    return out


def _set_engine_modes(model: nn.Module, modes: dict[str, dict[str, bool]]) -> None:
    found = dict(model.named_modules())
    for name, flag in modes.get("reversible", {}).items():
        found[name].reversible = flag
    for name, flag in modes.get("exact", {}).items():
        set_exact(found[name], flag, prefix=name)


_RESUME_MAY_DIFFER = {"out", "device", "data_dir", "dist_timeout"}


def _check_resumable(state: dict[str, Any], run: _Run, path: Path) -> None:
    saved = TrainConfig(**_config_fields(state["config"]))
    diff = {k: (getattr(saved, k), getattr(run.config, k)) for k in asdict(saved)
            if k not in _RESUME_MAY_DIFFER and getattr(saved, k) != getattr(run.config, k)}
    if diff:
        lines = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"resume: {path} was written with a different configuration ({lines}); "
                         f"resume with the same settings or start a new --out.")
    world = state.get("world_size", 1)
    if run.config.lr_scaling == "linear" and world != run.dist.world_size:
        raise ValueError(f"resume: {path} was trained on {world} processes with --lr-scaling linear "
                         f"(lr x {world}); resume on {world} processes too, or the learning rate "
                         f"would jump to x {run.dist.world_size}.")


def _restore(run: _Run, path: Path) -> None:
    """Loads ``path`` on rank 0 and hands it to every rank (no shared file system needed)."""
    state: dict[str, Any] | None = None
    error: BaseException | None = None
    if run.dist.is_main:
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
            _check_resumable(state, run, path)
        except (OSError, ValueError, RuntimeError) as e:
            error = e
    run.dist.raise_together(error)
    state = run.dist.broadcast(state)
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    if run.scaler is not None and state["scaler"] is not None:
        run.scaler.load_state_dict(state["scaler"])
    run.step, run.best = state["step"], state["best"]
    _set_rng_state(state["rng"], run.device)
    _set_engine_modes(run.model, state.get("engine_modes", {}))  # older checkpoints lack it


def _config_fields(d: dict[str, Any]) -> dict[str, Any]:
    """A saved config dict back to TrainConfig arguments (JSON turns tuples into lists)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    out = {k: v for k, v in d.items() if k in names}
    if "milestones" in out:
        out["milestones"] = tuple(out["milestones"])
    return out


def _train_step(run: _Run, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step on this process's batch ``x`` (B, C, H, W), ``y`` (B,).

    With ``accum_steps = A`` the batch runs as A micro-batches of B/A whose gradients add
    up (each loss divided by A: the mean over the whole batch). Under DDP all but the last
    backward run inside ``no_sync()``, so gradients are all-reduced once per step.
    """
    net = run.net if run.net is not None else run.model
    steps = run.config.accum_steps
    run.optimizer.zero_grad(set_to_none=True)
    loss_sum, correct = torch.zeros((), device=x.device), torch.zeros((), dtype=torch.long, device=x.device)
    for i, (xi, yi) in enumerate(zip(x.chunk(steps), y.chunk(steps), strict=True)):
        last = i == steps - 1
        syncing = contextlib.nullcontext() if last or not hasattr(net, "no_sync") else net.no_sync()
        with syncing:
            with _autocast(run.device, run.config.amp):
                logits = net(_to_layout(xi, run.config))
                loss = F.cross_entropy(logits.float(), yi, label_smoothing=run.config.label_smoothing)
            scaled = loss / steps if steps > 1 else loss
            (run.scaler.scale(scaled) if run.scaler is not None else scaled).backward()
        loss_sum += loss.detach()
        correct += (logits.detach().argmax(1) == yi).sum()
    if run.scaler is not None:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    return loss_sum / steps, correct


def _fidelity_rows(run: _Run, x: torch.Tensor, y: torch.Tensor) -> list[dict[str, Any]]:
    """Gradient-angle telemetry and the drift guard, when due, on the batch of the coming step.

    Both leave the model, buffers and RNG as they were, so the step that follows is the
    one a run without them takes (revnet.fidelity); the guard may switch a sequence to
    exact mode or stored activations.
    """
    cfg, rows = run.config, []

    def forward(m: nn.Module) -> torch.Tensor:
        return m(_to_layout(x, cfg))

    def loss_fn(m: nn.Module) -> torch.Tensor:
        with _autocast(run.device, cfg.amp):
            return F.cross_entropy(forward(m).float(), y, label_smoothing=cfg.label_smoothing)

    if cfg.grad_angle_every and run.step % cfg.grad_angle_every == 0:
        rows.append({"step": run.step, **fidelity.gradient_angle(run.model, loss_fn)})
    if cfg.drift_guard_every and run.step % cfg.drift_guard_every == 0:
        with _autocast(run.device, cfg.amp):
            guard = fidelity.DriftGuard(cfg.drift_guard_threshold, cfg.drift_guard_action)
            rows += guard.check(run.model, forward, run.step)
    return rows


class _Window:
    """Running sums between two log lines (kept on the device: no sync per step)."""

    def __init__(self) -> None:
        self.loss, self.correct, self.seen, self.steps, self.start = 0.0, 0, 0, 0, time.perf_counter()

    def add(self, loss: torch.Tensor, correct: torch.Tensor, n: int) -> None:
        self.loss, self.correct = loss + self.loss, correct + self.correct
        self.seen, self.steps = self.seen + n, self.steps + 1

    def totals(self, run: _Run) -> tuple[float, int, int]:
        """Mean loss, correct and seen over the window, summed over all ranks (a collective)."""
        loss, correct, seen = run.dist.sum([float(self.loss), int(self.correct), self.seen], run.device)
        return loss / run.dist.world_size / max(self.steps, 1), int(correct), int(seen)

    def check(self, run: _Run, loss: float | None = None) -> float:
        """Mean loss of the window; raises before anything is logged or saved if it is not finite.

        Under DDP the loss is averaged over ranks first, so every rank takes the same decision.
        """
        loss = self.totals(run)[0] if loss is None else loss
        if not math.isfinite(loss):
            raise TrainingDivergedError(
                f"loss became {loss} by step {run.step}; the last good checkpoint is "
                f"{run.out / 'last.pt'}. Try a lower --lr, --amp none, or a different --seed.")
        return loss

    def row(self, run: _Run) -> dict[str, Any]:
        loss, correct, seen = self.totals(run)
        self.check(run, loss)
        elapsed = time.perf_counter() - self.start
        return {"step": run.step, "epoch": run.step / len(run.train), "loss": loss,
                "accuracy": correct / max(seen, 1),
                "lr": run.optimizer.param_groups[0]["lr"], "images_per_s": seen / max(elapsed, 1e-9),
                "peak_memory_bytes": peak_memory_bytes(run.device)}


def fit(config: TrainConfig, *, resume: bool = False, progress: bool = False) -> dict[str, Any]:
    """Trains ``config.model`` on ``config.dataset``; returns the run's summary.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) the process joins the process group (gloo on
    CPU, nccl on CUDA; an existing group is reused) and trains a DistributedDataParallel
    copy on its ``batch_size / world_size`` share of each global batch; rank 0 alone writes
    the run directory (docs/DISTRIBUTED.md).

    Args:
        config: the run.
        resume: continue from ``config.out/last.pt`` (same configuration required).
        progress: show a tqdm bar (else log lines through ``logging``); rank 0 only.

    Returns:
        The summary also written to ``summary.json`` (``interrupted`` is True when a
        signal stopped the run early), the same on every rank.

    Raises:
        TrainingDivergedError: the loss became non-finite; ``last.pt`` is the last good state.
        DistributedError: the process group failed (a rank died, the rendezvous or a
            collective timed out); ``last.pt`` is the last complete checkpoint.
        ValueError: among others, a batch size that the world size does not divide.
    """
    info = init_from_env(config.device, config.dist_timeout)
    try:
        summary = _fit(config, info, resume, progress)
    except RuntimeError as e:
        if info.enabled and not isinstance(e, DistributedError) and is_group_failure(e):
            raise lost_contact(e) from e
        raise
    shutdown(info)  # only on success: after a failure the group may be unusable
    return summary


def _fit(config: TrainConfig, info: DistInfo, resume: bool, progress: bool) -> dict[str, Any]:
    """:func:`fit` once the process knows its rank: rank 0 alone writes files and logs."""
    run = _setup(config, info)
    last = run.out / "last.pt"
    error: BaseException | None = None
    if info.is_main:  # the run directory lives on rank 0's node; the others learn its verdict
        if resume and not last.exists():
            error = FileNotFoundError(f"resume: no checkpoint {last}; check --out.")
        elif not resume and last.exists():
            error = FileExistsError(f"{run.out} already holds a run (last.pt); pass --resume to "
                                    f"continue it or choose another --out.")
    info.raise_together(error)
    if resume:
        _restore(run, last)
        if run.step >= run.total:
            raise ValueError(f"resume: {last} is a finished run (step {run.step} of {run.total}); its "
                             f"results are in {run.out / 'summary.json'} and `revnet eval {last}` tests it "
                             f"again. To train more, start a new --out with more --epochs/--steps.")
        log.info("resumed from %s at step %d", last, run.step)
    if info.enabled:
        log.info("DDP: %d processes (%s), %d samples per process per step, peak lr %g", info.world_size,
                 info.backend, run.train.batch_size, config.lr * run.lr_scale)
    if info.is_main:
        run.out.mkdir(parents=True, exist_ok=True)
        _write_json(asdict(run.config), run.out / "config.json")
    t0 = time.perf_counter()
    # Under torchrun a Ctrl-C reaches each worker twice (from the terminal and from torchrun):
    # within the grace period the second one does not abort the checkpoint being written.
    with _stop_on_signals(grace=5.0 if info.enabled else 0.0) as stop, \
            (open(run.out / "metrics.jsonl", "a") if info.is_main else contextlib.nullcontext()) as metrics:
        interrupted = _loop(run, metrics, stop, progress and info.is_main)
    summary = _summarize(run, time.perf_counter() - t0, interrupted)
    if info.is_main:
        _write_json(summary, run.out / "summary.json")
        with contextlib.suppress(Exception):  # a plot is a convenience; never lose a run to it
            plot_run(run.out)
    info.barrier()  # no rank leaves before rank 0's files are complete
    return summary


def _loop(run: _Run, metrics: Any, stop: dict[str, int], progress: bool) -> bool:
    from tqdm.auto import tqdm

    cfg, per_epoch = run.config, len(run.train)
    bar = tqdm(total=run.total, initial=run.step, disable=not progress, unit="step", dynamic_ncols=True)
    window = _Window()
    with bar:
        while run.step < run.total:
            epoch, start = divmod(run.step, per_epoch)
            for x, y in run.train.epoch(epoch, start):
                for group in run.optimizer.param_groups:
                    group["lr"] = lr_at(run.step, run.total, cfg) * run.lr_scale
                paused = time.perf_counter()
                for row in _fidelity_rows(run, x, y):  # telemetry on this batch, before the step
                    _emit(metrics, row, run)
                window.start += time.perf_counter() - paused  # images/s counts training alone
                try:
                    window.add(*_train_step(run, x, y), y.numel())
                except RuntimeError as e:  # DDP's all-reduce in backward: a rank died or hung
                    if run.dist.enabled and not isinstance(e, DistributedError) and is_group_failure(e):
                        raise lost_contact(e, f" at step {run.step + 1}") from e
                    raise
                run.step += 1
                bar.update(1)
                done = run.step >= run.total
                stopping = run.dist.any(bool(stop), run.device)  # all ranks stop at the same step
                if run.step % cfg.log_every == 0 or done:
                    row = window.row(run)
                    _emit(metrics, row, run)
                    bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['accuracy']:.3f}",
                                    img_s=f"{row['images_per_s']:.0f}")
                    if not progress and run.dist.is_main:
                        log.info("step %d/%d loss %.4f acc %.4f lr %.4g %.0f img/s", run.step, run.total,
                                 row["loss"], row["accuracy"], row["lr"], row["images_per_s"])
                    window = _Window()
                eval_due = (run.step % cfg.eval_every == 0) if cfg.eval_every else (run.step % per_epoch == 0)
                paused = time.perf_counter()
                if eval_due or done:
                    window.check(run)
                    _evaluate_and_keep_best(run, metrics)
                if eval_due or done or run.step % cfg.ckpt_every == 0 or stopping:
                    window.check(run)
                    if run.dist.is_main:
                        _save_atomic(_checkpoint(run), run.out / "last.pt")
                window.start += time.perf_counter() - paused  # images/s counts training alone
                if done:  # a signal during the last step: the run is complete all the same
                    break
                if stopping:
                    return True
    return False


def _emit(metrics: Any, row: dict[str, Any], run: _Run) -> None:
    """Records ``row``; only rank 0 holds the metrics file (``metrics`` is None elsewhere)."""
    run.history.append(row)
    if metrics is not None:
        metrics.write(json.dumps(row) + "\n")
        metrics.flush()


def _evaluate_and_keep_best(run: _Run, metrics: Any) -> None:
    # BatchNorm running statistics: every rank takes rank 0's, those that DDP broadcasts
    # before each forward and that the checkpoint holds.
    run.dist.broadcast_tensors(list(run.model.buffers()))
    result = evaluate(run.model, run.test, run.config, run.device, run.dist)
    _emit(metrics, {"step": run.step, "epoch": run.step / len(run.train), **result}, run)
    if run.dist.is_main:
        log.info("step %d: test accuracy %.4f, test loss %.4f", run.step, result["test_accuracy"],
                 result["test_loss"])
    if result["test_accuracy"] > run.best:
        run.best = result["test_accuracy"]
        if run.dist.is_main:
            _save_atomic(_checkpoint(run), run.out / "best.pt")


def _summarize(run: _Run, wall: float, interrupted: bool) -> dict[str, Any]:
    tests = [r for r in run.history if "test_accuracy" in r]
    trains = [r for r in run.history if "images_per_s" in r]
    last = tests[-1] if tests else {}
    return {
        "model": run.config.model, "dataset": run.config.dataset, "reversible": run.config.reversible,
        "step": run.step, "total_steps": run.total, "interrupted": interrupted,
        "test_accuracy": last.get("test_accuracy"), "test_loss": last.get("test_loss"),
        "best_test_accuracy": run.best if run.best >= 0 else None,
        "wall_seconds": wall, "peak_memory_bytes": peak_memory_bytes(run.device),
        "images_per_s": (sum(r["images_per_s"] for r in trains) / len(trains)) if trains else None,
        "image_size": run.train.dataset.image_size[0], "in_chans": run.train.dataset.in_chans,
        "device": str(run.device), "torch": torch.__version__, "config": asdict(run.config),
        "world_size": run.dist.world_size,
    }


# --------------------------------------------------------------------------------------
# After training: evaluation of a checkpoint, curves
# --------------------------------------------------------------------------------------

def evaluate_checkpoint(path: str | os.PathLike, *, data_dir: str | None = None,
                        device: str = "auto") -> dict[str, Any]:
    """Test accuracy of a checkpoint written by :func:`fit` (``last.pt`` or ``best.pt``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"eval: no checkpoint at {path}.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise ValueError(f"eval: {path} is not a readable torch checkpoint ({type(e).__name__}: {e}); "
                         f"pass a last.pt or best.pt written by `revnet train`.") from e
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ValueError(f"eval: {path} is not a revnet training checkpoint (no 'model'/'config').")
    fields = _config_fields(state["config"])
    fields.update(device=device, **({"data_dir": data_dir} if data_dir else {}))
    run = _setup(TrainConfig(**fields))
    run.model.load_state_dict(state["model"])
    _set_engine_modes(run.model, state.get("engine_modes", {}))
    return {"checkpoint": str(path), "step": state["step"],
            **evaluate(run.model, run.test, run.config, run.device)}


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"plot: no metrics.jsonl in {run_dir}; is it a run directory?")
    rows, bad = [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            row = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            row = None
            bad.append(number)
        if isinstance(row, dict):
            rows.append(row)
        elif row is not None:
            bad.append(number)
    if bad and not rows:
        raise ValueError(f"plot: {path} holds no JSON object per line (line {bad[0]} is not one); "
                         f"is it a revnet run's metrics file?")
    if bad:  # a process killed mid-write leaves a partial line; the rest is still good
        log.warning("%s: skipped %d line(s) that are not JSON objects (first: line %d)",
                    path, len(bad), bad[0])
    return rows


def plot_run(run_dir: str | os.PathLike) -> Path:
    """Draws loss, accuracy and learning rate against step into ``RUN_DIR/curves.png``.

    Runs with ``grad_angle_every`` get a panel of the gradient angle (whole model and per
    stage), runs with ``drift_guard_every`` one of each sequence's rebuild error.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    train = [r for r in rows if "loss" in r]
    test = [r for r in rows if "test_accuracy" in r]
    angles = [r for r in rows if r.get("grad_angle_deg") is not None]
    drift = [r for r in rows if isinstance(r.get("drift"), dict)]
    panels = 3 + bool(angles) + bool(drift)
    fig, axes = plt.subplots(1, panels, figsize=(13 * panels / 3, 3.6))
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    axes[0].plot([r["step"] for r in test], [r["test_loss"] for r in test], "o-", label="test")
    axes[0].set(title="loss", xlabel="step", yscale="log")
    axes[1].plot([r["step"] for r in train], [r["accuracy"] for r in train], label="train")
    axes[1].plot([r["step"] for r in test], [r["test_accuracy"] for r in test], "o-", label="test")
    axes[1].set(title="accuracy", xlabel="step")
    axes[2].plot([r["step"] for r in train], [r["lr"] for r in train])
    axes[2].set(title="learning rate", xlabel="step")
    for ax in axes[:2]:
        ax.legend()
        ax.grid(alpha=0.3)
    if angles:
        _plot_angles(axes[3], angles)
    if drift:
        _plot_drift(axes[-1], drift, [r for r in rows if r.get("event") == "drift"])
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    out = Path(run_dir) / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _plot_angles(ax: Any, rows: list[dict[str, Any]]) -> None:
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["grad_angle_deg"] for r in rows], "k.-", lw=2, label="whole model")
    for stage in dict.fromkeys(k for r in rows for k in r.get("grad_angle_by_stage", {})):
        vals = [(r["step"], r["grad_angle_by_stage"].get(stage)) for r in rows]
        vals = [(a, v) for a, v in vals if v is not None]
        if vals:
            ax.plot(*zip(*vals, strict=True), ".-", lw=1, alpha=0.8, label=stage)
    ax.set(title="reversible vs plain-autograd gradient", xlabel="step", ylabel="angle (degrees)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def _plot_drift(ax: Any, rows: list[dict[str, Any]], events: list[dict[str, Any]]) -> None:
    for seq in dict.fromkeys(k for r in rows for k in r["drift"]):
        vals = [(r["step"], r["drift"][seq]) for r in rows if r["drift"].get(seq)]
        if vals:
            ax.plot(*zip(*vals, strict=True), ".-", label=seq)
    for e in events:
        ax.axvline(e["step"], color="tab:red", alpha=0.4, lw=1)
    ax.set(title="rebuild error (drift guard; red: events)", xlabel="step",
           ylabel="max |x' - x| / max |x|", yscale="log")
    if ax.get_lines():
        ax.legend(fontsize=7)
    else:  # zero does not go on a log axis: exact mode, or nothing rebuilt
        ax.text(0.5, 0.5, "every check: 0", transform=ax.transAxes, ha="center")
    ax.grid(alpha=0.3)
