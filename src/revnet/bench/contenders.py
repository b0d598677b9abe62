"""The networks the benchmarks compare and the four ways to train them (``KINDS``).

- ``resnet``: an ordinary pre-activation ResNet (every activation stored);
- ``revnet``: the RevNet with reversible backprop (Gomez et al. 2017, Algorithm 1);
- ``revnet-plain``: the very same RevNet and weights under ordinary autograd;
- ``revnet-checkpoint``: the same RevNet with every coupling run through
  ``torch.utils.checkpoint`` (non-reentrant): its inputs are stored, its insides recomputed.

The transformer family (``VIT_KINDS``) is the same four ways: ``vit`` (the residual ViT),
``revvit``, ``revvit-plain`` and ``revvit-checkpoint`` (RevViT; Mangalam et al. 2022).

The language models (``GPT_KINDS``): ``gpt`` (the residual GPT-2), ``revgpt`` (RevGPT with
reversible backprop), ``revgpt-plain`` (the same RevGPT under ordinary autograd) and
``gpt-checkpoint``: the *residual* GPT with every block run through ``torch.utils.checkpoint``
(what a GPT trained to save memory does today), not a checkpointed RevGPT. Their batch is token
ids (:func:`make_tokens`), their loss cross-entropy against the next tokens.

Also the pieces every measurement shares: which kind a registered model is (:func:`model_kind`,
asked of the model), a random batch, one training step, a device sync, the statistics of
repeated timings, and the count of bytes saved for backward (:class:`SavedBytes`, owned by
:mod:`revnet.memory.measure`; the checkpointed kinds add what ``torch.utils.checkpoint`` keeps).
"""

from __future__ import annotations

import contextlib
import functools
import statistics
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..engine import Recomputed, ReversibleSequence, has_reversible_units
from ..engine.coupling import merge, split
from ..memory.measure import SavedBytes
from ..models import ResNet, RevNet, RevViT, VisionTransformer, create_model, model_accepts
from ..models.transformer import TransformerBlock

__all__ = ["FAMILIES", "GPT_KINDS", "GPT_PAIRS", "GPT_SWEEP", "KINDS", "PAPER_PAIRS", "VIT_KINDS",
           "VIT_PAIRS", "VIT_SWEEP", "family_of", "is_baseline", "RESNET_CHANNELS", "REVNET_CHANNELS",
           "Progress", "SavedBytes", "build", "depth_of", "logits_loss", "make_batch", "make_tokens",
           "model_kind", "run_mode", "sync", "time_stats", "train_step"]

KINDS = ("resnet", "revnet", "revnet-plain", "revnet-checkpoint")
VIT_KINDS = ("vit", "revvit", "revvit-plain", "revvit-checkpoint")
GPT_KINDS = ("gpt", "revgpt", "revgpt-plain", "gpt-checkpoint")
FAMILIES = {"cnn": KINDS, "vit": VIT_KINDS, "gpt": GPT_KINDS}
# How run_mode treats each transformer kind; gpt-checkpoint (the residual GPT, checkpointed) is its own.
_AS_CNN = {**dict(zip(VIT_KINDS, KINDS, strict=True)), "gpt": "resnet", "revgpt": "revnet",
           "revgpt-plain": "revnet-plain"}
_BASELINES = ("resnet", "vit", "gpt", "gpt-checkpoint")  # kinds that train the non-reversible network

# The transformer sweep: ViT-Ti/16 widths (Touvron et al. 2021), its depth swept.
VIT_SWEEP = {"patch_size": 16, "embed_dim": 192, "num_heads": 3}
VIT_PAIRS = (("vit_base", "revvit_base"), ("vit_large", "revvit_large"))
# The language-model sweep: GPT-2 small's widths and vocabulary (Radford et al. 2019), its depth swept.
GPT_SWEEP = {"embed_dim": 768, "num_heads": 12, "vocab_size": 50257}
GPT_PAIRS = (("gpt2_small", "revgpt2_small"), ("gpt2_medium", "revgpt2_medium"))


def family_of(kind: str) -> str:
    """``"cnn"``, ``"vit"`` or ``"gpt"``: which family a kind belongs to."""
    for name, kinds in FAMILIES.items():
        if kind in kinds:
            return name
    raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS + VIT_KINDS + GPT_KINDS}.")


def is_baseline(kind: str) -> bool:
    """Whether ``kind`` trains the non-reversible network of a family (``resnet``, ``vit``, ``gpt``;
    and ``gpt-checkpoint``, the residual GPT checkpointed)."""
    return kind in _BASELINES


@functools.cache
def model_kind(name: str) -> str:
    """The kind that trains registered model ``name`` as it is built: ``resnet``, ``revnet``,
    ``vit``, ``revvit``, ``gpt`` or ``revgpt``.

    Asked of the model, never read from its name: built on the meta device (no memory, no
    initialisation), its family is its class (a ViT or RevViT is a vision transformer; a model
    whose constructor takes ``vocab_size`` is a language model, :func:`revnet.models.model_accepts`;
    anything else a CNN) and whether it rebuilds is :func:`revnet.engine.has_reversible_units`.

    Raises:
        ValueError: ``name`` is not a registered model.
    """
    net = create_model(name, device="meta")
    if isinstance(net, RevViT | VisionTransformer):
        family = "vit"
    elif model_accepts(name, "vocab_size"):
        family = "gpt"
    else:
        family = "cnn"
    baseline, reversible = FAMILIES[family][:2]
    return reversible if has_reversible_units(net) else baseline


RESNET_CHANNELS = (16, 16, 32, 64)   # the paper's CIFAR ResNets (Table 1)


REVNET_CHANNELS = (32, 32, 64, 128)  # RevNet-110 / RevNet-164 (Table 1)


PAPER_PAIRS = (("resnet32", "revnet38"), ("resnet110", "revnet110"), ("resnet164", "revnet164"))


Progress = Callable[[dict[str, Any]], None] | None


def depth_of(kind: str, units: int, block: str = "basic") -> int:
    """Layers with weights: ResNet ``6n+2`` (bottleneck ``9n+2``), RevNet ``12n+2`` (``18n+2``).

    Transformers (ViT, GPT): ``units`` is the number of blocks, and the depth.
    """
    if family_of(kind) in ("vit", "gpt"):
        return units
    per_unit = (3 if block == "bottleneck" else 2) * (1 if kind == "resnet" else 2)
    return 3 * per_unit * units + 2


def build(
    kind: str, units: int | None = None, *, model: str | None = None, block: str = "basic",
    in_chans: int = 3, num_classes: int = 10, device: str = "cpu", dtype: torch.dtype = torch.float32,
    image_size: int | None = None, context: int | None = None, embed_dim: int | None = None,
    num_heads: int | None = None, vocab_size: int | None = None,
) -> nn.Module:
    """A network for ``kind``: registered ``model`` if given, else ``units`` per stage (blocks).

    Sweep networks use the paper's CIFAR widths: ResNet 16-16-32-64, RevNet 32-32-64-128;
    transformers ViT-Ti/16's (:data:`VIT_SWEEP`) at ``image_size``; language models GPT-2
    small's (:data:`GPT_SWEEP`; ``embed_dim``, ``num_heads`` and ``vocab_size`` override it) with
    a position table of ``context`` tokens.
    """
    family = family_of(kind)
    if family == "gpt":
        return _build_gpt(kind, units, model=model, device=device, dtype=dtype, context=context,
                          embed_dim=embed_dim, num_heads=num_heads, vocab_size=vocab_size)
    if (embed_dim, num_heads, vocab_size) != (None, None, None):
        raise ValueError(f"build: embed_dim, num_heads and vocab_size size the language-model sweep; "
                         f"kind {kind!r} is {family}. Fix: leave them out, or use a GPT kind {GPT_KINDS}.")
    factory = {"device": device, "dtype": dtype, "in_chans": in_chans, "num_classes": num_classes}
    if family == "vit":
        size = {"img_size": image_size} if image_size is not None else {}
        if model is not None:
            net = create_model(model, **factory, **size)
        elif units is None:
            raise ValueError("build: give the number of blocks or a registered model name.")
        else:
            net = create_model("vit_small" if kind == "vit" else "revvit_small", depth=units, **VIT_SWEEP,
                               **factory, **size)
        if isinstance(net, RevViT) == (kind == "vit") or not isinstance(net, RevViT | VisionTransformer):
            want = "ViT" if kind == "vit" else "RevViT"
            raise ValueError(f"model {model!r} is not a {want} (kind {kind!r}).")
        return net
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


def _build_gpt(
    kind: str, units: int | None, *, model: str | None, device: str, dtype: torch.dtype, context: int | None,
    embed_dim: int | None, num_heads: int | None, vocab_size: int | None,
) -> nn.Module:
    """:func:`build` for the language models: GPT for ``gpt``/``gpt-checkpoint``, RevGPT otherwise."""
    reversible = not is_baseline(kind)
    factory = {"device": device, "dtype": dtype}
    if context is not None and context < 1:
        raise ValueError(f"build: context must be >= 1 token, got {context}.")
    if model is not None:
        if (embed_dim, num_heads, vocab_size) != (None, None, None):
            raise ValueError(f"build: embed_dim, num_heads and vocab_size size the sweep networks; model "
                             f"{model!r} has its own. Fix: leave them out.")
        if not model_accepts(model, "vocab_size"):  # raises for an unknown model
            raise ValueError(f"model {model!r} is not a language model (it takes no vocab_size); kind "
                             f"{kind!r} needs a GPT or RevGPT, e.g. gpt2_small or revgpt2_small.")
        net = create_model(model, **factory)
        if context is not None and context > net.context_length:
            raise ValueError(f"build: context {context} exceeds {model}'s context_length "
                             f"{net.context_length}. Fix: a context <= {net.context_length}.")
    elif units is None:
        raise ValueError("build: give the number of blocks or a registered model name.")
    else:
        size = {**GPT_SWEEP, **{k: v for k, v in (("embed_dim", embed_dim), ("num_heads", num_heads),
                                                   ("vocab_size", vocab_size)) if v is not None}}
        net = create_model("revgpt2_small" if reversible else "gpt2_small", depth=units,
                           context_length=context or 1024, **size, **factory)
    if has_reversible_units(net) != reversible:
        want = "RevGPT (reversible)" if reversible else "GPT (residual)"
        raise ValueError(f"model {model!r} is not a {want} language model (kind {kind!r}).")
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


class _CheckpointedBlock(nn.Module):
    """Runs a residual :class:`~revnet.models.transformer.TransformerBlock` through
    ``torch.utils.checkpoint``: its input is stored, its insides recomputed in backward."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor, **context: Any) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return self.block(x, **context)
        if SavedBytes.active is not None:  # checkpoint keeps the block's input
            SavedBytes.active.add(x)
        return checkpoint(self.block, x, use_reentrant=False, **context)


@contextlib.contextmanager
def run_mode(net: nn.Module, kind: str) -> Iterator[nn.Module]:
    """Sets up ``net`` to train as ``kind`` for the duration; the weights are untouched.

    ``revnet``: reversible sequences and recomputed stage openers; ``revnet-plain``: all
    under ordinary autograd; ``revnet-checkpoint``: every coupling and every opener through
    ``torch.utils.checkpoint``; ``gpt-checkpoint``: every residual transformer block through
    ``torch.utils.checkpoint``. The transformer kinds as their CNN counterparts.
    """
    family_of(kind)  # a known kind
    if kind == "gpt-checkpoint":
        with _checkpointed_blocks(net):
            yield net
        return
    kind = _AS_CNN.get(kind, kind)
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


@contextlib.contextmanager
def _checkpointed_blocks(net: nn.Module) -> Iterator[None]:
    """Every residual transformer block of ``net`` checkpointed for the duration."""
    blocks = [(parent, name, child) for parent in net.modules() for name, child in parent.named_children()
              if isinstance(child, TransformerBlock)]
    if not blocks:
        raise ValueError(f"run_mode: kind 'gpt-checkpoint' checkpoints residual transformer blocks, and "
                         f"{type(net).__name__} has none. Fix: build it with kind 'gpt'.")
    try:
        for parent, name, block in blocks:
            setattr(parent, name, _CheckpointedBlock(block))
        yield
    finally:
        for parent, name, block in blocks:
            setattr(parent, name, block)


def make_batch(net: nn.Module, batch: int, image_size: int, in_chans: int = 3,
           channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    p = next(net.parameters())
    x = torch.randn(batch, in_chans, image_size, image_size, device=p.device, dtype=p.dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, 10, (batch,), device=p.device)


def make_tokens(net: nn.Module, batch: int, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A language model's batch: random token ids ``(batch, context)`` int64 in ``[0, vocab_size)``
    and their next tokens ``(batch, context)`` as targets (one random sequence of ``context + 1``)."""
    if batch < 1 or context < 1:
        raise ValueError(f"make_tokens: batch and context must be >= 1, got batch {batch}, "
                         f"context {context}.")
    device = next(net.parameters()).device
    seq = torch.randint(0, net.vocab_size, (batch, context + 1), device=device)
    return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()


def logits_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits ``(B, T, V)`` against target tokens ``(B, T)``, over every position."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def train_step(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """Forward, cross-entropy and backward (no optimizer update: the same for every kind).

    Token ids ``x`` (an integer batch) are a language model's: its loss over every position, as
    ``revnet train`` computes it, ``net(x, targets=y)`` (no logits kept: :mod:`revnet.models.lm_loss`).
    """
    if not x.is_floating_point():
        net(x, targets=y).backward()
        return
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
