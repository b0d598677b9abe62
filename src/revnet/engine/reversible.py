"""The reversible engine: backpropagation that rebuilds activations instead of storing them.

:class:`ReversibleSequence` runs a chain of couplings as a chain of custom
``torch.autograd.Function`` s, one per block (:class:`_ReversibleBlock`). Forward runs
every block without building a graph; only the last block keeps its output. Backward
walks the blocks in reverse, each rebuilding its input from its output just before it
needs it (Gomez et al. 2017, Algorithm 1) and handing it to the block before it, and
each block's parameter gradients leave as soon as that block is done. Only this module
(and :mod:`.recompute`, for units that cannot be inverted) frees or rebuilds activations.

Rules kept here (DESIGN.md, "Rules of the engine"):

1. Parameters enter the Function as inputs; their gradients are returned by
   ``backward``, so ``torch.autograd.grad``, hooks, accumulation and DDP see them.
2. BatchNorm running statistics are updated once, in the forward; the recomputation
   normalises with batch statistics but leaves the buffers alone.
3. The RNG state before each F and G is recorded and replayed, so dropout masks match.
4. The forward's autocast state is replayed in the recomputation.
5. An F or G that writes into its input is reported (see :meth:`Coupling._run`).
6. Without grad (``torch.no_grad()``, inference) the plain forward runs, at no extra cost.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.autograd.graph import GradientEdge

from .coupling import Coupling, merge, split
from .grads import Slot, add_into, grad_edge, param_slots, swapped
from .recompute import Recomputed
from .replay import autocast_state, batchnorm_stats_frozen, cuda_devices, get_rng, replay_autocast, set_rng

__all__ = ["ReversibleSequence", "set_reversible"]


class ReversibleSequence(nn.Module):
    """A chain of couplings whose backward pass stores no activations.

    Args:
        couplings: the blocks, each a :class:`revnet.Coupling` (e.g. ``AdditiveCoupling``),
            all splitting along the same ``dim``.
        reversible: when True (default) and grad is enabled, only the output is kept for
            backward and block inputs are rebuilt; when False the same modules run under
            ordinary autograd (the reference for tests, the baseline for benchmarks).
        preserve_rng_state: record and replay the RNG state around each F and G, so random
            layers (dropout, drop-path) give the same masks in the recomputation. Turn off
            only when F and G use no randomness.

    Attributes:
        reversible: may be flipped at any time, also through :func:`set_reversible`.
    """

    def __init__(
        self,
        couplings: Iterable[Coupling],
        *,
        reversible: bool = True,
        preserve_rng_state: bool = True,
    ) -> None:
        super().__init__()
        couplings = [couplings] if isinstance(couplings, Coupling) else list(couplings)
        if not couplings:
            raise ValueError("ReversibleSequence: needs at least one coupling, got none.")
        for i, c in enumerate(couplings):
            if not isinstance(c, Coupling):
                raise TypeError(
                    f"ReversibleSequence: item {i} is a {type(c).__name__}, not a coupling. "
                    f"Fix: wrap your residual functions as revnet.AdditiveCoupling(f, g)."
                )
            inner = {id(p) for p in c.f.parameters()} | {id(p) for p in c.g.parameters()}
            if any(id(p) not in inner for p in c.parameters()):
                raise ValueError(
                    f"ReversibleSequence: coupling {i} ({type(c).__name__}) has parameters outside "
                    f"its F and G; the reversible backward only differentiates F and G. Fix: move "
                    f"them into F or G."
                )
        dims = sorted({c.dim for c in couplings})
        if len(dims) > 1:
            raise ValueError(
                f"ReversibleSequence: couplings split along different dims {dims}; "
                f"give every coupling the same dim=."
            )
        self.couplings = nn.ModuleList(couplings)
        self.reversible = reversible
        self.preserve_rng_state = preserve_rng_state

    @property
    def dim(self) -> int:
        return self.couplings[0].dim

    def __len__(self) -> int:
        return len(self.couplings)

    def __iter__(self) -> Iterator[Coupling]:
        return iter(self.couplings)

    def __getitem__(self, i: int) -> Coupling:
        return self.couplings[i]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.bfloat16, torch.float16) and torch.is_autocast_enabled(x.device.type):
            # Under autocast the residual stream stays float32 (F and G still compute in bf16/fp16):
            # a bf16 stream loses ~1% per block when rebuilt (docs/FIDELITY.md). Both modes do it,
            # so reversible and plain backprop remain the same computation.
            x = x.float()
        if self.reversible and torch.is_grad_enabled() and (
                x.requires_grad or any(p.requires_grad for p in self.parameters())):
            _refuse_sharded_units(self)
            return _run_reversible(self, x)
        x1, x2 = split(x, self.dim, "ReversibleSequence")
        for c in self.couplings:
            x1, x2 = c.forward_halves(x1, x2)
        return merge(x1, x2, self.dim)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """Rebuilds the sequence's input from its output ``y``."""
        y1, y2 = split(y, self.dim, "ReversibleSequence")
        for c in reversed(self.couplings):
            y1, y2 = c.inverse_halves(y1, y2)
        return merge(y1, y2, self.dim)

    def extra_repr(self) -> str:
        return f"reversible={self.reversible}"


def _refuse_sharded_units(seq: ReversibleSequence) -> None:
    """FSDP units inside a sequence lose gradients silently (docs/DISTRIBUTED.md): refuse them."""
    fsdp = getattr(sys.modules.get("torch.distributed.fsdp"), "FSDPModule", None)
    if fsdp is None:  # FSDP never imported: nothing can be sharded
        return
    for name, m in seq.couplings.named_modules():
        if isinstance(m, fsdp):
            raise RuntimeError(
                f"ReversibleSequence: couplings.{name or '*'} is an FSDP unit (fully_shard). The "
                f"reversible backward runs F and G itself, so FSDP inside a sequence would drop "
                f"gradients. Fix: apply fully_shard to the whole ReversibleSequence (or the stage "
                f"holding it), or set it .reversible = False.")


def set_reversible(module: nn.Module, enabled: bool) -> int:
    """Sets ``.reversible`` on every :class:`ReversibleSequence` and :class:`Recomputed` unit.

    Off, the whole model trains under ordinary autograd (the baseline); on, the sequences
    rebuild their activations and the recomputed units keep only their inputs.

    Returns:
        How many modules were set.
    """
    count = 0
    for m in module.modules():
        if isinstance(m, (ReversibleSequence, Recomputed)):
            m.reversible = bool(enabled)
            count += 1
    return count


# --------------------------------------------------------------------------------------
# The Functions
# --------------------------------------------------------------------------------------

class _Chain:
    """What the blocks of one reversible call hand each other in backward.

    Backward runs the blocks last to first; each rebuilds its input from its output and
    leaves it here for the block before it, which needs it as its output. Nothing is held
    between forward and backward, and nothing after the first block's backward.
    """

    __slots__ = ("halves",)

    def __init__(self) -> None:
        self.halves: tuple[torch.Tensor, torch.Tensor] | None = None


@torch.compiler.disable  # an opaque unit under torch.compile: see recompute.apply_recomputed
def _run_reversible(seq: ReversibleSequence, x: torch.Tensor) -> torch.Tensor:
    """``seq(x)`` as chains of per-block Functions that keep only each chain's output.

    One Function per block (not one for the whole sequence) so that each block's parameter
    gradients leave backward when that block is done, not when the sequence is: at great
    depth a whole stage's gradients in flight would otherwise outweigh its activations.

    Blocks marked ``stored`` run under ordinary autograd; the rebuilt blocks between them form
    chains, each keeping its own output (which the next stored block takes as its input), so
    rebuilding restarts from the input of every stored block.
    """
    a: torch.Tensor = x
    b: torch.Tensor | None = None  # the whole x until the first block has split it, then halves
    blocks = list(seq.couplings)
    i = 0
    while i < len(blocks):
        if blocks[i].stored:
            if b is None:
                a, b = split(a, seq.dim, "ReversibleSequence")
            a, b = blocks[i].forward_halves(a, b)
            i += 1
            continue
        j = i
        while j < len(blocks) and not blocks[j].stored:
            j += 1
        chain = _Chain()
        for k in range(i, j):
            params = [p for p in blocks[k].parameters() if p.requires_grad]
            a, b = _ReversibleBlock.apply(a, b, chain, blocks[k], k == i, seq.preserve_rng_state, *params)
        if j == len(blocks):
            return _KeepOutput.apply(a, b, chain, seq.dim)
        a, b = _KeepHalves.apply(a, b, chain)
        i = j
    assert b is not None  # every block was stored: plain autograd throughout
    return merge(a, b, seq.dim)


class _KeepOutput(torch.autograd.Function):
    """Merges the last block's halves and is the one node that saves anything: the output.

    Its backward hands the output to the last block and returns at once, so autograd
    releases the saved output then (unless ``retain_graph``): it lives only until the last
    block has rebuilt its input from it, not through that block's whole backward.
    """

    @staticmethod
    def forward(ctx: Any, y1: torch.Tensor, y2: torch.Tensor, chain: _Chain, dim: int) -> torch.Tensor:
        y = merge(y1, y2, dim)
        ctx.save_for_backward(y)
        ctx.chain, ctx.dim = chain, dim
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (y,) = ctx.saved_tensors
        y1, y2 = split(y.detach(), ctx.dim, "ReversibleSequence")
        # y1 is needed through the last block's backward, y2 only until x2 is rebuilt: as
        # a copy, y1 no longer pins y2's half of the saved output (one half less at the peak).
        ctx.chain.halves = (y1.clone(), y2)
        dy1, dy2 = split(dy, ctx.dim, "ReversibleSequence")
        return dy1, dy2, None, None


class _KeepHalves(torch.autograd.Function):
    """Ends a chain that a stored block follows: keeps the chain's output as two halves.

    The stored block takes them as its input (and its own graph keeps what it needs of
    them); in backward they go to the chain's last block, as :class:`_KeepOutput` does.
    """

    @staticmethod
    def forward(ctx: Any, y1: torch.Tensor, y2: torch.Tensor,
                chain: _Chain) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.save_for_backward(y1, y2)
        ctx.chain = chain
        return y1.view_as(y1), y2.view_as(y2)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy1: torch.Tensor, dy2: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        y1, y2 = ctx.saved_tensors
        ctx.chain.halves = (y1.detach(), y2.detach())
        return dy1, dy2, None


class _ReversibleBlock(torch.autograd.Function):
    """One coupling of a reversible chain; it saves nothing.

    Inputs are ``(a, b, chain, coupling, start, keep_rng, *trainable_params)``: the
    sequence's first block takes the whole input as ``a`` (``b`` is None), the others the
    two halves; ``start`` marks the first block of its chain, which hands its rebuilt input
    to no one. Every block returns the halves of its output, which the next block's backward
    rebuilds (the chain's last block's comes from :class:`_KeepOutput` or :class:`_KeepHalves`).
    """

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, b: torch.Tensor | None, chain: _Chain, c: Coupling,
                start: bool, keep_rng: bool, *params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        whole = b is None
        x1, x2 = split(a, c.dim, "ReversibleSequence") if whole else (a, b)  # (B, C/2, ...)
        devices = cuda_devices(x1)
        # grad mode is off inside Function.forward: no graph is built
        rng_f = get_rng(devices) if keep_rng else None
        y1 = c.couple(x1, c.run_f(x1, x2))
        rng_g = get_rng(devices) if keep_rng else None
        y2 = c.couple(x2, c.run_g(x2, y1))
        ctx.chain, ctx.c, ctx.start, ctx.whole, ctx.params = chain, c, start, whole, params
        ctx.rng, ctx.devices, ctx.autocast = (rng_f, rng_g), devices, autocast_state()
        return y1, y2

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy1: torch.Tensor, dy2: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        c: Coupling = ctx.c
        if ctx.chain.halves is None:
            raise RuntimeError(
                "ReversibleSequence: a block's backward ran before the block after it had "
                "rebuilt its output. Backward must start from the sequence's output.")
        (y1, y2), ctx.chain.halves = ctx.chain.halves, None
        index = {id(p): i for i, p in enumerate(ctx.params)}
        # Detached leaves standing in for the parameters: the recomputation differentiates
        # these, so hooks on a parameter fire once, when the Function returns its gradient.
        aliases = [p.detach().requires_grad_() for p in ctx.params]
        grads: list[torch.Tensor | None] = [None] * len(ctx.params)

        def grad_of(h: torch.Tensor | GradientEdge, inp: torch.Tensor, slots: list[Slot],
                    dh: torch.Tensor) -> torch.Tensor | None:
            """Backprops ``dh`` through ``h``; adds the parameters' shares into ``grads``."""
            used = list(dict.fromkeys(i for _, _, i in slots))  # a tied weight counts once
            d_inp, *d_params = torch.autograd.grad(
                h, (inp, *(aliases[i] for i in used)), dh, allow_unused=True)
            for i, gp in zip(used, d_params, strict=True):
                if gp is not None:
                    grads[i] = gp if grads[i] is None else grads[i] + gp
            return d_inp

        rng_f, rng_g = ctx.rng
        outer_rng = get_rng(ctx.devices) if rng_f is not None else None
        # Memory: every half (B, C/2, ...) is dropped as soon as it is dead, before the next
        # backprop through a branch, and a branch's output is held only as its graph edge.
        try:
            with replay_autocast(ctx.autocast), batchnorm_stats_frozen(c):
                # G step: h = G(y1) with a graph; x2 = decouple(y2, h); backprop dy2.
                if rng_g is not None:
                    set_rng(rng_g, ctx.devices)
                slots = param_slots(c.g, index)
                with torch.enable_grad(), swapped(slots, aliases):
                    z1 = y1.detach().requires_grad_()
                    h = c.run_g(y2, z1)
                x2 = c.decouple(y2, h.detach())
                dx2, dh = c.couple_backward(x2, h.detach(), dy2)
                y2 = dy2 = None
                dz1 = grad_of(grad_edge(h), z1, slots, dh)
                dz1 = dy1 if dz1 is None else add_into(dz1, dy1, dx2)  # y1 feeds G and the output
                z1 = h = dh = dy1 = None
                # F step: h = F(x2) with a graph; x1 = decouple(y1, h); backprop dz1.
                if rng_f is not None:
                    set_rng(rng_f, ctx.devices)
                slots = param_slots(c.f, index)
                with torch.enable_grad(), swapped(slots, aliases):
                    x2.requires_grad_()
                    h = c.run_f(y1, x2)
                x1 = c.decouple(y1, h.detach())
                dx1, dh = c.couple_backward(x1, h.detach(), dz1)
                y1 = dz1 = None
                dx2_f = grad_of(grad_edge(h), x2, slots, dh)
                if dx2_f is not None:
                    dx2 = add_into(dx2_f, dx2, dx1)
                h = dh = dx2_f = None
        finally:
            if outer_rng is not None:
                set_rng(outer_rng, ctx.devices)  # backward leaves the caller's RNG as it was
        if ctx.whole:
            dx = merge(dx1, dx2, c.dim) if ctx.needs_input_grad[0] else None
            return (dx, None, None, None, None, None, *grads)
        if not ctx.start:
            ctx.chain.halves = (x1, x2.detach())  # the previous block's output
        return (dx1, dx2, None, None, None, None, *grads)


