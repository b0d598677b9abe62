"""Capacity: the largest batch and depth that train under a memory budget, ResNet against RevNet."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .contenders import Progress, depth_of, model_kind
from .memory import measure

__all__ = ["capacity"]

def _largest_under(
    budget: int, probe: Callable[[int], int], lo: int, hi: int, *, verify_max: int, step: float = 0.05,
) -> dict[str, Any]:
    """Largest integer ``v`` with ``probe(v) <= budget``, for a memory that is affine in ``v``.

    Fits the line through ``lo`` and ``hi``, then checks the prediction with real steps
    (while ``v <= verify_max``), moving by ``step`` (relative) until it brackets the limit.
    """
    probes: dict[int, int] = {v: probe(v) for v in (lo, hi)}
    slope = (probes[hi] - probes[lo]) / (hi - lo)
    base = probes[lo] - slope * lo
    predicted = int((budget - base) // slope) if slope > 0 else None
    fit, fail = max((v for v, b in probes.items() if b <= budget), default=None), None
    fail = min((v for v, b in probes.items() if b > budget), default=None)
    v = predicted if predicted is not None else verify_max
    for _ in range(6):
        v = min(v, verify_max)
        if v < 1 or v in probes or (fit is not None and v <= fit) or (fail is not None and v >= fail):
            break
        probes[v] = probe(v)
        if probes[v] <= budget:
            fit = v
            v = max(v + 1, int(v * (1 + step)))
        else:
            fail = v
            v = min(v - 1, int(v * (1 - step)))
    return {"largest": fit, "smallest_over": fail, "predicted": predicted,
            "verified": fit is not None and (fail is not None or fit == predicted),
            "bytes_per_step": slope, "fixed_bytes": base,
            "probes": [{"value": k, "total_bytes": b} for k, b in sorted(probes.items())]}


def capacity(
    budget: int, *, models: Sequence[str] = ("resnet110", "revnet110"),
    kinds: Sequence[str] = ("resnet", "revnet"), depth_batch: int = 32,
    image_size: int = 32, block: str = "basic", verify_max_batch: int = 1024,
    verify_max_units: int = 36, device: str = "cpu", dtype: str = "float32", progress: Progress = None,
) -> dict[str, Any]:
    """The largest batch (per model) and depth (per kind, at ``depth_batch``) under ``budget``.

    ``kinds`` may hold ``"resnet"`` and ``"revnet"`` (the depth search), or nothing. Each model is
    measured as the kind it is (:func:`revnet.bench.contenders.model_kind`, recorded as ``kind``).

    Memory is the whole training step's: weights, gradients, activations and workspace
    (``total_bytes`` of :func:`memory_point`). Both are affine in batch and in depth, so a
    line fitted through two small probes predicts the limit, which is then checked with
    real steps up to ``verify_max_batch`` / ``verify_max_units`` (a RevNet's depth limit
    usually lies far beyond; it is then reported as extrapolated, ``verified: False``).
    """
    def probe(**point: Any) -> int:
        try:
            result = measure(**point, image_size=image_size, device=device, dtype=dtype)
        except torch.cuda.OutOfMemoryError:  # on CUDA, the device's own limit came first
            return budget + 1
        if progress is not None:
            progress(result)
        return result["total_bytes"]

    by_batch = {}
    for name in models:
        kind = model_kind(name)  # asked of the model, not read from its name
        by_batch[name] = _largest_under(
            budget, lambda b, n=name, k=kind: probe(kind=k, model=n, batch=b, warmup_batch=min(b, 8),
                                                    grads="kept"),
            8, 32, verify_max=verify_max_batch)
        by_batch[name]["kind"] = kind
    by_depth = {}
    for kind in kinds:
        scale = 2 if kind == "resnet" else 1  # ResNet units doubled: same depth as the RevNet
        r = _largest_under(
            budget, lambda u, k=kind: probe(kind=k, units=u, block=block, batch=depth_batch,
                                            warmup_batch=min(depth_batch, 8), grads="kept"),
            scale, 3 * scale, verify_max=scale * verify_max_units)
        for key in ("largest", "smallest_over", "predicted"):
            r[f"{key}_depth"] = None if r[key] is None else depth_of(kind, r[key], block)
        by_depth[kind] = r
    config = {"budget_bytes": budget, "models": list(models), "kinds": list(kinds),
              "depth_batch": depth_batch,
              "image_size": image_size, "block": block, "verify_max_batch": verify_max_batch,
              "verify_max_units": verify_max_units, "device": device, "dtype": dtype}
    return {"config": config, "batch": by_batch, "depth": by_depth}
