"""Mixed precision: which autocast dtype a run uses (chosen by what is fast here), and entering it.

``amp="auto"`` takes the precision that trains fastest on the device, and says why:

- CUDA: bf16 where the GPU supports it, else fp16 (with a GradScaler).
- CPU without native bf16 (no AVX512-BF16, AMX or Arm BF16): float32, since emulated bf16
  is slower than float32.
- CPU with native bf16: it depends. With AMX, bf16 convolutions run on the tile units and
  are faster; with AVX512-BF16 alone they were measured slower than float32 (RevNet-38,
  batch 128: 158 against 219 img/s). The flags do not tell which, so a short probe times
  one training step of the run's own model in each precision and takes bf16 only if it is
  clearly faster.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

__all__ = ["AMP_DTYPES", "AMP_MODES", "AmpChoice", "amp_dtype", "autocast", "cpu_bf16_flags",
           "probe_step_time", "resolve_amp"]

# The one mapping from a precision's name to the dtype autocast runs in (None: float32, no autocast).
AMP_DTYPES: dict[str, torch.dtype | None] = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
AMP_MODES = ("auto", *AMP_DTYPES)  # what a run may ask for: "auto" is resolved to one of AMP_DTYPES
_NATIVE_BF16 = ("amx_bf16", "avx512_bf16", "bf16")  # x86 AMX, x86 AVX512-BF16, Arm (Features: bf16)
PROBE_MARGIN = 0.9  # bf16 is taken when its step takes at most this fraction of float32's


@dataclass(frozen=True)
class AmpChoice:
    """The precision a run uses and why (both go into config.json)."""

    amp: str  # "none", "bf16" or "fp16"
    reason: str  # one line, for the log and config.json


@functools.lru_cache(maxsize=1)
def cpu_bf16_flags() -> tuple[str, ...]:
    """This CPU's native-bf16 flags (``amx_bf16``, ``avx512_bf16``; ``bf16`` on Arm), from /proc/cpuinfo.

    Empty where the file does not exist (macOS, Windows) or the CPU has none.
    """
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ()
    flags = {f for line in text.splitlines() if line.startswith(("flags", "Features"))
             for f in line.split(":", 1)[1].split()}
    return tuple(f for f in _NATIVE_BF16 if f in flags)


def resolve_amp(amp: str, device: torch.device, probe: Callable[[str], float] | None = None) -> AmpChoice:
    """What ``amp`` means on ``device``; values other than ``"auto"`` are kept as they are.

    Args:
        amp: one of :data:`AMP_MODES`.
        device: where the run trains.
        probe: ``probe(precision) -> seconds`` of one training step in ``"none"`` or
            ``"bf16"`` (:func:`probe_step_time`); on a CPU with native bf16, ``"auto"``
            without a probe keeps float32.
    """
    if amp != "auto":
        return AmpChoice(amp, "asked for")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return AmpChoice("bf16", "auto: the GPU supports bf16")
        return AmpChoice("fp16", "auto: the GPU has no bf16; fp16 with a GradScaler")
    if device.type != "cpu":
        return AmpChoice("none", f"auto: float32 on {device.type}")
    flags = cpu_bf16_flags()
    if not flags:
        return AmpChoice("none", "auto: this CPU has no native bf16 (AVX512-BF16, AMX or Arm BF16); "
                                 "emulated bf16 is slower than float32")
    if probe is None:
        return AmpChoice("none", f"auto: CPU with {', '.join(flags)}, not probed; float32")
    times = _alternate(probe, ("none", "bf16"))
    fp32, bf16 = statistics.median(times["none"]), statistics.median(times["bf16"])
    pick = "bf16" if bf16 <= PROBE_MARGIN * fp32 else "none"
    return AmpChoice(pick, f"auto: CPU with {', '.join(flags)}; probe of one training step: bf16 "
                           f"{bf16 * 1e3:.0f} ms vs float32 {fp32 * 1e3:.0f} ms -> "
                           f"{'bf16' if pick == 'bf16' else 'float32'}")


def _alternate(probe: Callable[[str], float], modes: tuple[str, ...],
               repeats: int = 3) -> dict[str, list[float]]:
    """Times of ``probe(mode)``, one warm-up each, then ``repeats`` rounds in alternating order."""
    for mode in modes:
        probe(mode)
    times: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(repeats):
        for mode in (modes if r % 2 == 0 else modes[::-1]):
            times[mode].append(probe(mode))
    return times


def probe_step_time(model: nn.Module, batch: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor]
                    ) -> Callable[[str], float]:
    """``probe(precision) -> seconds`` of one forward and backward of a copy of ``model``.

    The copy keeps the run's model, its BatchNorm statistics and the RNG streams untouched.
    """
    twin = copy.deepcopy(model).train()
    device = batch.device

    def probe(precision: str) -> float:
        twin.zero_grad(set_to_none=True)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            start = time.perf_counter()
            with autocast(device, precision):
                loss = loss_fn(twin(batch))
            loss.backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return time.perf_counter() - start

    return probe


def amp_dtype(amp: str) -> torch.dtype | None:
    """The autocast dtype of a resolved precision: ``"bf16"`` and ``"fp16"`` their dtypes,
    ``"none"`` None (float32, no autocast).

    Raises:
        ValueError: ``amp`` is not one of :data:`AMP_DTYPES` (``"auto"`` is resolved first:
            :func:`resolve_amp`).
    """
    try:
        return AMP_DTYPES[amp]
    except KeyError:
        raise ValueError(f"amp must be one of {', '.join(AMP_DTYPES)}, got {amp!r}"
                         + (" (resolve it first: resolve_amp)" if amp == "auto" else "") + ".") from None


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``amp`` (``"bf16"``/``"fp16"``); nothing for ``"none"``."""
    dtype = amp_dtype(amp)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
