"""The networks the benchmarks compare and the four ways to train them (``KINDS``).

- ``resnet``: an ordinary pre-activation ResNet (every activation stored);
- ``revnet``: the RevNet with reversible backprop (Gomez et al. 2017, Algorithm 1);
- ``revnet-plain``: the very same RevNet and weights under ordinary autograd;
- ``revnet-checkpoint``: the same RevNet with every coupling run through
  ``torch.utils.checkpoint`` (non-reentrant): its inputs are stored, its insides recomputed.

Also the pieces every measurement shares: a random batch, one training step, a device
sync, the statistics of repeated timings, and the count of bytes saved for backward.
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..engine import Recomputed, ReversibleSequence
from ..engine.coupling import merge, split
from ..models import ResNet, RevNet, create_model

__all__ = ["KINDS", "PAPER_PAIRS", "RESNET_CHANNELS", "REVNET_CHANNELS", "Progress", "SavedBytes", "build",
           "depth_of", "make_batch", "run_mode", "sync", "time_stats", "train_step"]

KINDS = ("resnet", "revnet", "revnet-plain", "revnet-checkpoint")


RESNET_CHANNELS = (16, 16, 32, 64)   # the paper's CIFAR ResNets (Table 1)


REVNET_CHANNELS = (32, 32, 64, 128)  # RevNet-110 / RevNet-164 (Table 1)


PAPER_PAIRS = (("resnet32", "revnet38"), ("resnet110", "revnet110"), ("resnet164", "revnet164"))


Progress = Callable[[dict[str, Any]], None] | None


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


class SavedBytes:
    """Counts the distinct storages the autograd graph keeps for backward (not parameters)."""

    active: SavedBytes | None = None

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

    def __enter__(self) -> SavedBytes:
        SavedBytes.active = self
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)
        SavedBytes.active = None


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
                if SavedBytes.active is not None:  # checkpoint keeps each block's inputs
                    SavedBytes.active.add(x1, x2)
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
        if SavedBytes.active is not None:  # checkpoint keeps the unit's input
            SavedBytes.active.add(x)
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


def make_batch(net: nn.Module, batch: int, image_size: int, in_chans: int = 3,
           channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    p = next(net.parameters())
    x = torch.randn(batch, in_chans, image_size, image_size, device=p.device, dtype=p.dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, 10, (batch,), device=p.device)


def train_step(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """Forward, cross-entropy and backward (no optimizer update: the same for every kind)."""
    F.cross_entropy(net(x), y).backward()


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_stats(times: Sequence[float], images: int) -> dict[str, Any]:
    """Median, quartiles and minimum of repeated timings (seconds), and images/s at the median."""
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    med = statistics.median(times)
    return {"median_s": med, "p25_s": q[0], "p75_s": q[2], "min_s": min(times),
            "images_per_s": images / med, "times_s": list(times)}
