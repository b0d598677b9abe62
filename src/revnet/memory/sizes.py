"""Sizes in bytes: read from text (``"2GiB"``) and written for tables."""

from __future__ import annotations

import re

__all__ = ["format_bytes", "parse_bytes"]

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "tb": 10**12}


def parse_bytes(text: str) -> int:
    """``"2GiB"`` -> 2147483648; also ``"512MiB"``, ``"1.5GB"``, ``"4096"`` (bytes)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a size; write e.g. 2GiB, 512MiB, 1.5GB or 4096.")
    value = float(m.group(1)) * _UNITS[unit]
    if value < 1:
        raise ValueError(f"size {text!r} must be at least one byte.")
    return int(value)


def format_bytes(n: float) -> str:
    """Bytes in MiB (or GiB from 10 GiB), for tables."""
    return f"{n / 2**30:.1f} GiB" if abs(n) >= 10 * 2**30 else f"{n / 2**20:.1f} MiB"
