"""What the forward records and the recomputation replays (DESIGN.md, rules 2-4).

The engine runs F and G (or a recomputed unit) twice: once in the forward, without a
graph, and again in backward, with one. For the second run to be the same computation it
must see the same random numbers (dropout masks), the same autocast state, and BatchNorm
must normalise with the batch's statistics without updating the running ones again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["AUTOCAST_DEVICES", "RngState", "autocast_state", "batchnorm_stats_frozen", "cuda_devices",
           "get_rng", "replay_autocast", "set_rng"]

AUTOCAST_DEVICES = ("cpu", "cuda")
RngState = tuple[torch.Tensor, list[torch.Tensor]]  # (CPU generator state, one per CUDA device)


def cuda_devices(x: torch.Tensor) -> list[torch.device]:
    """The CUDA device whose RNG a computation on ``x`` draws from (none on CPU)."""
    return [x.device] if x.is_cuda else []


def get_rng(devices: Sequence[torch.device]) -> RngState:
    """The CPU generator's state and that of each CUDA device in ``devices``."""
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]


def set_rng(state: RngState, devices: Sequence[torch.device]) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    for d, s in zip(devices, cuda, strict=True):
        torch.cuda.set_rng_state(s, d)


def autocast_state() -> dict[str, tuple[bool, torch.dtype]]:
    """Whether autocast is on, and in which dtype, per device type."""
    return {d: (torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in AUTOCAST_DEVICES}


@contextlib.contextmanager
def replay_autocast(state: dict[str, tuple[bool, torch.dtype]]) -> Iterator[None]:
    """Enters the autocast state that :func:`autocast_state` recorded."""
    with contextlib.ExitStack() as stack:
        for device, (enabled, dtype) in state.items():
            if device == "cuda" and not (enabled or torch.cuda.is_available()):
                continue  # autocast("cuda") warns on a machine without CUDA
            stack.enter_context(torch.autocast(device, dtype=dtype, enabled=enabled))
        yield


@contextlib.contextmanager
def batchnorm_stats_frozen(module: nn.Module) -> Iterator[None]:
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
