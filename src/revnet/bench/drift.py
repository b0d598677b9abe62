"""Drift: how far rebuilt activations stray from the stored ones, and what exact mode costs."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..engine import set_exact
from ..engine.exact import EXACT_BITS
from ..fidelity import reconstruction_error, roundtrip, sequence_inputs
from ..models import RevNet, create_model
from ..training.precision import autocast
from .contenders import Progress, build, make_batch, sync, time_stats
from .memory import measure

__all__ = ["DRIFT_PRECISIONS", "drift", "exact_cost"]

DRIFT_PRECISIONS = ("float64", "float32", "bf16", "bf16-model")


def _precision(net: nn.Module, x: torch.Tensor, precision: str
               ) -> tuple[nn.Module, torch.Tensor, contextlib.AbstractContextManager]:
    """``float64``/``float32``: model and input in that dtype; ``bf16``: float32 weights under
    bf16 autocast, as ``revnet train --amp bf16`` runs (F and G in bf16, the residual stream
    kept in float32 by the engine); ``bf16-model``: weights, input and stream all bf16."""
    if precision not in DRIFT_PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {DRIFT_PRECISIONS}.")
    dtype = {"float64": torch.float64, "bf16-model": torch.bfloat16}.get(precision, torch.float32)
    ctx = autocast(x.device, "bf16" if precision == "bf16" else "none")  # as `revnet train --amp bf16`
    return net.to(dtype), x.to(dtype), ctx


def drift(
    model: str = "revnet38", *, state_dict: dict[str, Any] | None = None, images: torch.Tensor | None = None,
    depths: Sequence[int] = (1, 2, 4, 8, 16, 32, 64), precisions: Sequence[str] = DRIFT_PRECISIONS,
    exact_precisions: Sequence[str] = ("float32", "bf16"), batch: int = 16, image_size: int = 32,
    in_chans: int = 3, num_classes: int = 10, device: str = "cpu", seed: int = 0,
    exact_bits: int = EXACT_BITS, progress: Progress = None,
) -> dict[str, Any]:
    """Reconstruction error of each reversible sequence's input after inverting N blocks.

    For each stage's :class:`ReversibleSequence`, its real input (from a forward of the
    whole model on ``images``, train-mode BatchNorm as in training) is run through its
    first N blocks and rebuilt from their output with the engine's arithmetic
    (:func:`revnet.fidelity.roundtrip`). Depths beyond the sequence's own length repeat
    its blocks cyclically (block ``i`` is block ``i mod len``): a deeper stack of the same
    kind of blocks, with trained weights where the model has them.

    Args:
        model: registered RevNet.
        state_dict: trained weights (e.g. ``torch.load("best.pt")["model"]``); the fresh
            initialisation (seed ``seed``) is always measured too.
        images: the batch (normalised images); default: ``batch`` random normal images.
        depths: numbers of blocks N.
        precisions: float mode in :data:`DRIFT_PRECISIONS` (see ``_precision``).
        exact_precisions: precisions also measured in exact mode (error 0 by design; a
            stream past the range is recorded as ``range_error``).
        exact_bits: fraction bits of exact mode's lattice.

    Returns:
        ``points``: one per (weights, precision, exact, sequence, depth) with
        ``max_abs_error`` and ``rel_error`` (max abs error / max |input|) and the input's
        and output's max magnitude; ``summary``: the worst sequence per configuration and depth.
    """
    if not depths or any(d < 1 for d in depths):
        raise ValueError(f"drift: depths must be positive block counts, got {list(depths)}.")
    torch.manual_seed(seed)
    if images is None:
        images = torch.randn(batch, in_chans, image_size, image_size)
    images = images.to(device)
    fresh = create_model(model, num_classes=num_classes, in_chans=images.shape[1]).to(device)
    if not isinstance(fresh, RevNet):
        raise ValueError(f"drift: {model!r} is not a RevNet.")
    weights = {"fresh": fresh.state_dict()}
    if state_dict is not None:
        weights["trained"] = state_dict
    plan = [(w, p, False) for w in weights for p in precisions]
    plan += [(w, p, True) for w in weights for p in exact_precisions]
    points = []
    for w, precision, exact in plan:
        net = create_model(model, num_classes=num_classes, in_chans=images.shape[1]).to(device)
        net.load_state_dict(weights[w])
        set_exact(net, exact, bits=exact_bits)
        net, x, ctx = _precision(net.train(), images, precision)
        with ctx:
            inputs = sequence_inputs(net, lambda m, x=x: m(x))
            seqs = dict(net.named_modules())
            for name, inp in inputs.items():
                blocks = list(seqs[name].couplings)
                for n in depths:
                    chain = [blocks[i % len(blocks)] for i in range(n)]
                    point = {"weights": w, "precision": precision, "exact": exact, "sequence": name,
                             "depth": n, "blocks_in_sequence": len(blocks),
                             "input_max": inp.abs().max().item()}
                    try:
                        y, rebuilt = roundtrip(chain, inp, seqs[name].dim)
                    except OverflowError as e:  # exact mode past its range: say where
                        point.update(max_abs_error=None, rel_error=None, output_max=None, range_error=str(e))
                    else:
                        point.update(reconstruction_error(chain[0].entry(inp), rebuilt),
                                     output_max=y.abs().max().item())
                    points.append(point)
        if progress is not None:
            progress({"weights": w, "precision": precision, "exact": exact})
    summary = []
    for w, precision, exact in plan:
        for n in depths:
            key = (w, precision, exact, n)
            pts = [p for p in points if (p["weights"], p["precision"], p["exact"], p["depth"]) == key]
            ok = [p for p in pts if p["rel_error"] is not None]
            worst = max(ok, key=lambda p: p["rel_error"]) if ok else None
            summary.append({"weights": w, "precision": precision, "exact": exact, "depth": n,
                            "max_abs_error": max((p["max_abs_error"] for p in ok), default=None),
                            "rel_error": worst["rel_error"] if worst else None,
                            "worst_sequence": worst["sequence"] if worst else None,
                            "range_errors": sum("range_error" in p for p in pts)})
    config = {"model": model, "trained": state_dict is not None, "depths": list(depths),
              "precisions": list(precisions), "exact_precisions": list(exact_precisions),
              "exact_bits": exact_bits, "batch": images.shape[0], "image_size": images.shape[-1],
              "in_chans": images.shape[1],
              "device": device, "seed": seed, "batchnorm": "train mode (batch statistics)"}
    return {"config": config, "points": points, "summary": summary}


def exact_cost(
    model: str = "revnet38", *, batch: int = 128, image_size: int = 28, in_chans: int = 1,
    amps: Sequence[str] = ("none", "bf16"), repeats: int = 7, warmup: int = 2, memory: bool = True,
    device: str = "cpu", seed: int = 0, progress: Progress = None,
) -> dict[str, Any]:
    """What exact mode costs: training-step time and activation memory, exact vs float.

    Time: forward, cross-entropy and backward (reversible) of the same weights with the
    couplings in float and in exact mode, alternated in one process, for each autocast
    setting in ``amps``; ratios of medians. Memory: :func:`measure` (a fresh process on
    CPU) of one reversible training step in float32, float vs exact.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError("exact_cost: repeats must be >= 1 and warmup >= 0.")
    torch.manual_seed(seed)
    net = build("revnet", model=model, in_chans=in_chans, device=device)
    x, y = make_batch(net, batch, image_size, in_chans)
    speed_runs = {}
    for amp in amps:
        ctx = autocast(torch.device(device), amp)  # as `revnet train --amp` runs it

        def timed(exact: bool, ctx: Any = ctx) -> float:
            set_exact(net, exact)
            net.zero_grad(set_to_none=True)
            sync(device)
            t = time.perf_counter()
            with ctx:
                loss = F.cross_entropy(net(x).float(), y)
            loss.backward()
            sync(device)
            return time.perf_counter() - t

        times: dict[str, list[float]] = {"float": [], "exact": []}
        for _ in range(warmup):
            timed(False)
            timed(True)
        for r in range(repeats):
            for mode in (("float", "exact") if r % 2 else ("exact", "float")):
                times[mode].append(timed(mode == "exact"))
            if progress is not None:
                progress({"amp": amp, "repeat": r})
        stats = {k: time_stats(v, batch) for k, v in times.items()}
        per = [a / b for a, b in zip(times["exact"], times["float"], strict=True)]
        spread = {"median": statistics.median(per), "min": min(per), "max": max(per)}
        speed_runs[amp] = {**stats, "ratio": stats["exact"]["median_s"] / stats["float"]["median_s"],
                           "pair_ratios": spread}
    set_exact(net, False)
    mem = {}
    if memory:
        point = {"kind": "revnet", "model": model, "batch": batch, "image_size": image_size,
                 "in_chans": in_chans, "device": device}
        for exact in (False, True):
            mem["exact" if exact else "float"] = measure(**point, exact=exact)
            if progress is not None:
                progress({"memory": exact})
    config = {"model": model, "batch": batch, "image_size": image_size, "in_chans": in_chans,
              "amps": list(amps), "repeats": repeats, "warmup": warmup, "device": device,
              "threads": torch.get_num_threads(), "seed": seed}
    return {"config": config, "speed": speed_runs, "memory": mem}
