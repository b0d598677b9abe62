"""Mixed precision: which autocast dtype a run uses, and entering it."""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch

__all__ = ["AMP_MODES", "autocast", "cpu_has_fast_bf16", "resolve_amp"]


AMP_MODES = ("auto", "none", "bf16", "fp16")


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """Whether this CPU does bf16 arithmetic natively (x86 AVX512-BF16 or AMX, Arm BF16).

    Without it bf16 autocast is emulated and slower than float32. Read from /proc/cpuinfo;
    False where that file does not exist (macOS, Windows).
    """
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = {f for line in text.splitlines() if line.startswith(("flags", "Features"))
             for f in line.split(":", 1)[1].split()}
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def resolve_amp(amp: str, device: torch.device) -> str:
    """The precision ``amp="auto"`` means on ``device``; other values are returned as they are.

    CUDA: bf16 where the GPU supports it, else fp16 (with a GradScaler). CPU: bf16 where the
    CPU has native bf16 (:func:`cpu_has_fast_bf16`), else "none" (float32).
    """
    if amp != "auto":
        return amp
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu":
        return "bf16" if cpu_has_fast_bf16() else "none"
    return "none"


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
