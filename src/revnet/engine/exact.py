"""Exact mode: additive couplings on a fixed-point lattice, where values add and subtract without rounding.

A multiple of ``2^-k`` below ``2^(p-k)`` in magnitude (``p`` = 24 mantissa bits for
float32, 53 for float64) is representable, and so is the sum of two such values while it
stays below that bound: IEEE addition then returns it unrounded. An additive coupling whose
stream and branch outputs stay on the lattice therefore inverts bit for bit
(:class:`revnet.AdditiveCoupling` with ``exact=True``; docs/FIDELITY.md has the numbers).
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from fractions import Fraction
from typing import Any

import torch

__all__ = ["EXACT_BITS", "FLOAT", "MANTISSA_BITS", "Arithmetic", "Lattice", "Ratio", "Tape", "check_bits",
           "exact_range", "to_lattice"]

# Default fraction bits of exact mode: lattice 2^-12 (2.4e-4), float32 range +-2^12 = 4096.
# Training streams measured up to ~40 (RevNet-38 on Fashion-MNIST at peak learning rate) and
# ~270 (a synthetic data set, where 2^-16 and its range of 256 failed), so 4096 leaves a
# margin of 15x or more; bf16 F/G outputs above 2^-4 are already on this lattice, and in
# float32 it moves an F/G output by at most 2^-13 = 1.2e-4 (docs/FIDELITY.md).
EXACT_BITS = 12
MANTISSA_BITS = {torch.float32: 24, torch.float64: 53}


def exact_range(dtype: torch.dtype, bits: int = EXACT_BITS) -> float:
    """Largest magnitude (exclusive) a stream of ``dtype`` holds exactly on the ``2^-bits`` lattice.

    A multiple of ``2^-bits`` below ``2^(p-bits)`` in magnitude has at most ``p``
    significant bits, so it is representable, and so is the exact sum of two such values
    while it stays below the bound: IEEE addition then returns it unrounded.
    """
    if dtype not in MANTISSA_BITS:
        raise ValueError(f"exact mode computes the residual stream in float32 or float64, not {dtype}.")
    return 2.0 ** (MANTISSA_BITS[dtype] - bits)


def check_bits(what: str, bits: Any) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 0 <= bits <= 52:
        raise ValueError(f"{what} must be an integer in [0, 52] (fraction bits of the lattice 2^-k), "
                         f"got {bits!r}.")
    return bits


def to_lattice(x: torch.Tensor, bits: int = EXACT_BITS) -> torch.Tensor:
    """Rounds ``x`` to the nearest multiple of ``2^-bits``; the gradient passes straight through.

    Scaling by a power of two is exact, so the value is ``round(x * 2^bits) / 2^bits``
    bit for bit. Idempotent: a value already on the lattice comes back unchanged (a -0.0
    comes back as -0.0; note that sums can turn it into +0.0).
    """
    scale = 2.0 ** bits
    with torch.no_grad():
        r = torch.mul(x, scale).round_().mul_(1.0 / scale)
    if not (x.requires_grad and torch.is_grad_enabled()):
        return r
    # Straight-through: (x - x.detach()) is exactly zero in value and the identity in
    # gradient, so the sum is r bit for bit.
    return r + (x - x.detach())


class Arithmetic:
    """How an additive coupling adds: in plain floating point (this class, :data:`FLOAT`), or
    on the lattice (:class:`Lattice`). :class:`revnet.AdditiveCoupling` holds one and asks it at
    every point where exact mode differs, so the coupling itself has one code path."""

    exact = False

    def stream(self, x: torch.Tensor) -> torch.Tensor:
        """A half in the dtype the residual stream is kept in."""
        return x

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        """A half as the coupling computes with it (what its inverse gives back)."""
        return x

    def branch_out(self, h: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """F's or G's output as it is added to the stream ``like``."""
        return h

    def add(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return x + h


FLOAT = Arithmetic()


class Lattice(Arithmetic):
    """Exact mode: the stream and the branch outputs on the ``2^-bits`` lattice (float32 or float64).

    F's and G's outputs are rounded to the lattice (a straight-through gradient for the
    rounding) and the stream is kept on it, so ``y - F(x2)`` returns ``x1`` bit for bit as
    long as ``|stream| < 2^(p-bits)``; :meth:`add` checks that bound on every output.

    Args:
        bits: fraction bits of the lattice.
        label: names the coupling in errors (its path in the model, when known).
    """

    exact = True

    def __init__(self, bits: int = EXACT_BITS, label: str = "AdditiveCoupling") -> None:
        self.bits = check_bits("exact_bits", bits)
        self.owner = label
        self.label = f"{label} (exact mode, lattice 2^-{self.bits})"

    def stream(self, x: torch.Tensor) -> torch.Tensor:
        """Float32 (from bf16/fp16: their 8-11 bits leave no useful range) or float64."""
        if x.dtype in MANTISSA_BITS:
            return x
        if x.dtype not in (torch.bfloat16, torch.float16):
            raise TypeError(f"{self.label}: needs a floating-point stream, got {x.dtype}.")
        if not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"{self.label}: the stream is {x.dtype} outside autocast. Exact mode keeps the "
                f"residual stream in float32 ({x.dtype} would hold only +-2^"
                f"{(8 if x.dtype == torch.bfloat16 else 11) - self.bits} on the lattice), so F and "
                f"G must accept float32 input. Fix: keep the weights in float32 and run under "
                f"torch.autocast(dtype={x.dtype}) (as revnet train --amp bf16 does), or exact=False."
            )
        return x.float()

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        # Rounding is idempotent: a half already on the lattice (a coupling's output) is unchanged,
        # and the first block of a sequence, whose input may not be, sees what its rebuild gives back.
        return to_lattice(self.stream(x), self.bits)

    def branch_out(self, h: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return to_lattice(h.to(like.dtype), self.bits)

    def add(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        y = self.enter(x) + h  # h is on the lattice (branch_out): the sum is exact
        self._check_range(y)
        return y

    def _check_range(self, y: torch.Tensor) -> None:
        limit = exact_range(y.dtype, self.bits)
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
            f"{self.label}: the residual stream reached max |y| = {top:.6g}, outside the range "
            f"+-2^{p - self.bits} = {limit:g} that a {str(y.dtype).removeprefix('torch.')} stream "
            f"holds exactly on the 2^-{self.bits} lattice; going on would lose bits and break "
            f"exact reconstruction. Fix: {hint}, a float64 stream (range 2^{53 - self.bits}), or "
            f"smaller activations (lower learning rate, weight decay)."
        )


# --------------------------------------------------------------------------------------
# Scaling by gamma exactly: the remainder the inverse needs
# --------------------------------------------------------------------------------------

class Ratio:
    """``gamma`` as a fraction ``n / d`` with ``d <= 256``, and exact multiplication of a lattice
    stream by it.

    A contraction (``x -> gamma x`` with ``gamma < 1``) cannot be a bijection of the lattice: some
    bits of ``x`` are lost, and a rebuild that divides by ``gamma`` amplifies the rounding by
    ``1 / gamma`` a step. Maclaurin et al. (ICML 2015, "Gradient-based hyperparameter optimization
    through reversible learning") keep those bits; here each step keeps its own: on the integer
    lattice ``xi = x * 2^bits``, ``yi = round(n xi / d)`` and the remainder ``r = n xi - d yi``
    (``|r| <= d / 2``, one byte) give back ``xi = (d yi + r) / n`` exactly. The remainder is a
    function of ``x`` alone, so the forward's value does not depend on what ran before it.

    Args:
        gamma: the factor, in ``(0, 1)``; the nearest fraction with denominator at most 256 is used.
        owner: names the coupling in errors.
    """

    MAX_DENOMINATOR = 256

    def __init__(self, gamma: float, owner: str = "coupling") -> None:
        frac = Fraction(gamma).limit_denominator(self.MAX_DENOMINATOR)
        if not 0 < frac < 1:
            raise ValueError(f"{owner}: exact mode scales by gamma in (0, 1), got {gamma} ({frac}).")
        self.n, self.d = frac.numerator, frac.denominator
        self.value = self.n / self.d
        self.owner = owner

    def __repr__(self) -> str:
        return f"{self.n}/{self.d}"

    def scale(self, x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(gamma x, remainder)``: ``x`` on the ``2^-bits`` lattice, ``gamma x`` rounded to the
        nearest lattice point (a straight-through gradient ``gamma``), the remainder as int8."""
        with torch.no_grad():
            num = torch.mul(x, 2.0 ** bits).round_().to(torch.int64).mul_(self.n)
            yi = torch.div(num * 2 + self.d, 2 * self.d, rounding_mode="floor")
            remainder = (num - yi * self.d).to(torch.int8)
            y = yi.to(x.dtype).mul_(2.0 ** -bits)
        if x.requires_grad and torch.is_grad_enabled():
            scaled = x * self.value
            y = y + (scaled - scaled.detach())
        return y, remainder

    def unscale(self, y: torch.Tensor, remainder: torch.Tensor, bits: int) -> torch.Tensor:
        """The ``x`` that :meth:`scale` took to ``y`` with ``remainder``, bit for bit."""
        if remainder.shape != y.shape:
            raise RuntimeError(f"{self.owner}: the remainder recorded in forward has shape "
                               f"{tuple(remainder.shape)}, the half to rebuild {tuple(y.shape)}.")
        with torch.no_grad():
            yi = torch.mul(y, 2.0 ** bits).round_().to(torch.int64)
            xi = torch.div(yi * self.d + remainder.to(torch.int64), self.n, rounding_mode="floor")
            return xi.to(y.dtype).mul_(2.0 ** -bits)


class Tape:
    """What couplings' inverses need and their outputs do not carry (exact mode's remainders), kept
    from the forward to the rebuild.

    The reversible engine keeps one per block, as that block's saved tensors;
    :func:`revnet.fidelity.drift.roundtrip` one for its whole pass. Each coupling step records under
    its own key; the rebuild takes them back in reverse order, and what it took is freed.
    """

    __slots__ = ("_entries",)

    def __init__(self) -> None:
        self._entries: dict[Hashable, list[torch.Tensor]] = {}

    def keys(self) -> tuple[Hashable, ...]:
        """One key per entry, in the order of :meth:`values` (for :meth:`of`)."""
        return tuple(k for k, v in self._entries.items() for _ in v)

    def values(self) -> tuple[torch.Tensor, ...]:
        return tuple(t for v in self._entries.values() for t in v)

    @classmethod
    def of(cls, keys: tuple[Hashable, ...], values: tuple[torch.Tensor, ...]) -> Tape:
        """The tape whose :meth:`keys` and :meth:`values` these are (a reversible block keeps its
        entries as saved tensors and rebuilds the tape in backward)."""
        tape = cls()
        for k, v in zip(keys, values, strict=True):
            tape.record(k, v)
        return tape

    def record(self, key: Hashable, value: torch.Tensor) -> None:
        self._entries.setdefault(key, []).append(value)

    def take(self, key: Hashable, owner: str) -> torch.Tensor:
        stack = self._entries.get(key)
        if not stack:
            raise RuntimeError(
                f"{owner}: exact mode rebuilds its input from its output and the remainder its forward "
                f"recorded, and no remainder is left for it (a second backward through the same graph, "
                f"or an inverse without the forward's tape). Fix: run forward again before each "
                f"backward; for an inverse, use revnet.fidelity.drift.roundtrip, which keeps the tape.")
        return stack.pop()
