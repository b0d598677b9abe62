"""Exact mode's fixed-point lattice: values on ``2^-k`` add and subtract without rounding.

A multiple of ``2^-k`` below ``2^(p-k)`` in magnitude (``p`` = 24 mantissa bits for
float32, 53 for float64) is representable, and so is the sum of two such values while it
stays below that bound: IEEE addition then returns it unrounded. An additive coupling whose
stream and branch outputs stay on the lattice therefore inverts bit for bit
(:class:`revnet.AdditiveCoupling` with ``exact=True``; docs/FIDELITY.md has the numbers).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["EXACT_BITS", "MANTISSA_BITS", "check_bits", "exact_range", "to_lattice"]

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
