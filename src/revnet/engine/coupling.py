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
That bound is checked on every coupling output (:mod:`revnet.engine.lattice`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .lattice import EXACT_BITS, MANTISSA_BITS, check_bits, exact_range, to_lattice

__all__ = ["AdditiveCoupling", "AffineCoupling", "Coupling", "merge", "set_exact", "split"]


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

    def branch_shape(self, half_shape: torch.Size) -> torch.Size:
        """Shape F and G must return for a half of shape ``half_shape``."""
        return half_shape

    def entry(self, x: torch.Tensor) -> torch.Tensor:
        """The input as the coupling computes with it, what its inverse gives back (``x`` here)."""
        return x

    # --- running the branches, with the checks that keep the block invertible -----------
    def run_f(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """F(x2), checked to leave ``x2`` untouched and to fit ``x1``."""
        return self._run("F", self.f, x2, x1)

    def run_g(self, x2: torch.Tensor, y1: torch.Tensor) -> torch.Tensor:
        """G(y1), checked to leave ``y1`` untouched and to fit ``x2``."""
        return self._run("G", self.g, y1, x2)

    def _run(self, label: str, fn: nn.Module, inp: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        # Under torch.compile ``_version`` is a traced value and comparing it a graph break in every
        # F and G, which splits the caller into frames that recompile per stage. The engine's own
        # calls run eagerly (revnet.compile compiles F and G, not this), so only a model traced whole
        # in plain mode goes without the check.
        checked = not torch.compiler.is_compiling()
        device = inp.device.type
        arg = inp  # what F or G gets, unless autocast hands it a cast copy
        if inp.dtype == torch.float32 and torch.is_autocast_enabled(device):
            # Under autocast the stream is float32 (ReversibleSequence) but F and G take it in the
            # autocast dtype, as autocast's own layers would: their normalisations and activations
            # run at that precision and speed. A fixed function of the stream, so the backward's
            # recomputation sees the same bits.
            version = inp._version if checked else None
            h = fn(inp.to(torch.get_autocast_dtype(device)))
        else:
            if not _dense(inp):
                # A half split off a whole tensor (a sequence's first block) is a strided slice, on
                # which CPU convolutions and normalisations take a slow path: a dense copy, one pass
                # over the half, made RevNet-38's and RevNet-164's reversible steps 2-3% faster
                # (README). The recomputation in backward gets a rebuilt, dense half anyway. A
                # write into the copy is reported as into the half: in backward F gets the half.
                arg = inp.clone(memory_format=torch.preserve_format)
            version = arg._version if checked else None
            h = fn(arg)
        if version is not None and arg._version != version:
            # The half is needed again (y2 = x2 + G(y1) reads x2 after F ran), and the
            # reversible backward rebuilds it: a write into it breaks both.
            raise RuntimeError(
                f"{type(self).__name__}: {label} ({_name(fn)}) modified its input of shape "
                f"{tuple(inp.shape)} in place, so the block is no longer invertible and its "
                f"gradients would be wrong. Fix: make the first operation of {label} out-of-place "
                f"(e.g. nn.ReLU(inplace=False))."
            )
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
    def forward_halves(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y1 = self.couple(x1, self.run_f(x1, x2))
        y2 = self.couple(x2, self.run_g(x2, y1))
        return y1, y2

    def inverse_halves(self, y1: torch.Tensor, y2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x2 = self.decouple(y2, self.run_g(y2, y1))
        x1 = self.decouple(y1, self.run_f(y1, x2))
        return x1, x2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return merge(*self.forward_halves(*split(x, self.dim, type(self).__name__)), self.dim)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """Rebuilds the input ``x`` from the output ``y = forward(x)``."""
        return merge(*self.inverse_halves(*split(y, self.dim, type(self).__name__)), self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class AdditiveCoupling(Coupling):
    """``y1 = x1 + F(x2)``, ``y2 = x2 + G(y1)``: the RevNet block (paper eq. 5).

    Args:
        f: residual function of ``x2``, returning a tensor shaped like ``x1``.
        g: residual function of ``y1``, returning a tensor shaped like ``x2``.
        dim: split dimension (1 for ``(B, C, H, W)`` feature maps).
        exact: fixed-point mode: ``inverse(forward(x))`` returns ``x`` bit for bit at any
            depth for ``x`` on the ``2^-exact_bits`` lattice (other inputs are rounded to
            it on entry, with a straight-through gradient). F's and G's outputs are rounded
            to the lattice, the stream is kept in float32 (bf16/fp16 inputs, which need
            ``torch.autocast``) or float64, and a stream that reaches
            :func:`exact_range` raises instead of losing bits. May be flipped between steps
            (never between a forward and its backward), e.g. with :func:`set_exact`.
        exact_bits: fraction bits ``k`` of the lattice ``2^-k`` (exact mode only).

    Attributes:
        name: where the coupling sits in its model (set by :func:`set_exact`), for errors.
    """

    def __init__(self, f: nn.Module, g: nn.Module, dim: int = 1, *, exact: bool = False,
                 exact_bits: int = EXACT_BITS) -> None:
        super().__init__(f, g, dim)
        self.exact = bool(exact)
        self.exact_bits = check_bits("AdditiveCoupling: exact_bits", exact_bits)
        self.name = ""

    def couple(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        if not self.exact:
            return x + h
        x = self._stream(x)
        y = to_lattice(x, self.exact_bits) + h.to(x.dtype)  # h is on the lattice: see run_f/run_g
        self._check_range(y)
        return y

    def decouple(self, y: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return y - h  # exact in exact mode: the true difference is the (representable) input

    def couple_backward(
        self, x: torch.Tensor, h: torch.Tensor, dy: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return dy, dy  # d(x + h)/dx = d(x + h)/dh = identity (rounding: straight-through)

    def forward_halves(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.exact:
            # One cast of a bf16/fp16 input per half (plain autograd then sums its gradients
            # in float32, as the reversible engine does, so both give the same bits).
            x1, x2 = self._stream(x1), self._stream(x2)
        return super().forward_halves(x1, x2)

    def run_f(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        if not self.exact:
            return super().run_f(x1, x2)
        # F sees x2 on the lattice: in the first block of a sequence x2 may not be, and the
        # backward recomputes F from the rebuilt (on-lattice) x2. Rounding is idempotent.
        x2 = to_lattice(self._stream(x2), self.exact_bits)
        return to_lattice(super().run_f(x1, self._branch_input(x2)).to(x2.dtype), self.exact_bits)

    def run_g(self, x2: torch.Tensor, y1: torch.Tensor) -> torch.Tensor:
        if not self.exact:
            return super().run_g(x2, y1)
        # y1 is a coupling output, already on the lattice. The engine's backward hands G a
        # slice of the saved output, which BatchNorm would reduce in another order than the
        # dense y1 of plain autograd: a copy laid out like that y1 keeps the bits equal.
        y1 = self._stream(y1)
        if not _dense(y1):
            y1 = y1.clone(memory_format=torch.preserve_format)
        return to_lattice(super().run_g(x2, self._branch_input(y1)).to(y1.dtype), self.exact_bits)

    @staticmethod
    def _branch_input(v: torch.Tensor) -> torch.Tensor:
        """Under autocast, F and G take the (float32) stream in the autocast dtype, as they take
        the bf16 stream in float mode: their normalisations and activations then run at the
        same precision and speed. The cast is a fixed function of the exact stream, so the
        recomputation sees the same bits and reconstruction stays exact."""
        device = v.device.type
        return v.to(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else v

    def entry(self, x: torch.Tensor) -> torch.Tensor:
        """``x``, or in exact mode ``x`` on the lattice in the stream's dtype (what comes back)."""
        return to_lattice(self._stream(x), self.exact_bits) if self.exact else x

    def _label(self) -> str:
        where = f" {self.name!r}" if self.name else ""
        return f"AdditiveCoupling{where} (exact mode, lattice 2^-{self.exact_bits})"

    def _stream(self, x: torch.Tensor) -> torch.Tensor:
        """The stream in float32 (from bf16/fp16: their 8-11 bits leave no useful range) or float64."""
        if x.dtype in MANTISSA_BITS:
            return x
        if x.dtype not in (torch.bfloat16, torch.float16):
            raise TypeError(f"{self._label()}: needs a floating-point stream, got {x.dtype}.")
        if not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"{self._label()}: the stream is {x.dtype} outside autocast. Exact mode keeps the "
                f"residual stream in float32 ({x.dtype} would hold only +-2^"
                f"{(8 if x.dtype == torch.bfloat16 else 11) - self.exact_bits} on the lattice), so F and "
                f"G must accept float32 input. Fix: keep the weights in float32 and run under "
                f"torch.autocast(dtype={x.dtype}) (as revnet train --amp bf16 does), or exact=False."
            )
        return x.float()

    def _check_range(self, y: torch.Tensor) -> None:
        limit = exact_range(y.dtype, self.exact_bits)
        if not y.numel():
            return
        lo, hi = torch.aminmax(y.detach())  # one pass, no temporary
        if -limit < lo.item() and hi.item() < limit:  # False for NaN too
            return
        top = y.detach().abs().max().item()
        p = MANTISSA_BITS[y.dtype]
        fit = p - math.floor(math.log2(top)) - 1 if math.isfinite(top) and top > 0 else None
        hint = (f"fewer fraction bits (exact_bits={fit} holds +-2^{p - fit}; pass it to "
                f"revnet.set_exact or AdditiveCoupling)" if fit is not None and fit >= 0 else
                "a float64 stream")
        raise OverflowError(
            f"{self._label()}: the residual stream reached max |y| = {top:.6g}, outside the range "
            f"+-2^{p - self.exact_bits} = {limit:g} that a {str(y.dtype).removeprefix('torch.')} stream "
            f"holds exactly on the 2^-{self.exact_bits} lattice; going on would lose bits and break "
            f"exact reconstruction. Fix: {hint}, a float64 stream (range 2^{53 - self.exact_bits}), or "
            f"smaller activations (lower learning rate, weight decay)."
        )

    def extra_repr(self) -> str:
        return f"dim={self.dim}" + (f", exact=True, exact_bits={self.exact_bits}" if self.exact else "")


def set_exact(module: nn.Module, enabled: bool, *, bits: int | None = None, prefix: str = "") -> int:
    """Turns exact mode on or off for every :class:`AdditiveCoupling` inside ``module``.

    Also names each coupling by its path in ``module`` (after ``prefix``), so that a range
    error says which one left the range. Call it between training steps, never between a
    forward and its backward.

    Args:
        module: a model, a sequence or a coupling.
        enabled: exact mode on (True) or off.
        bits: fraction bits of the lattice; None keeps each coupling's own.
        prefix: name of ``module`` inside its model (e.g. ``"stages.0.0"``).

    Returns:
        How many couplings were set.
    """
    count = 0
    for path, m in module.named_modules():
        if isinstance(m, AdditiveCoupling):
            if bits is not None:
                m.exact_bits = check_bits("set_exact: bits", bits)
            m.exact = bool(enabled)
            m.name = ".".join(p for p in (prefix, path) if p)
            count += 1
    return count


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
