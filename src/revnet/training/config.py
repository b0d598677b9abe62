"""What a training run is: :class:`TrainConfig`, the recipes, and the learning-rate schedule."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..engine import has_reversible_units
from ..fidelity import DRIFT_ACTIONS
from ..memory.sizes import parse_bytes
from ..models import create_model, list_models, model_accepts
from .datasets import DATASETS
from .precision import AMP_MODES

__all__ = ["NORMS", "OPTIMIZERS", "RECIPES", "TRAIN_DATASETS", "TrainConfig", "headline",
           "is_reversible_model", "lr_at"]

TRAIN_DATASETS = (*DATASETS, "text")  # the image sets, and byte-level text (revnet.training.text)


def _group_norm(channels: int, **factory: Any) -> nn.GroupNorm:
    """GroupNorm with up to 8 groups: statistics per sample, so DDP needs no synchronisation."""
    return nn.GroupNorm(math.gcd(channels, 8), channels, **factory)


NORMS: dict[str, Any] = {"batch": nn.BatchNorm2d, "group": _group_norm}  # TrainConfig.norm -> layer

OPTIMIZERS = ("sgd", "adamw")
CONVERT_METHODS = ("momentum", "two-stream")  # revnet.convert's methods


def is_reversible_model(model: str) -> bool:
    """Whether registered model ``model`` has reversible units (False for an unknown name).

    Asked of the model, built once on the meta device (no memory, no initialisation):
    :func:`revnet.engine.has_reversible_units`, never a test of its name.
    """
    return model in list_models() and _rebuilds(model)


@functools.cache
def _rebuilds(model: str) -> bool:  # a name is registered once: its answer never changes
    return has_reversible_units(create_model(model, device="meta"))


def _is_size(text: str) -> bool:
    try:
        parse_bytes(text)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Saved as ``config.json`` and inside every checkpoint."""

    model: str = "revnet38"  # registry name (revnet.list_models())
    dataset: str = "fashion-mnist"  # in TRAIN_DATASETS: an image set, or "text" (bytes for a language model)
    data_dir: str | None = None  # folder of the data set; None: revnet.training.datasets.default_data_dir
    epochs: float = 1.6  # passes over the training set, may be fractional (ignored when steps is set)
    steps: int | None = None  # total optimiser steps; overrides epochs
    batch_size: int = 128  # global: samples per optimiser step over all processes (each gets 1/world_size)
    lr: float = 0.2  # peak learning rate
    optimizer: str = "sgd"  # "sgd" (momentum, the paper) or "adamw" (no decay on norms, biases, embeddings)
    momentum: float = 0.9  # SGD momentum; AdamW's beta1
    optimizer_in_backward: bool = False  # step each parameter in backward (revnet.optimizer_in_backward)
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
    amp: str = "auto"  # "auto" (the fastest here: precision.resolve_amp), "none", "bf16", "fp16" (GradScaler)
    amp_reason: str = ""  # why amp is what it is; set when "auto" is resolved at the start of a run
    nproc_reason: str = ""  # revnet train: how many local processes train, and why (--nproc auto's rule)
    reversible: bool = True  # False: the same model with plain backprop (the baseline)
    channels_last: bool = True  # memory layout of activations (faster convolutions on CPU)
    compile: str | None = None  # torch.compile backend for revnet.compile ("inductor"); None: eager
    # "1.5GiB": revnet.plan stores what fits, rebuilds the rest; "auto" (CUDA: what is free); "min": what
    # fits under the all-rebuild step's peak (nothing in plain autograd, which has nothing to rebuild)
    memory_budget: str | None = None
    eval_every: int | None = None  # evaluate every N steps; None: at each epoch's end
    log_every: int = 50  # steps between metrics.jsonl lines
    ckpt_every: int = 200  # steps between last.pt checkpoints (also at each eval)
    context_length: int = 128  # text: bytes per training window (the language model's context)
    out: str = "runs/default"  # run directory
    recipe: str = "fashion-mnist"  # the recipe these values started from (informational)
    synthetic: dict[str, int] = field(default_factory=dict)  # options of the synthetic data set
    norm: str = "batch"  # "batch" (BatchNorm, the paper) or "group" (GroupNorm: no cross-sample statistics)
    accum_steps: int = 1  # micro-batches per optimiser step on each process (DDP syncs only the last)
    lr_scaling: str = "none"  # "none": lr as given; "linear": peak lr x world size (Goyal et al. 2017)
    sync_bn: bool = False  # under DDP, BatchNorm -> SyncBatchNorm (global-batch statistics; CUDA only)
    fsdp: bool = False  # shard with FSDP2 per reversible block (and the root) instead of DDP
    # checkpoint files: "full" (one torch file), "sharded" (each FSDP rank writes its own part with
    # torch.distributed.checkpoint; training.shards), "auto": sharded under fsdp, else full
    checkpoint: str = "auto"
    dist_timeout: float = 600.0  # seconds a rendezvous or collective waits for the other processes
    exact: bool = False  # couplings in exact (fixed-point) mode: bit-exact rebuilds (revnet.set_exact)
    grad_angle_every: int | None = None  # every N steps: angle of reversible vs plain-autograd gradient
    drift_guard_every: int | None = None  # every N steps: rebuild each sequence's input and compare
    drift_guard_threshold: float = 0.1  # guard: relative rebuild error (max abs / max |input|) tolerated
    drift_guard_action: str = "warn"  # guard, past the threshold: "warn", "exact" or "store" (activations)
    init: str | None = None  # weights to start from: a revnet train checkpoint or a state-dict file
    convert: str | None = None  # revnet.convert the model (a residual one): "momentum" or "two-stream"
    convert_gamma: float | str = "auto"  # the gamma of --convert: "auto" (from the depth) or a number

    def __post_init__(self) -> None:
        # Only asked when a check needs it (a model built on the meta device, once per name).
        asked = self.exact or self.memory_budget not in (None, "min")
        reversible_model = asked and is_reversible_model(self.model)
        known = self.model in list_models()
        language_model = known and model_accepts(self.model, "vocab_size")
        checks = [
            (known, f"unknown model {self.model!r}; known: {list_models()}"),
            (self.dataset in TRAIN_DATASETS,
             f"unknown dataset {self.dataset!r}; known: {TRAIN_DATASETS}"),
            (not known or self.dataset not in TRAIN_DATASETS or language_model == (self.dataset == "text"),
             f"model {self.model!r} is a language model: train it on --dataset text (bytes), not on "
             f"{self.dataset!r} images" if language_model else
             f"dataset 'text' needs a language model (revgpt_mini, gpt_mini, ...), and {self.model!r} "
             f"classifies images"),
            (self.context_length >= 1, f"context_length must be >= 1, got {self.context_length}"),
            (self.dataset != "text" or self.label_smoothing == 0,
             f"label_smoothing is for classifiers; a language model's loss has none (got "
             f"{self.label_smoothing}): drop --label-smoothing"),
            (self.batch_size > 0, f"batch_size must be > 0, got {self.batch_size}"),
            (self.epochs > 0 or (self.steps or 0) > 0, "need epochs > 0 or steps > 0"),
            (self.steps is None or self.steps > 0, f"steps must be > 0, got {self.steps}"),
            (self.lr > 0 and math.isfinite(self.lr), f"lr must be a positive number, got {self.lr}"),
            (self.schedule in ("onecycle", "step"),
             f"schedule must be 'onecycle' or 'step', got {self.schedule!r}"),
            (self.amp in AMP_MODES, f"amp must be one of {AMP_MODES}, got {self.amp!r}"),
            (0 <= self.warmup < 1, f"warmup must be a fraction in [0, 1), got {self.warmup}"),
            (self.log_every > 0 and self.ckpt_every > 0, "log_every and ckpt_every must be > 0"),
            (self.norm in NORMS, f"norm must be one of {sorted(NORMS)}, got {self.norm!r}"),
            (self.accum_steps >= 1, f"accum_steps must be >= 1, got {self.accum_steps}"),
            (self.batch_size % self.accum_steps == 0,
             f"batch_size {self.batch_size} is not divisible by accum_steps {self.accum_steps}"),
            (self.lr_scaling in ("none", "linear"),
             f"lr_scaling must be 'none' or 'linear', got {self.lr_scaling!r}"),
            (self.dist_timeout > 0, f"dist_timeout must be > 0 seconds, got {self.dist_timeout}"),
            (self.compile is None or (isinstance(self.compile, str) and self.compile),
             f"compile must be a torch.compile backend name or None, got {self.compile!r}"),
            (self.memory_budget in (None, "auto", "min") or _is_size(self.memory_budget),
             f"memory_budget must be a size such as 1.5GiB, auto or min, got {self.memory_budget!r}"),
            (self.memory_budget in (None, "min") or (reversible_model and self.reversible),
             f"memory_budget plans a reversible model (RevNet, RevViT) in reversible mode, got model "
             f"{self.model!r}{'' if self.reversible else ' with reversible=False'}"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}"),
            (not self.fsdp or not (self.drift_guard_every or self.grad_angle_every or self.compile
                                   or self.sync_bn),
             "fsdp shards each block's parameters, which the drift guard, the gradient angle, --compile "
             "and --sync-bn do not handle yet: drop them, or --fsdp"),
            (self.checkpoint in ("auto", "full", "sharded"),
             f"checkpoint must be 'auto', 'full' or 'sharded', got {self.checkpoint!r}"),
            (self.checkpoint != "sharded" or self.fsdp,
             "checkpoint 'sharded' writes each rank's shards of an FSDP model, and without --fsdp every "
             "rank holds the whole model: add --fsdp, or use --checkpoint full"),
            (not self.optimizer_in_backward or self.accum_steps == 1,
             f"optimizer_in_backward steps each parameter as soon as its gradient is complete, so gradients "
             f"cannot accumulate over micro-batches (accum_steps={self.accum_steps}): drop --accum-steps, or "
             f"--optimizer-in-backward"),
            (not self.optimizer_in_backward or self.amp != "fp16",
             "optimizer_in_backward cannot take fp16's loss scaling (the scaler unscales and checks every "
             "gradient before one step): use --amp bf16 or none, or drop --optimizer-in-backward"),
            (not self.exact or reversible_model or self.convert,
             f"exact mode needs a reversible model (RevNet, RevViT) or --convert, got model {self.model!r}"),
            (all(n is None or n > 0 for n in (self.grad_angle_every, self.drift_guard_every)),
             "grad_angle_every and drift_guard_every must be > 0 (or None: off)"),
            (self.drift_guard_threshold > 0,
             f"drift_guard_threshold must be > 0, got {self.drift_guard_threshold}"),
            (self.drift_guard_action in DRIFT_ACTIONS,
             f"drift_guard_action must be one of {DRIFT_ACTIONS}, got {self.drift_guard_action!r}"),
            (self.convert in (None, *CONVERT_METHODS),
             f"convert must be one of {CONVERT_METHODS} (or None), got {self.convert!r}"),
            (self.convert_gamma == "auto" or (isinstance(self.convert_gamma, int | float)
                                               and 0 < self.convert_gamma < 1),
             f"convert_gamma must be in (0, 1) to train reversibly, or 'auto', got {self.convert_gamma!r}"),
            (self.convert is None or not known or not is_reversible_model(self.model),
             f"convert makes a residual model reversible, and {self.model!r} is reversible already: drop "
             f"--convert, or convert its residual counterpart (e.g. vit_mini, gpt_mini)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"TrainConfig: {msg}.")

    @property
    def sharded_checkpoints(self) -> bool:
        """Whether checkpoints are written sharded (each FSDP rank its own part)."""
        return self.checkpoint == "sharded" or (self.checkpoint == "auto" and self.fsdp)


def headline(config: TrainConfig) -> tuple[str, bool]:
    """The test metric a run is judged (and its best checkpoint chosen) by, and whether lower is
    better: bits per byte for a language model, accuracy for a classifier."""
    return ("test_bits_per_byte", True) if config.dataset == "text" else ("test_accuracy", False)


RECIPES: dict[str, dict[str, Any]] = {
    # Sized for a 2-core laptop CPU: RevNet-38 on Fashion-MNIST in a few minutes.
    "fashion-mnist": {},
    # The longer Fashion-MNIST recipe (docs/PARITY.md): 30 epochs with crop (pad 2) + flip,
    # about an hour and a half on a 2-core CPU; aims at >= 94% final test accuracy (20 epochs
    # ended at 93.96%).
    "fashion-mnist-long": dict(epochs=30, crop_pad=2, flip=True),
    # A CPU-sized Rev-ViT on Fashion-MNIST (revvit_mini: conv tokenizer, 49 tokens of 128, 6 blocks):
    # AdamW with warm-up and cosine decay, label smoothing, flips (docs/PARITY.md).
    "fashion-mnist-vit": dict(model="revvit_mini", optimizer="adamw", lr=2e-3, momentum=0.9,
                              weight_decay=0.05, warmup=0.1, label_smoothing=0.1, epochs=3, flip=True),
    # A byte-level reversible GPT (revgpt_mini: 4 blocks of 128, context 128) on the Python standard
    # library's own source, 20 files held out; the metric is bits per byte (docs/guide/language.md).
    "text-lm": dict(model="revgpt_mini", dataset="text", optimizer="adamw", lr=3e-3, momentum=0.9,
                    weight_decay=0.1, warmup=0.05, batch_size=32, context_length=128, steps=1200,
                    eval_every=400, flip=False, channels_last=False),
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


def lr_at(step: int, total: int, config: TrainConfig) -> float:
    """Learning rate for optimiser step ``step`` (0-based) of ``total``."""
    if config.schedule == "step":
        return config.lr * 0.1 ** sum(step >= m for m in config.milestones)
    warm = int(config.warmup * total)
    if step < warm:
        return config.lr * (step + 1) / warm
    progress = (step - warm) / max(total - warm, 1)
    return config.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
