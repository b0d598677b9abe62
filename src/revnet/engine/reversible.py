"""The reversible engine: backpropagation that rebuilds activations instead of storing them.

:class:`ReversibleSequence` runs a chain of couplings as a chain of custom
``torch.autograd.Function`` s, one per block (:class:`_ReversibleBlock`). Forward runs
every block without building a graph; only the chain's end keeps its output. Backward
walks the blocks in reverse, each rebuilding its input from its output just before it
needs it (Gomez et al. 2017, Algorithm 1) and handing it to the block before it through
the chain (:class:`_Chain`), and each block's parameter gradients leave as soon as that
block is done. Only this module (and :mod:`.recompute`, for units that cannot be inverted)
frees or rebuilds activations.

The engine's rules (docs/DESIGN.md), and where each is kept:

1. Parameters enter the Function as inputs; their gradients are returned by
   ``backward`` (:class:`.replay.ParamGrads`), so ``torch.autograd.grad``, hooks,
   accumulation and DDP see them.
2. BatchNorm running statistics are updated once, in the forward; the recomputation
   normalises with batch statistics but leaves the buffers alone (:class:`.replay.Replay`).
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

from .context import Context
from .coupling import Coupling, halves, merge, split
from .exact import Tape
from .replay import ParamGrads, Replay, add_into, grad_edge

__all__ = ["ReversibleSequence"]


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

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The output for input ``x``; ``args`` and ``kwargs`` (masks, positions, encoder states)
        reach every F and G after its half: ``f(half, *args, **kwargs)``. Tensors among them
        get their gradients, summed over the blocks; in reversible mode they are kept once for
        the whole sequence (the same storage in every block), not rebuilt."""
        context = Context(args, kwargs)
        if x.dtype in (torch.bfloat16, torch.float16) and torch.is_autocast_enabled(x.device.type):
            # Under autocast the residual stream stays float32 (F and G still compute in bf16/fp16):
            # a bf16 stream loses ~1% per block when rebuilt (docs/FIDELITY.md). Both modes do it,
            # so reversible and plain backprop remain the same computation.
            x = x.float()
        x1, x2 = halves(x, self.dim, "ReversibleSequence")  # (B, C/2, ...) each
        if self.reversible and torch.is_grad_enabled() and (
                x.requires_grad or any(t.requires_grad for t in context.tensors)
                or any(p.requires_grad for p in self.parameters())):
            _refuse_sharded_units(self)
            return _run_reversible(self, x1, x2, context)
        for c in self.couplings:
            x1, x2 = _plain_block(c, x1, x2, context, self.dim)
        return merge(x1, x2, self.dim)

    def inverse(self, y: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Rebuilds the sequence's input from its output ``y = seq(x, *args, **kwargs)``."""
        context = Context(args, kwargs)
        taped = [i for i, c in enumerate(self.couplings) if c.needs_tape]
        if taped:
            raise RuntimeError(
                f"ReversibleSequence.inverse: coupling {taped[0]} "
                f"({type(self.couplings[taped[0]]).__name__}) "
                f"is in exact mode, whose rebuild needs the remainders its forward recorded, which an "
                f"output alone does not carry. Fix: revnet.fidelity.drift.roundtrip(seq.couplings, x, dim) "
                f"runs the forward and the rebuild together.")
        y1, y2 = halves(y, self.dim, "ReversibleSequence")
        for c in reversed(self.couplings):
            y1, y2 = c.inverse_halves(y1, y2, context)
        return merge(y1, y2, self.dim)

    def extra_repr(self) -> str:
        return f"reversible={self.reversible}"


def _fsdp_module_type() -> type | None:
    return getattr(sys.modules.get("torch.distributed.fsdp"), "FSDPModule", None)


def _refuse_sharded_units(seq: ReversibleSequence) -> None:
    """FSDP units below a coupling (F or G sharded alone) lose gradients silently: refuse them.

    A coupling sharded as a whole (``fully_shard(block)`` for each block) is what the engine drives
    itself (:func:`_fsdp_groups`); inside it, FSDP's hooks would see the recomputation's aliases
    and reduce nothing."""
    fsdp = _fsdp_module_type()
    if fsdp is None:  # FSDP never imported: nothing can be sharded
        return
    for i, c in enumerate(seq.couplings):
        for name, m in c.named_modules():
            if name and isinstance(m, fsdp):
                raise RuntimeError(
                    f"ReversibleSequence: couplings.{i}.{name} is an FSDP unit (fully_shard) below its "
                    f"coupling. The reversible backward runs F and G itself, so FSDP inside a coupling would "
                    f"drop gradients. Fix: shard each coupling as a whole (for block in seq: "
                    f"fully_shard(block)), or the whole sequence, or set it .reversible = False.")


def _fsdp_groups(c: Coupling) -> list[Any]:
    """The FSDP2 parameter groups of a coupling sharded with ``fully_shard`` (none if it is not).

    The engine never calls a coupling through ``nn.Module.__call__``, so FSDP's own hooks do not
    run for it: the engine gathers the group's parameters for the block's forward and again for
    its rebuild, hands the rebuilt block's gradients to the group (``post_backward``: the
    reduce-scatter into the sharded parameters' ``.grad``) and reshards after each. Uses FSDP2's
    parameter-group object (``FSDPState._fsdp_param_groups``), not a public API: written against
    torch 2.13, checked by tests/engine/test_fsdp_blocks.py.
    """
    fsdp = _fsdp_module_type()
    if fsdp is None or not isinstance(c, fsdp):
        return []
    state = c._get_fsdp_state()
    if getattr(state, "_is_root", True) is None:
        raise RuntimeError(
            f"ReversibleSequence: a sharded {type(c).__name__} was never initialised by FSDP, which does so "
            f"on the first forward of the root unit; the engine runs the block itself, so no unit above it "
            f"is sharded. Fix: shard the model too, after its blocks (fully_shard(model)).")
    groups = list(getattr(state, "_fsdp_param_groups", ()))
    if any(getattr(g, "_training_state", None) is None or not hasattr(g, "fsdp_params") for g in groups):
        raise RuntimeError(f"ReversibleSequence: the FSDP state of a sharded {type(c).__name__} has a layout "
                           f"this revnet does not know (written against torch 2.13's FSDP2).")
    return groups


def _plain_block(c: Coupling, x1: torch.Tensor, x2: torch.Tensor, context: Context,
                 dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A block under ordinary autograd (plain mode, a stored block, no grad). A sharded one runs
    through its own ``__call__``, so that FSDP's hooks gather its parameters, keep them for its
    autograd backward and reduce-scatter its gradients."""
    if not _fsdp_groups(c):
        return c.forward_halves(x1, x2, context)
    args, kwargs = context.arguments()
    y1, y2 = split(c(merge(x1, x2, dim), *args, **kwargs), dim, "ReversibleSequence")
    return y1, y2


def _gathered(groups: list[Any], c: Coupling) -> list[torch.Tensor]:
    """Unshards the groups' parameters (all-gather, waited for); returns the unsharded parameters.

    Under FSDP's mixed precision (``MixedPrecisionPolicy(param_dtype=...)``) they come in that dtype,
    and F and G take their halves cast to it (``Coupling.branch_dtype``), as FSDP's forward hook
    would cast a module's inputs; the residual stream keeps its own dtype, as under autocast."""
    for g in groups:
        g.unshard()
        g.wait_for_unshard()
    if groups:
        c.branch_dtype = getattr(getattr(groups[0], "mp_policy", None), "param_dtype", None)
    return [fp.unsharded_param for g in groups for fp in g.fsdp_params]


# --------------------------------------------------------------------------------------
# The Functions
# --------------------------------------------------------------------------------------

@torch.compiler.disable  # an opaque unit under torch.compile: see recompute.apply_recomputed
def _run_reversible(seq: ReversibleSequence, x1: torch.Tensor, x2: torch.Tensor,
                    context: Context) -> torch.Tensor:
    """``seq`` on the halves of its input, as chains of per-block Functions that keep only each
    chain's output.

    One Function per block (not one for the whole sequence) so that each block's parameter
    gradients leave backward when that block is done, not when the sequence is: at great
    depth a whole stage's gradients in flight would otherwise outweigh its activations.

    Blocks marked ``stored`` run under ordinary autograd; the rebuilt blocks between them form
    chains, each keeping its own output (which the next stored block takes as its input), so
    rebuilding restarts from the input of every stored block.
    """
    blocks = list(seq.couplings)
    i = 0
    while True:
        if blocks[i].stored:
            x1, x2 = _plain_block(blocks[i], x1, x2, context, seq.dim)  # its graph keeps what backward needs
            i += 1
            if i == len(blocks):
                return merge(x1, x2, seq.dim)
            continue
        chain = _Chain()
        while i < len(blocks) and not blocks[i].stored:
            # A sharded block's gradients go to FSDP (the reduce-scatter), not out of the Function.
            params = [] if _fsdp_groups(blocks[i]) else [p for p in blocks[i].parameters() if p.requires_grad]
            x1, x2 = _ReversibleBlock.apply(x1, x2, chain, blocks[i], seq.preserve_rng_state, context,
                                            *context.tensors, *params)
            i += 1
        if i == len(blocks):
            return _KeepOutput.apply(x1, x2, chain, seq.dim)
        x1, x2 = _KeepHalves.apply(x1, x2, chain)


class _Chain:
    """The mailbox through which the blocks of one chain hand each other halves in backward.

    Backward runs the blocks last to first. The chain's end (:class:`_KeepOutput` or
    :class:`_KeepHalves`) posts the chain's output; each block takes its output from here,
    rebuilds its input from it and posts that for the block before it, except the chain's
    first block, whose input no one here needs. Nothing is held between forward and
    backward, and nothing after the first block's backward.
    """

    __slots__ = ("blocks", "halves", "left", "size")

    def __init__(self) -> None:
        self.size = 0  # blocks in the chain (counted in forward)
        self.left = 0  # blocks whose backward has not taken their output yet
        self.blocks: list[Coupling] = []  # in forward order: whom backward rebuilds next
        self.halves: tuple[torch.Tensor, torch.Tensor] | None = None

    def start(self, y1: torch.Tensor, y2: torch.Tensor) -> None:
        self.left, self.halves = self.size, (y1, y2)

    def take(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.halves is None:
            raise RuntimeError(
                "ReversibleSequence: a block's backward ran before the block after it had "
                "rebuilt its output. Backward must start from the sequence's output.")
        halves, self.halves = self.halves, None
        self.left -= 1
        return halves

    def hand_back(self, x1: torch.Tensor, x2: torch.Tensor) -> None:
        if self.left:
            self.halves = (x1, x2)


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
        # y1 is needed through the last block's backward, y2 only until x2 is rebuilt: as a
        # (dense) copy, y1 no longer pins y2's half of the saved output (one half less at the peak).
        ctx.chain.start(y1.clone(), y2)
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
        ctx.chain.start(y1.detach(), y2.detach())
        return dy1, dy2, None


class _ReversibleBlock(torch.autograd.Function):
    """One coupling of a reversible chain; it saves nothing.

    Inputs are ``(x1, x2, chain, coupling, keep_rng, context, *context.tensors,
    *trainable_params)``; it returns the halves of its output, which the backward of the block
    after it rebuilds (or the chain's end keeps). The context's tensors are saved by every
    block, which keeps one storage each, whatever the depth; their gradients leave with the
    parameters', and autograd sums them over the blocks.
    """

    @staticmethod
    def forward(ctx: Any, x1: torch.Tensor, x2: torch.Tensor, chain: _Chain, c: Coupling, keep_rng: bool,
                context: Context, *tensors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # grad mode is off inside Function.forward: no graph is built
        chain.size += 1
        chain.blocks.append(c)
        n = len(context.tensors)
        ctx.chain, ctx.c, ctx.context, ctx.params = chain, c, context, tensors[n:]
        ctx.replay = Replay(x1, keep_rng)
        tape = Tape() if c.needs_tape else None  # what exact mode's scalings lose, for the rebuild
        groups = _fsdp_groups(c)
        _gathered(groups, c)
        ctx.replay.mark()  # 0: before F
        y1 = c.apply_couple("f", x1, c.run_f(x1, x2, context), tape)
        ctx.replay.mark()  # 1: before G
        y2 = c.apply_couple("g", x2, c.run_g(x2, y1, context), tape)
        for g in groups:
            g.reshard()
        c.branch_dtype = None
        ctx.tape_keys, kept = (tape.keys(), tape.values()) if tape is not None else ((), ())
        # The context's tensors: autograd then reports a write into them before backward; the tape's,
        # so that they count where saved tensors are counted (and leave with this block's backward).
        ctx.save_for_backward(*tensors[:n], *kept)
        return y1, y2

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy1: torch.Tensor, dy2: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        c: Coupling = ctx.c
        replay: Replay = ctx.replay
        y1, y2 = ctx.chain.take()
        if ctx.chain.left:  # FSDP: the block rebuilt next starts gathering its parameters now
            for g in _fsdp_groups(ctx.chain.blocks[ctx.chain.left - 1]):
                g.unshard(async_op=True)
        saved = ctx.saved_tensors
        n = len(saved) - len(ctx.tape_keys)
        tape = Tape.of(ctx.tape_keys, saved[n:]) if ctx.tape_keys else None
        saved = saved[:n]
        groups = _fsdp_groups(c)
        sharded = _gathered(groups, c) if groups else None
        grads = ParamGrads(tuple(sharded) if groups else ctx.params, saved,
                           ctx.needs_input_grad[6:6 + len(saved)])
        context = ctx.context.replaced(grads.context)
        # Memory: every half (B, C/2, ...) is dropped as soon as it is dead, before the next
        # backprop through a branch, and a branch's output is held only as its graph edge.
        with replay.rerun(c):
            # G step: h = G(y1) with a graph; x2 = decouple_g(y2, h); backprop dy2.
            replay.rewind(1)
            with grads.swapped(c.g), torch.enable_grad():
                z1 = y1.detach().requires_grad_()
                h = c.run_g(y2, z1, context)
            x2 = c.apply_decouple("g", y2, h.detach(), tape)
            dx2, dh = c.couple_g_backward(x2, h.detach(), dy2)
            y2 = dy2 = None
            dz1 = grads.backprop(grad_edge(h), z1, dh)
            dz1 = dy1 if dz1 is None else add_into(dz1, dy1, dx2)  # y1 feeds G and the output
            z1 = h = dh = dy1 = None
            # F step: h = F(x2) with a graph; x1 = decouple_f(y1, h); backprop dz1.
            replay.rewind(0)
            with grads.swapped(c.f), torch.enable_grad():
                x2.requires_grad_()
                h = c.run_f(y1, x2, context)
            x1 = c.apply_decouple("f", y1, h.detach(), tape)
            dx1, dh = c.couple_f_backward(x1, h.detach(), dz1)
            y1 = dz1 = None
            dx2_f = grads.backprop(grad_edge(h), x2, dh)
            if dx2_f is not None:
                dx2 = add_into(dx2_f, dx2, dx1)
            h = dh = dx2_f = None
        ctx.chain.hand_back(x1, x2.detach())  # the previous block's output
        if groups:
            # FSDP reduce-scatters the unsharded gradients into the sharded parameters' .grad and
            # reshards: this block's gradients leave now, as an unsharded block's do.
            for p, grad in zip(sharded, grads.grads, strict=True):
                if grad is not None:
                    p.grad = grad if p.grad is None else p.grad + grad
            for g in groups:
                g.post_backward()
            c.branch_dtype = None
            return (dx1, dx2, None, None, None, None, *grads.context_grads)
        return (dx1, dx2, None, None, None, None, *grads.context_grads, *grads.grads)
