"""The reversible engine: backpropagation that rebuilds activations instead of storing them.

:class:`ReversibleSequence` runs a chain of couplings through one custom
``torch.autograd.Function`` (:class:`_ReversibleFunction`). Its forward runs every block
without building a graph and keeps only the sequence's output; its backward walks the
blocks in reverse, rebuilding each block's input from its output just before it needs
it (Gomez et al. 2017, Algorithm 1). Only this module frees or rebuilds activations.

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
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.nn.modules.batchnorm import _BatchNorm

from .coupling import Coupling, merge, split

__all__ = ["ReversibleSequence", "set_reversible"]

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
        if self.reversible and torch.is_grad_enabled():
            params = [p for p in self.parameters() if p.requires_grad]
            if x.requires_grad or params:
                return _ReversibleFunction.apply(x, self, *params)
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


def set_reversible(module: nn.Module, enabled: bool) -> int:
    """Sets ``.reversible`` on every :class:`ReversibleSequence` inside ``module``.

    Returns:
        How many sequences were set.
    """
    count = 0
    for m in module.modules():
        if isinstance(m, ReversibleSequence):
            m.reversible = bool(enabled)
            count += 1
    return count


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
# The Function
# --------------------------------------------------------------------------------------

class _ReversibleFunction(torch.autograd.Function):
    """``y = seq(x)`` keeping only ``y``; inputs are ``(x, seq, *trainable_params)``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, seq: ReversibleSequence, *params: torch.Tensor) -> torch.Tensor:
        devices = _cuda_devices(x)
        keep_rng = seq.preserve_rng_state
        rng: list[tuple[Any, Any]] = []
        x1, x2 = split(x, seq.dim, "ReversibleSequence")  # (B, C/2, ...) each, views
        for c in seq.couplings:  # grad mode is off inside Function.forward: no graph is built
            rng_f = _get_rng(devices) if keep_rng else None
            y1 = c.couple(x1, c.run_f(x1, x2))
            rng_g = _get_rng(devices) if keep_rng else None
            x2 = c.couple(x2, c.run_g(x2, y1))
            x1 = y1
            rng.append((rng_f, rng_g))
        y = merge(x1, x2, seq.dim)
        ctx.save_for_backward(y)
        ctx.seq, ctx.params, ctx.rng, ctx.devices = seq, params, rng, devices
        ctx.autocast = _autocast_state()
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (y,) = ctx.saved_tensors
        seq: ReversibleSequence = ctx.seq
        index = {id(p): i for i, p in enumerate(ctx.params)}
        # Detached leaves standing in for the parameters, one per parameter for the whole
        # backward: the recomputation differentiates these, so hooks on a parameter fire
        # once, when the Function returns its total gradient, never for a block's share
        # (what DDP and clipping hooks expect).
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

        y1, y2 = split(y.detach(), seq.dim, "ReversibleSequence")
        dy1, dy2 = split(dy, seq.dim, "ReversibleSequence")
        outer_rng = _get_rng(ctx.devices) if seq.preserve_rng_state else None
        # Memory: every half (B, C/2, ...) is dropped as soon as it is dead, before the next
        # backprop through a branch, and a branch's output is held only as its graph edge.
        # At RevNet-110, batch 128, this took the step's peak from 152 to 120 MiB.
        try:
            with _replay_autocast(ctx.autocast), _batchnorm_stats_frozen(seq):
                for c, (rng_f, rng_g) in zip(reversed(seq.couplings), reversed(ctx.rng), strict=True):
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
                    dz1 = dy1 if dz1 is None else dy1 + dz1  # (B, C/2, ...): y1 feeds G and the output
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
                        dx2 = dx2 + dx2_f
                    h = dh = dx2_f = None
                    y1, y2, dy1, dy2 = x1, x2.detach(), dx1, dx2
                    x1 = x2 = dx1 = dx2 = None
        finally:
            if outer_rng is not None:
                _set_rng(outer_rng, ctx.devices)  # backward leaves the caller's RNG as it was
        dx = merge(dy1, dy2, seq.dim) if ctx.needs_input_grad[0] else None
        return (dx, None, *grads)


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

