"""Coupling math: invertible two-branch blocks in plain torch.

A coupling splits its input along ``dim`` into halves ``(x1, x2)`` and computes

    y1 = couple(x1, F(x2))        x2 = decouple(y2, G(y1))
    y2 = couple(x2, G(y1))        x1 = decouple(y1, F(x2))

(Gomez et al. 2017, Sec. 3.1, eq. 5-6). ``couple`` is invertible in its first argument,
so the input can be rebuilt from the output. Everything here is ordinary autograd; the
memory trick that uses the inverse lives in :mod:`revnet.engine.reversible`.

In floating point ``(x + F(x2)) - F(x2)`` need not equal ``x``, and the error compounds
over depth. ``AdditiveCoupling(f, g, exact=True)`` removes it with fixed-point arithmetic:
F's and G's outputs are rounded to the lattice ``2^-k`` (a straight-through gradient for
the rounding) and the residual stream is kept on that lattice, where sums are exact as
long as ``|stream| < 2^(p-k)`` (``p`` = 24 mantissa bits for float32, 53 for float64).
That bound is checked on every coupling output (:mod:`revnet.engine.exact`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .context import NO_CONTEXT, Context
from .exact import EXACT_BITS, FLOAT, Arithmetic, Lattice, Ratio, Tape, check_bits

__all__ = ["AdditiveCoupling", "AffineCoupling", "Coupling", "ExactMode", "MomentumCoupling", "Position",
           "ScaledExact", "TwoStreamCoupling", "Zero", "halves", "merge", "split"]


def split(x: torch.Tensor, dim: int, owner: str = "coupling") -> tuple[torch.Tensor, torch.Tensor]:
    """Splits ``x`` into two equal halves along ``dim`` (views, no copy)."""
    if x.dim() == 0 or not -x.dim() <= dim < x.dim():
        raise ValueError(
            f"{owner}: cannot split a tensor of shape {tuple(x.shape)} along dim={dim}; "
            f"pass dim= the channel dimension (1 for (B, C, H, W) images)."
        )
    size = x.shape[dim]
    if size % 2:
        raise ValueError(
            f"{owner}: input of shape {tuple(x.shape)} has an odd size {size} at dim={dim}, "
            f"so it cannot be split into two equal halves; give the layer before it an even "
            f"number of channels (e.g. {size + 1})."
        )
    x1, x2 = x.chunk(2, dim)
    return x1, x2


def merge(x1: torch.Tensor, x2: torch.Tensor, dim: int) -> torch.Tensor:
    """Inverse of :func:`split`."""
    return torch.cat((x1, x2), dim)


def halves(x: torch.Tensor, dim: int, owner: str = "coupling") -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`split` into halves that each fill their memory: where the halves F and G compute on are made.

    A channel slice of a whole tensor is strided, and CPU convolutions and normalisations take
    a slow path on it (the dense copy made the reversible step 2-3% faster: docs/HISTORY.md,
    "Dense halves"); in exact mode BatchNorm would also reduce it in another order than the
    dense half the rebuild gives. One copy per sequence call, where a block's input is split.
    """
    return tuple(v if _dense(v) else v.clone(memory_format=torch.preserve_format)  # type: ignore[return-value]
                 for v in split(x, dim, owner))


def _name(module: nn.Module) -> str:
    return type(module).__name__


def _dense(v: torch.Tensor) -> bool:
    """Whether ``v`` fills its memory (contiguous or channels-last), unlike a channel slice."""
    return v.is_contiguous() or (v.dim() == 4 and v.is_contiguous(memory_format=torch.channels_last))


class Coupling(nn.Module):
    """Base of the couplings: holds F and G and the split, subclasses give ``couple``.

    Args:
        f: residual function applied to ``x2``; its output feeds ``couple(x1, .)``.
        g: residual function applied to ``y1``; its output feeds ``couple(x2, .)``.
        dim: dimension along which the input is split in two halves.

    Attributes:
        stored: in a reversible :class:`revnet.ReversibleSequence`, run this block under
            ordinary autograd (its activations kept: faster backward, more memory) instead of
            rebuilding it; the blocks before it rebuild from its input. False by default; a
            memory-budget plan sets it per block.
    """

    def __init__(self, f: nn.Module, g: nn.Module, dim: int = 1) -> None:
        super().__init__()
        for label, fn in (("f", f), ("g", g)):
            if not callable(fn):
                raise TypeError(f"{type(self).__name__}: {label} must be an nn.Module or callable, "
                                f"got {type(fn).__name__}.")
        self.f = f
        self.g = g
        self.dim = dim
        self.stored = False
        # The dtype F and G take their halves in, while the engine runs this block with parameters in
        # another dtype (FSDP's mixed precision gathers bf16 parameters): the stream stays as it is.
        self.branch_dtype: torch.dtype | None = None

    # --- the algebra a subclass defines -------------------------------------------------
    def couple(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Combines a half ``x`` with a branch output ``h``; invertible in ``x``."""
        raise NotImplementedError

    def decouple(self, y: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`couple` in its first argument."""
        raise NotImplementedError

    def couple_backward(
        self, x: torch.Tensor, h: torch.Tensor, dy: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradients ``(dx, dh)`` of ``couple(x, h)`` given the output's gradient ``dy``.

        The default differentiates :meth:`couple` with autograd; a subclass may override it
        with the closed form (the additive coupling passes ``dy`` through).
        """
        with torch.enable_grad():
            x = x.detach().requires_grad_()
            h = h.detach().requires_grad_()
            y = self.couple(x, h)
        dx, dh = torch.autograd.grad(y, (x, h), dy)
        return dx, dh

    # The F step (y1 from x1 and F(x2)) and the G step (y2 from x2 and G(y1)) combine alike
    # unless a subclass says otherwise (MomentumCoupling's velocity and position do not). ``tape``
    # is where a coupling whose inverse needs more than its output (exact mode's remainders of a
    # scaling) records it in forward and takes it back in the rebuild; None where nothing will be
    # rebuilt (plain autograd, a stored block).
    def couple_f(self, x: torch.Tensor, h: torch.Tensor, tape: Tape | None = None) -> torch.Tensor:
        """``y1`` from ``x1`` and ``F(x2)``: :meth:`couple` unless a subclass says otherwise."""
        return self.couple(x, h)

    def decouple_f(self, y: torch.Tensor, h: torch.Tensor, tape: Tape | None = None) -> torch.Tensor:
        return self.decouple(y, h)

    def couple_f_backward(self, x: torch.Tensor, h: torch.Tensor,
                          dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.couple_backward(x, h, dy)

    def couple_g(self, x: torch.Tensor, h: torch.Tensor, tape: Tape | None = None) -> torch.Tensor:
        """``y2`` from ``x2`` and ``G(y1)``: :meth:`couple` unless a subclass says otherwise."""
        return self.couple(x, h)

    def decouple_g(self, y: torch.Tensor, h: torch.Tensor, tape: Tape | None = None) -> torch.Tensor:
        return self.decouple(y, h)

    @property
    def needs_tape(self) -> bool:
        """Whether the inverse needs what the forward records on a tape (exact mode's scalings)."""
        return False

    # What the engine calls: the step's couple/decouple, with the tape for a coupling that takes one
    # (a subclass written before tapes, whose couple_f takes (x, h), keeps working).
    def apply_couple(self, step: str, x: torch.Tensor, h: torch.Tensor,
                     tape: Tape | None = None) -> torch.Tensor:
        """``couple_f`` (``step="f"``) or ``couple_g`` of ``x`` and the branch output ``h``."""
        fn = self.couple_f if step == "f" else self.couple_g
        return fn(x, h, tape) if self.needs_tape else fn(x, h)

    def apply_decouple(self, step: str, y: torch.Tensor, h: torch.Tensor,
                       tape: Tape | None = None) -> torch.Tensor:
        """``decouple_f`` (``step="f"``) or ``decouple_g`` of ``y`` and the branch output ``h``."""
        fn = self.decouple_f if step == "f" else self.decouple_g
        return fn(y, h, tape) if self.needs_tape else fn(y, h)

    def couple_g_backward(self, x: torch.Tensor, h: torch.Tensor,
                          dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.couple_backward(x, h, dy)

    def branch_shape(self, half_shape: torch.Size) -> torch.Size:
        """Shape F and G must return for a half of shape ``half_shape``."""
        return half_shape

    def stream(self, x: torch.Tensor) -> torch.Tensor:
        """A half in the dtype the coupling keeps its stream in (``x`` itself here)."""
        return x

    def entry(self, x: torch.Tensor) -> torch.Tensor:
        """The input as the coupling computes with it, what its inverse gives back (``x`` here)."""
        return x

    # --- running the branches, with the checks that keep the block invertible -----------
    def run_f(self, x1: torch.Tensor, x2: torch.Tensor, context: Context = NO_CONTEXT) -> torch.Tensor:
        """F(x2, *context), checked to leave ``x2`` and the context untouched and to fit ``x1``."""
        return self._run("F", self.f, x2, x1, context)

    def run_g(self, x2: torch.Tensor, y1: torch.Tensor, context: Context = NO_CONTEXT) -> torch.Tensor:
        """G(y1, *context), checked to leave ``y1`` and the context untouched and to fit ``x2``."""
        return self._run("G", self.g, y1, x2, context)

    def _run(self, label: str, fn: nn.Module, inp: torch.Tensor, other: torch.Tensor,
             context: Context) -> torch.Tensor:
        # Under torch.compile ``_version`` is a traced value and comparing it a graph break in every
        # F and G, which splits the caller into frames that recompile per stage. The engine's own
        # calls run eagerly (revnet.compile compiles F and G, not this), so only a model traced whole
        # in plain mode goes without the check.
        checked = not torch.compiler.is_compiling()
        version = inp._version if checked else None
        versions = context.versions() if checked and context.tensors else None
        device = inp.device.type
        branch_dtype = getattr(self, "branch_dtype", None)  # absent from couplings pickled before it
        if branch_dtype is not None and inp.is_floating_point() and inp.dtype != branch_dtype:
            h = context.call(fn, inp.to(branch_dtype))
        elif inp.dtype == torch.float32 and torch.is_autocast_enabled(device):
            # Under autocast the stream is float32 (ReversibleSequence) but F and G take it in the
            # autocast dtype, as autocast's own layers would: their normalisations and activations
            # run at that precision and speed. A fixed function of the stream, so the backward's
            # recomputation sees the same bits.
            h = context.call(fn, inp.to(torch.get_autocast_dtype(device)))
        else:
            h = context.call(fn, inp)
        if version is not None and inp._version != version:
            # The half is needed again (y2 = x2 + G(y1) reads x2 after F ran), and the
            # reversible backward rebuilds it: a write into it breaks both.
            raise RuntimeError(
                f"{type(self).__name__}: {label} ({_name(fn)}) modified its input of shape "
                f"{tuple(inp.shape)} in place, so the block is no longer invertible and its "
                f"gradients would be wrong. Fix: make the first operation of {label} out-of-place "
                f"(e.g. nn.ReLU(inplace=False))."
            )
        written = context.changed(versions) if versions is not None else None
        if written is not None:
            raise RuntimeError(
                f"{type(self).__name__}: {label} ({_name(fn)}) modified a context tensor of shape "
                f"{tuple(written.shape)} in place; every block (and the rebuild in backward) reads the "
                f"same context, so its gradients would be wrong. Fix: compute on a copy inside {label} "
                f"(e.g. mask = mask.clone() before writing, or an out-of-place op).")
        want = self.branch_shape(other.shape)
        if h.shape != want:
            raise ValueError(
                f"{type(self).__name__}: {label} ({_name(fn)}) maps its input of shape "
                f"{tuple(inp.shape)} to {tuple(h.shape)}, but must return {tuple(want)} to be "
                f"coupled with the other half. Fix: keep stride 1 and the channel count inside "
                f"{label}; change resolution or width in a non-reversible unit between sequences."
            )
        return h

    # --- forward / inverse on halves (the engine calls these) and on whole tensors ------
    def forward_halves(self, x1: torch.Tensor, x2: torch.Tensor, context: Context = NO_CONTEXT,
                       tape: Tape | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        # One cast per half into the stream's dtype (exact mode: bf16 -> float32), so plain
        # autograd sums x2's two gradients in that dtype, as the reversible engine does.
        x1, x2 = self.stream(x1), self.stream(x2)
        y1 = self.apply_couple("f", x1, self.run_f(x1, x2, context), tape)
        y2 = self.apply_couple("g", x2, self.run_g(x2, y1, context), tape)
        return y1, y2

    def inverse_halves(self, y1: torch.Tensor, y2: torch.Tensor, context: Context = NO_CONTEXT,
                       tape: Tape | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x2 = self.apply_decouple("g", y2, self.run_g(y2, y1, context), tape)
        x1 = self.apply_decouple("f", y1, self.run_f(y1, x2, context), tape)
        return x1, x2

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        """``y`` for input ``x``; ``args``/``kwargs`` reach F and G after their half."""
        x1, x2 = halves(x, self.dim, type(self).__name__)
        return merge(*self.forward_halves(x1, x2, Context(args, kwargs)), self.dim)

    def inverse(self, y: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        """Rebuilds the input ``x`` from the output ``y = forward(x, *args, **kwargs)``.

        A coupling whose exact mode scales its halves (momentum, two-stream) needs the remainders
        its forward recorded: rebuild it with :func:`revnet.fidelity.drift.roundtrip` instead."""
        y1, y2 = halves(y, self.dim, type(self).__name__)
        return merge(*self.inverse_halves(y1, y2, Context(args, kwargs)), self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class ExactMode:
    """Exact mode's switch and arithmetic, for the couplings that have one (additive, momentum,
    two-stream): ``exact``, ``exact_bits``, ``name`` and the :attr:`arithmetic` they add with.

    Attributes:
        exact: fixed-point mode on (see :class:`AdditiveCoupling`).
        exact_bits: fraction bits ``k`` of the lattice ``2^-k``.
        name: where the coupling sits in its model (set by :func:`revnet.set_exact`), for errors.
    """

    def _init_exact(self, exact: bool, exact_bits: int) -> None:
        self.exact = bool(exact)
        self.exact_bits = check_bits(f"{type(self).__name__}: exact_bits", exact_bits)
        self.name = ""
        self._lattice: Lattice | None = None

    @property
    def label(self) -> str:
        return f"{type(self).__name__} {self.name!r}" if self.name else type(self).__name__

    @property
    def arithmetic(self) -> Arithmetic:
        """How this coupling adds: :data:`~revnet.engine.exact.FLOAT`, or in exact mode a
        :class:`~revnet.engine.exact.Lattice` (the one place that tells the two apart)."""
        if not self.exact:
            return FLOAT
        lattice = self._lattice
        if lattice is None or (lattice.bits, lattice.owner) != (self.exact_bits, self.label):
            self._lattice = Lattice(self.exact_bits, self.label)
        return self._lattice

    def stream(self, x: torch.Tensor) -> torch.Tensor:
        return self.arithmetic.stream(x)

    def entry(self, x: torch.Tensor) -> torch.Tensor:
        return self.arithmetic.enter(x)

    def _exact_repr(self) -> str:
        return f", exact=True, exact_bits={self.exact_bits}" if self.exact else ""


class ScaledExact(ExactMode):
    """Exact mode for a coupling that scales a half by ``gamma`` before adding a branch term:
    ``y = gamma x + h`` on the lattice, the remainder of ``gamma x`` kept on the sequence call's
    tape for the rebuild (:class:`revnet.engine.exact.Ratio`). The float mode is
    ``torch.add(h, x, alpha=gamma)``."""

    gamma: float

    @property
    def needs_tape(self) -> bool:
        return self.exact

    @property
    def factor(self) -> float:
        """The gamma the arithmetic uses: ``gamma``, or in exact mode the fraction ``n / d`` nearest it."""
        return self._ratio().value if self.exact else self.gamma

    def _ratio(self) -> Ratio:
        cached = getattr(self, "_ratio_cache", None)
        if cached is None or cached[0] != self.gamma:
            cached = (self.gamma, Ratio(self.gamma, self.label))
            self._ratio_cache = cached
        return cached[1]

    def _scaled_couple(self, x: torch.Tensor, h: torch.Tensor, tape: Tape | None, step: str) -> torch.Tensor:
        if not self.exact:
            return torch.add(h, x, alpha=self.gamma)
        lattice = self.arithmetic
        assert isinstance(lattice, Lattice)
        scaled, remainder = self._ratio().scale(lattice.enter(x), lattice.bits)
        if tape is not None:
            tape.record((id(self), step), remainder)
        return lattice.add(scaled, lattice.branch_out(h, scaled))

    def _scaled_decouple(self, y: torch.Tensor, h: torch.Tensor, tape: Tape | None,
                         step: str) -> torch.Tensor:
        if self.gamma == 0.0:
            raise RuntimeError(f"{self.label}: gamma = 0 is the residual step, whose input cannot be "
                               f"rebuilt. Fix: gamma > 0, or plain autograd (revnet.set_reversible(model, "
                               f"False)).")
        if not self.exact:
            return (y - h) / self.gamma
        if tape is None:
            raise RuntimeError(f"{self.label}: exact mode rebuilds with the remainders its forward "
                               f"recorded on a tape, and none was given. Fix: rebuild through "
                               f"revnet.fidelity.drift.roundtrip (or the reversible backward), which keep "
                               f"it.")
        lattice = self.arithmetic
        assert isinstance(lattice, Lattice)
        remainder = tape.take((id(self), step), self.label)
        return self._ratio().unscale(y - lattice.branch_out(h, y), remainder, lattice.bits)


class AdditiveCoupling(ExactMode, Coupling):
    """``y1 = x1 + F(x2)``, ``y2 = x2 + G(y1)``: the RevNet block (paper eq. 5).

    Example:
        >>> import torch, revnet
        >>> from torch import nn
        >>> c = revnet.AdditiveCoupling(nn.Linear(8, 8), nn.Linear(8, 8), dim=-1)
        >>> x = torch.randn(2, 16)
        >>> torch.allclose(c.inverse(c(x)), x, atol=1e-5)
        True

    Args:
        f: residual function of ``x2``, returning a tensor shaped like ``x1``.
        g: residual function of ``y1``, returning a tensor shaped like ``x2``.
        dim: split dimension (1 for ``(B, C, H, W)`` feature maps).
        exact: fixed-point mode: ``inverse(forward(x))`` returns ``x`` bit for bit at any
            depth for ``x`` on the ``2^-exact_bits`` lattice (other inputs are rounded to
            it on entry, with a straight-through gradient). F's and G's outputs are rounded
            to the lattice, the stream is kept in float32 (bf16/fp16 inputs, which need
            ``torch.autocast``) or float64, and a stream that reaches
            :func:`revnet.engine.exact.exact_range` raises instead of losing bits. May be
            flipped between steps (never between a forward and its backward), e.g. with
            :func:`revnet.set_exact`.
        exact_bits: fraction bits ``k`` of the lattice ``2^-k`` (exact mode only).

    Attributes:
        name: where the coupling sits in its model (set by :func:`revnet.set_exact`), for errors.
    """

    def __init__(self, f: nn.Module, g: nn.Module, dim: int = 1, *, exact: bool = False,
                 exact_bits: int = EXACT_BITS) -> None:
        super().__init__(f, g, dim)
        self._init_exact(exact, exact_bits)

    def couple(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self.arithmetic.add(x, h)

    def decouple(self, y: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return y - h  # exact in exact mode: the true difference is the (representable) input

    def couple_backward(
        self, x: torch.Tensor, h: torch.Tensor, dy: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return dy, dy  # d(x + h)/dx = d(x + h)/dh = identity (rounding: straight-through)

    def run_f(self, x1: torch.Tensor, x2: torch.Tensor, context: Context = NO_CONTEXT) -> torch.Tensor:
        arith = self.arithmetic
        x2 = arith.enter(x2)
        return arith.branch_out(super().run_f(x1, x2, context), x2)

    def run_g(self, x2: torch.Tensor, y1: torch.Tensor, context: Context = NO_CONTEXT) -> torch.Tensor:
        arith = self.arithmetic
        y1 = arith.enter(y1)
        return arith.branch_out(super().run_g(x2, y1, context), y1)

    def extra_repr(self) -> str:
        return f"dim={self.dim}" + self._exact_repr()


class AffineCoupling(Coupling):
    """``y1 = x1 * s(F(x2)) + t(F(x2))``, likewise for G (paper Sec. 3.1, after NICE/Real NVP).

    F and G return twice the channels of a half: the first half is a raw log-scale, the
    second the shift. The scale is ``exp(clamp * tanh(raw / clamp))``, so it lies in
    ``[e^-clamp, e^clamp]``: bounded away from zero, the inverse stays well conditioned.

    Args:
        f: function of ``x2`` returning ``2 * C/2`` channels (log-scale, shift).
        g: function of ``y1`` returning ``2 * C/2`` channels.
        dim: split dimension.
        clamp: bound on ``|log scale|``.
    """

    def __init__(self, f: nn.Module, g: nn.Module, dim: int = 1, clamp: float = 2.0) -> None:
        super().__init__(f, g, dim)
        if not (math.isfinite(clamp) and clamp > 0):
            raise ValueError(f"AffineCoupling: clamp must be a positive finite number, got {clamp}.")
        self.clamp = float(clamp)

    def branch_shape(self, half_shape: torch.Size) -> torch.Size:
        shape = list(half_shape)
        shape[self.dim] *= 2
        return torch.Size(shape)

    def _scale_shift(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raw, shift = h.chunk(2, self.dim)
        return torch.exp(self.clamp * torch.tanh(raw / self.clamp)), shift

    def couple(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        scale, shift = self._scale_shift(h)
        return x * scale + shift

    def decouple(self, y: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        scale, shift = self._scale_shift(h)
        return (y - shift) / scale

    def extra_repr(self) -> str:
        return f"dim={self.dim}, clamp={self.clamp}"


class Position(nn.Module):
    """The identity on a half that ignores the context: a momentum step's default G (``x' = x + v'``)."""

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return x


class MomentumCoupling(ScaledExact, Coupling):
    """A momentum residual step (Sander et al., ICML 2021, "Momentum Residual Neural Networks"):
    ``v' = gamma * v + (1 - gamma) * F(x)``, ``x' = x + G(v')`` on the halves ``(v, x)``.

    With ``G`` the identity (the default) it is the paper's step ``x' = x + v'``, and at
    ``gamma = 0`` the residual step ``x' = x + F(x)`` exactly; for ``gamma > 0`` the step inverts
    (``x = x' - v'``, ``v = (v' - (1 - gamma) F(x)) / gamma``), so a chain of them trains in a
    :class:`~revnet.engine.reversible.ReversibleSequence` without storing activations. The
    velocity is the **first** half: start it at zero, ``torch.cat([torch.zeros_like(x), x], dim)``,
    and read the position from the second half. The division by ``gamma`` amplifies rounding
    in the rebuild by ``1 / gamma`` a step: keep ``gamma`` away from 0 for deep chains (the drift
    guard measures it), or use exact mode.

    Example:
        >>> import torch, revnet
        >>> from torch import nn
        >>> c = revnet.MomentumCoupling(nn.Linear(8, 8), gamma=0.9, dim=-1)
        >>> x = torch.randn(2, 16)
        >>> torch.allclose(c.inverse(c(x)), x, atol=1e-5)
        True

    Args:
        f: the residual branch, a function of the position ``x`` shaped like it.
        g: applied to the new velocity before it is added to the position (default identity).
        gamma: momentum in ``[0, 1)``; 0 is the residual network (not invertible: plain mode only).
        dim: split dimension.
        exact: fixed-point mode, as :class:`AdditiveCoupling`'s, which makes the rebuild bit-exact at
            any ``gamma`` and depth: the stream on the ``2^-exact_bits`` lattice, ``gamma`` the nearest
            fraction ``n / d`` (``d <= 256``), and ``gamma v`` rounded with its remainder (one byte per
            element of the velocity) kept for the rebuild (:class:`revnet.engine.exact.Ratio`).
        exact_bits: fraction bits of the lattice (exact mode only).
    """

    def __init__(self, f: nn.Module, g: nn.Module | None = None, gamma: float = 0.9, dim: int = 1, *,
                 exact: bool = False, exact_bits: int = EXACT_BITS) -> None:
        if not 0.0 <= gamma < 1.0:
            raise ValueError(f"MomentumCoupling: gamma must be in [0, 1), got {gamma}.")
        super().__init__(f, Position() if g is None else g, dim)
        self.gamma = float(gamma)
        self._init_exact(exact, exact_bits)

    # The G step (position) is additive: Coupling's couple/decouple serve it.
    def couple(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self.arithmetic.add(x, self.arithmetic.branch_out(h, x))

    def decouple(self, y: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return y - self.arithmetic.branch_out(h, y)

    def couple_backward(self, x: torch.Tensor, h: torch.Tensor,
                        dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return dy, dy

    def run_f(self, x1: torch.Tensor, x2: torch.Tensor, context: Context = NO_CONTEXT) -> torch.Tensor:
        return super().run_f(x1, self.arithmetic.enter(x2), context)

    def run_g(self, x2: torch.Tensor, y1: torch.Tensor, context: Context = NO_CONTEXT) -> torch.Tensor:
        return super().run_g(x2, self.arithmetic.enter(y1), context)

    # The F step (velocity): v' = gamma v + (1 - gamma) F(x).
    def couple_f(self, x: torch.Tensor, h: torch.Tensor, tape: Tape | None = None) -> torch.Tensor:
        if not self.exact and x.dtype == h.dtype:
            return torch.lerp(h, x, self.gamma)
        return self._scaled_couple(x, self._weighted(h, x), tape, "f")

    def decouple_f(self, y: torch.Tensor, h: torch.Tensor, tape: Tape | None = None) -> torch.Tensor:
        return self._scaled_decouple(y, self._weighted(h, y), tape, "f")

    def _weighted(self, h: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return h.to(like.dtype) * (1 - self.factor)

    def couple_f_backward(self, x: torch.Tensor, h: torch.Tensor,
                          dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gamma = self.factor
        return gamma * dy, (1 - gamma) * dy

    def extra_repr(self) -> str:
        return f"gamma={self.gamma:g}, dim={self.dim}" + self._exact_repr()


class TwoStreamCoupling(ScaledExact, Coupling):
    """Two residual layers on two streams, each new state a blend of the last two plus a branch:
    ``y1 = gamma x1 + (1 - gamma) x2 + F(x2)``, ``y2 = gamma x2 + (1 - gamma) y1 + G(y1)``.

    The reversible form of a residual stack that RevViT and MEFT (Liao et al., NeurIPS 2023) use,
    with the scaling chosen so that ``gamma = 0`` is the original network exactly: the halves
    carry the last two states of ``x -> x + F(x) -> ... + G(...)``, and start both at the input,
    ``torch.cat([x, x], dim)``; the second half is the current state. For ``gamma > 0`` it inverts
    (``x1 = (y1 - (1 - gamma) x2 - F(x2)) / gamma``), the rounding growing by ``1 / gamma`` a step,
    as a momentum step's; exact mode removes that (as :class:`MomentumCoupling`'s, with a remainder
    per half). The identity parts of each new state sum to 1, so the stream does not grow with
    depth as MEFT's ``lambda x1 + F(x2)`` with a full layer ``F`` does.

    Args:
        f: the first residual branch, a function of ``x2`` shaped like it.
        g: the second, a function of ``y1``; None for none (``y2 = gamma x2 + (1 - gamma) y1``).
        gamma: in ``[0, 1)``; 0 is the residual network (plain mode only).
        dim: split dimension.
        exact: fixed-point mode (see :class:`MomentumCoupling`).
        exact_bits: fraction bits of the lattice (exact mode only).
    """

    def __init__(self, f: nn.Module, g: nn.Module | None = None, gamma: float = 0.5, dim: int = 1, *,
                 exact: bool = False, exact_bits: int = EXACT_BITS) -> None:
        if not 0.0 <= gamma < 1.0:
            raise ValueError(f"TwoStreamCoupling: gamma must be in [0, 1), got {gamma}.")
        super().__init__(f, Zero() if g is None else g, dim)
        self.gamma = float(gamma)
        self._init_exact(exact, exact_bits)

    def run_f(self, x1: torch.Tensor, x2: torch.Tensor, context: Context = NO_CONTEXT) -> torch.Tensor:
        x2 = self.arithmetic.enter(x2)
        return super().run_f(x1, x2, context) + (1 - self.factor) * x2

    def run_g(self, x2: torch.Tensor, y1: torch.Tensor, context: Context = NO_CONTEXT) -> torch.Tensor:
        y1 = self.arithmetic.enter(y1)
        return super().run_g(x2, y1, context) + (1 - self.factor) * y1

    def couple_f(self, x: torch.Tensor, h: torch.Tensor, tape: Tape | None = None) -> torch.Tensor:
        return self._scaled_couple(x, h, tape, "f")

    def decouple_f(self, y: torch.Tensor, h: torch.Tensor, tape: Tape | None = None) -> torch.Tensor:
        return self._scaled_decouple(y, h, tape, "f")

    def couple_g(self, x: torch.Tensor, h: torch.Tensor, tape: Tape | None = None) -> torch.Tensor:
        return self._scaled_couple(x, h, tape, "g")

    def decouple_g(self, y: torch.Tensor, h: torch.Tensor, tape: Tape | None = None) -> torch.Tensor:
        return self._scaled_decouple(y, h, tape, "g")

    def couple_backward(self, x: torch.Tensor, h: torch.Tensor,
                        dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.factor * dy, dy

    def extra_repr(self) -> str:
        return f"gamma={self.gamma:g}, dim={self.dim}" + self._exact_repr()


class Zero(nn.Module):
    """No branch: zeros shaped like the half, whatever the context (a two-stream step without G)."""

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return torch.zeros_like(x)
