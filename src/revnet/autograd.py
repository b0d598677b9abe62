"""The reversible engine: backpropagation that rebuilds activations instead of storing them.

:class:`ReversibleSequence` runs a chain of couplings as a chain of custom
``torch.autograd.Function`` s, one per block (:class:`_ReversibleBlock`). Forward runs
every block without building a graph; only the last block keeps its output. Backward
walks the blocks in reverse, each rebuilding its input from its output just before it
needs it (Gomez et al. 2017, Algorithm 1) and handing it to the block before it, and
each block's parameter gradients leave as soon as that block is done. Only this module
frees or rebuilds activations.

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

import contextlib
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.nn.modules.batchnorm import _BatchNorm

from .coupling import Coupling, merge, split

__all__ = ["Recomputed", "ReversibleSequence", "set_reversible"]

_AUTOCAST_DEVICES = ("cpu", "cuda")


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


class Recomputed:
    """Mixin for a unit that cannot be inverted (a RevNet stage opener) to store no activations.

    While ``reversible`` is True and grad is enabled, calling the module keeps only its
    input for backward, and backward runs it again under the engine's rules (parameter
    gradients returned, BatchNorm statistics updated once, RNG and autocast replayed).
    Put it first among the bases; the module's own ``forward`` is left as it is::

        class MyOpener(Recomputed, nn.Module):
            def forward(self, x): ...

    Its input is usually kept anyway (as the output of the reversible sequence before it),
    so the unit then costs no memory beyond the transient of its own recomputation.
    """

    reversible: bool = True
    preserve_rng_state: bool = True

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        module: nn.Module = self  # type: ignore[assignment]
        if self.reversible and torch.is_grad_enabled():
            params = [p for p in module.parameters() if p.requires_grad]
            if x.requires_grad or params:
                return _Recompute.apply(x, module, self.preserve_rng_state, *params)
        return nn.Module.__call__(module, x)


# --------------------------------------------------------------------------------------
# State recorded at forward and replayed at recomputation
# --------------------------------------------------------------------------------------

def _cuda_devices(x: torch.Tensor) -> list[torch.device]:
    return [x.device] if x.is_cuda else []


def _get_rng(devices: Sequence[torch.device]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]


def _set_rng(state: tuple[torch.Tensor, list[torch.Tensor]], devices: Sequence[torch.device]) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    for d, s in zip(devices, cuda, strict=True):
        torch.cuda.set_rng_state(s, d)


def _autocast_state() -> dict[str, tuple[bool, torch.dtype]]:
    return {d: (torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in _AUTOCAST_DEVICES}


@contextlib.contextmanager
def _replay_autocast(state: dict[str, tuple[bool, torch.dtype]]) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for device, (enabled, dtype) in state.items():
            if device == "cuda" and not (enabled or torch.cuda.is_available()):
                continue  # autocast("cuda") warns on a machine without CUDA
            stack.enter_context(torch.autocast(device, dtype=dtype, enabled=enabled))
        yield


@contextlib.contextmanager
def _batchnorm_stats_frozen(module: nn.Module) -> Iterator[None]:
    """Recomputation normalises with batch statistics but must not update running ones.

    With ``track_running_stats=False`` a training-mode BatchNorm (and SyncBatchNorm) uses
    the batch's statistics exactly as in the forward, and touches neither
    ``running_mean``/``running_var`` nor ``num_batches_tracked``.
    """
    frozen = [m for m in module.modules()
              if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]
    for m in frozen:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in frozen:
            m.track_running_stats = True


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


def _run_reversible(seq: ReversibleSequence, x: torch.Tensor) -> torch.Tensor:
    """``seq(x)`` as a chain of per-block Functions that keep only the sequence's output.

    One Function per block (not one for the whole sequence) so that each block's parameter
    gradients leave backward when that block is done, not when the sequence is: at great
    depth a whole stage's gradients in flight would otherwise outweigh its activations.
    """
    chain = _Chain()
    a: torch.Tensor = x
    b: torch.Tensor | None = None  # the first block takes the whole x, the others halves
    for k, c in enumerate(seq.couplings):
        params = [p for p in c.parameters() if p.requires_grad]
        a, b = _ReversibleBlock.apply(a, b, chain, c, k == 0, seq.preserve_rng_state, *params)
    return _KeepOutput.apply(a, b, chain, seq.dim)


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


class _ReversibleBlock(torch.autograd.Function):
    """One coupling of a reversible chain; it saves nothing.

    Inputs are ``(a, b, chain, coupling, first, keep_rng, *trainable_params)``: the first
    block takes the whole input as ``a`` (``b`` is None), the others the two halves. Every
    block returns the halves of its output, which the next block's backward rebuilds (the
    last block's comes from :class:`_KeepOutput`).
    """

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, b: torch.Tensor | None, chain: _Chain, c: Coupling,
                first: bool, keep_rng: bool, *params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x1, x2 = split(a, c.dim, "ReversibleSequence") if first else (a, b)  # (B, C/2, ...)
        devices = _cuda_devices(x1)
        # grad mode is off inside Function.forward: no graph is built
        rng_f = _get_rng(devices) if keep_rng else None
        y1 = c.couple(x1, c.run_f(x1, x2))
        rng_g = _get_rng(devices) if keep_rng else None
        y2 = c.couple(x2, c.run_g(x2, y1))
        ctx.chain, ctx.c, ctx.first, ctx.params = chain, c, first, params
        ctx.rng, ctx.devices, ctx.autocast = (rng_f, rng_g), devices, _autocast_state()
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

        def grad_of(h: torch.Tensor | GradientEdge, inp: torch.Tensor, slots: list[_Slot],
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
        outer_rng = _get_rng(ctx.devices) if rng_f is not None else None
        # Memory: every half (B, C/2, ...) is dropped as soon as it is dead, before the next
        # backprop through a branch, and a branch's output is held only as its graph edge.
        try:
            with _replay_autocast(ctx.autocast), _batchnorm_stats_frozen(c):
                # G step: h = G(y1) with a graph; x2 = decouple(y2, h); backprop dy2.
                if rng_g is not None:
                    _set_rng(rng_g, ctx.devices)
                slots = _slots(c.g, index)
                with torch.enable_grad(), _swapped(slots, aliases):
                    z1 = y1.detach().requires_grad_()
                    h = c.run_g(y2, z1)
                x2 = c.decouple(y2, h.detach())
                dx2, dh = c.couple_backward(x2, h.detach(), dy2)
                y2 = dy2 = None
                dz1 = grad_of(_edge(h), z1, slots, dh)
                dz1 = dy1 if dz1 is None else _add(dz1, dy1, dx2)  # y1 feeds G and the output
                z1 = h = dh = dy1 = None
                # F step: h = F(x2) with a graph; x1 = decouple(y1, h); backprop dz1.
                if rng_f is not None:
                    _set_rng(rng_f, ctx.devices)
                slots = _slots(c.f, index)
                with torch.enable_grad(), _swapped(slots, aliases):
                    x2.requires_grad_()
                    h = c.run_f(y1, x2)
                x1 = c.decouple(y1, h.detach())
                dx1, dh = c.couple_backward(x1, h.detach(), dz1)
                y1 = dz1 = None
                dx2_f = grad_of(_edge(h), x2, slots, dh)
                if dx2_f is not None:
                    dx2 = _add(dx2_f, dx2, dx1)
                h = dh = dx2_f = None
        finally:
            if outer_rng is not None:
                _set_rng(outer_rng, ctx.devices)  # backward leaves the caller's RNG as it was
        if ctx.first:
            dx = merge(dx1, dx2, c.dim) if ctx.needs_input_grad[0] else None
            return (dx, None, None, None, None, None, *grads)
        ctx.chain.halves = (x1, x2.detach())  # the previous block's output
        return (dx1, dx2, None, None, None, None, *grads)


class _Recompute(torch.autograd.Function):
    """``y = module(x)`` keeping only ``x``; backward runs the module again with a graph."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, module: nn.Module, keep_rng: bool,
                *params: torch.Tensor) -> torch.Tensor:
        ctx.devices = _cuda_devices(x)
        ctx.rng = _get_rng(ctx.devices) if keep_rng else None
        y = nn.Module.__call__(module, x)  # grad mode is off here: no graph
        ctx.save_for_backward(x)
        ctx.module, ctx.params, ctx.autocast = module, params, _autocast_state()
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (x,) = ctx.saved_tensors
        module: nn.Module = ctx.module
        index = {id(p): i for i, p in enumerate(ctx.params)}
        aliases = [p.detach().requires_grad_() for p in ctx.params]  # as in _ReversibleBlock
        slots = _slots(module, index)
        used = list(dict.fromkeys(i for _, _, i in slots))
        outer_rng = _get_rng(ctx.devices) if ctx.rng is not None else None
        try:
            if ctx.rng is not None:
                _set_rng(ctx.rng, ctx.devices)
            with (_replay_autocast(ctx.autocast), _batchnorm_stats_frozen(module), torch.enable_grad(),
                  _swapped(slots, aliases)):
                xd = x.detach().requires_grad_(ctx.needs_input_grad[0])
                y = nn.Module.__call__(module, xd)
        finally:
            if outer_rng is not None:
                _set_rng(outer_rng, ctx.devices)
        wrt = ([xd] if ctx.needs_input_grad[0] else []) + [aliases[i] for i in used]
        out, y = _edge(y), None  # the output's values are not needed for backprop: drop them
        got = list(torch.autograd.grad(out, wrt, dy, allow_unused=True)) if wrt else []
        dx = got.pop(0) if ctx.needs_input_grad[0] else None
        grads: list[torch.Tensor | None] = [None] * len(ctx.params)
        for i, g in zip(used, got, strict=True):
            grads[i] = g
        return (dx, None, None, *grads)


def _add(fresh: torch.Tensor, other: torch.Tensor, *live: torch.Tensor) -> torch.Tensor:
    """``fresh + other``, written into ``fresh`` when that is a buffer of its own.

    ``fresh`` comes from ``autograd.grad``; a branch that passes its gradient through (an
    identity, a view) may hand back a tensor sharing memory with ``other`` or with one of
    the ``live`` gradients still to be returned, and then a new tensor is made. In place,
    one (B, C/2, ...) buffer fewer is alive at the step's peak.
    """
    if fresh._base is not None or fresh.dtype != torch.promote_types(fresh.dtype, other.dtype):
        return fresh + other
    mine = fresh.untyped_storage().data_ptr()
    if any(t.untyped_storage().data_ptr() == mine for t in (other, *live)):
        return fresh + other
    return fresh.add_(other)


def _edge(h: torch.Tensor) -> torch.Tensor | GradientEdge:
    """Where ``h`` enters the graph, so that backprop needs ``h``'s graph but not its values.

    Handing ``autograd.grad`` the edge instead of the tensor lets the caller drop ``h``
    (a (B, C/2, ...) buffer) before the backprop; an ``h`` without a graph is kept.
    """
    return get_gradient_edge(h) if h.grad_fn is not None else h


_Slot = tuple[nn.Module, str, int]  # (owning module, attribute name, index into the params)


def _slots(branch: nn.Module, index: dict[int, int]) -> list[_Slot]:
    """Where each trainable parameter of ``branch`` sits, found by one walk of its modules.

    Cheaper than ``named_parameters`` plus ``torch.func.functional_call`` (which re-walks
    the tree, builds dotted names and checks ties on every call): on a small RevNet that
    walk was a third of the backward's Python time.
    """
    return [(m, name, index[id(p)])
            for m in branch.modules()
            for name, p in m._parameters.items()
            if p is not None and id(p) in index]


@contextlib.contextmanager
def _swapped(slots: list[_Slot], aliases: list[torch.Tensor]) -> Iterator[None]:
    """Puts the aliases in the parameters' places for the duration of a recomputation."""
    saved = [(m, name, m._parameters[name]) for m, name, _ in slots]
    try:
        for m, name, i in slots:
            m._parameters[name] = aliases[i]
        yield
    finally:
        for m, name, p in saved:
            m._parameters[name] = p

