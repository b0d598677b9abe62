"""The angle between the reversible gradient and plain autograd's, on the same batch and state.

Gomez et al. (2017, Sec. 6) tracked this angle during training and saw no instability;
``revnet train --grad-angle-every K`` logs it, whole model and per stage.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..engine.modes import kept_state, set_reversible

__all__ = ["gradient_angle", "stage_of", "unwrap"]


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel (its reducer must not see these passes)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# --------------------------------------------------------------------------------------
# Gradient angle
# --------------------------------------------------------------------------------------

def stage_of(model: nn.Module, param_name: str) -> str:
    """Group of a parameter: its top-level child, split per item when that child is a plain
    ``nn.Sequential``/``nn.ModuleList`` (RevNet: ``stem``, ``stages.0`` ... ``stages.2``, ``head``)."""
    parts = param_name.split(".")
    child = model.get_submodule(parts[0]) if len(parts) > 1 else None
    if type(child) in (nn.Sequential, nn.ModuleList) and len(parts) > 2:
        return ".".join(parts[:2])
    return parts[0]


def _angle(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> float | None:
    """Angle in degrees between two gradients given as matching pieces; None if one is zero.

    ``2 atan2(|u - v|, |u + v|)`` of the unit vectors, in float64: accurate for tiny angles,
    where ``acos`` of the cosine loses everything below about 1e-6 degrees.
    """
    na = math.sqrt(sum(a.double().square().sum().item() for a, _ in pairs))
    nb = math.sqrt(sum(b.double().square().sum().item() for _, b in pairs))
    if na == 0 or nb == 0:
        return None
    diff = math.sqrt(sum((a.double() / na - b.double() / nb).square().sum().item() for a, b in pairs))
    plus = math.sqrt(sum((a.double() / na + b.double() / nb).square().sum().item() for a, b in pairs))
    return math.degrees(2 * math.atan2(diff, plus))


def gradient_angle(model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor]) -> dict[str, Any]:
    """Angle between the reversible gradient and plain autograd's, on the same batch and state.

    Runs ``loss_fn(model)`` twice from the same RNG state and BatchNorm buffers: as the
    model is configured (reversible sequences rebuild their inputs), then with every
    sequence under plain autograd (activations stored: the true gradient up to ordinary
    rounding). Both use ``torch.autograd.grad``; ``.grad``, buffers, RNG streams and the
    ``reversible`` flags are left as they were, so a training step that follows is
    unchanged.

    Args:
        model: the model (a DistributedDataParallel is unwrapped: these passes stay local).
        loss_fn: computes the scalar loss of one batch with the module it is given (under
            the training autocast, if any).

    Returns:
        ``grad_angle_deg`` (whole model), ``grad_angle_by_stage`` (see :func:`stage_of`),
        ``grad_rel_diff`` (``|g_rev - g_plain| / |g_plain|``). An angle is None where a
        gradient is zero.
    """
    net = unwrap(model)
    named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("gradient_angle: the model has no trainable parameters.")
    params = [p for _, p in named]
    grads: list[list[torch.Tensor]] = []
    with kept_state(net) as restore:  # the switches, buffers and RNG streams come back as they were
        for plain in (False, True):
            restore()
            if plain:
                set_reversible(net, False)
            loss = loss_fn(net)
            got = torch.autograd.grad(loss, params, allow_unused=True)
            grads.append([torch.zeros_like(p) if g is None else g.detach() for g, p in zip(got, params,
                                                                                         strict=True)])
    rev, ref = grads
    groups: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for (name, _), a, b in zip(named, rev, ref, strict=True):
        groups.setdefault(stage_of(net, name), []).append((a, b))
    pairs = list(zip(rev, ref, strict=True))
    diff = math.sqrt(sum((a.double() - b.double()).square().sum().item() for a, b in pairs))
    norm = math.sqrt(sum(b.double().square().sum().item() for b in ref))
    return {"grad_angle_deg": _angle(pairs),
            "grad_angle_by_stage": {k: _angle(v) for k, v in groups.items()},
            "grad_rel_diff": diff / norm if norm else diff}


