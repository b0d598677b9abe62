"""What reversibility saved in a run: the activation memory of one of its training steps,
reversible against plain backprop.

``revnet train`` ends with this comparison, measured in its own process in a moment: the
run's model built afresh (the weights do not change what a step keeps), on one random batch
of the run's shape (one process's micro-batch, its images, its precision), once as it
trained (the units its memory plan stored stored, every other rebuilt) and once under plain
autograd (:func:`revnet.set_reversible` ``(model, False)``), eagerly (``revnet.compile`` keeps
the same tensors for backward). The count is the engine's:
:func:`revnet.memory.measure.saved_bytes`, the bytes autograd keeps for backward, exact and
the same on every device, below the step's peak by the backward's workspace.
``revnet bench memory --run RUN_DIR`` measures the same two steps' peaks, each in a fresh
process, and prints the same line.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from ..engine import has_reversible_units, set_reversible
from ..engine.modes import set_stored
from ..memory.measure import saved_bytes
from ..memory.sizes import format_bytes
from .config import TrainConfig
from .precision import AMP_DTYPES, amp_dtype
from .setup import build_model, prediction_loss, random_batch

__all__ = ["SAVED_BYTES_METHOD", "memory_line", "saved_bytes_of_run", "step_of_run"]

SAVED_BYTES_METHOD = "saved_tensors_hooks"  # how saved_bytes_of_run measures, as the line says
SHAPE_KEYS = ("image_size", "in_chans", "num_classes", "vocab_size", "context_length")  # a run's data shape


def step_of_run(config: Mapping[str, Any], summary: Mapping[str, Any]) -> dict[str, Any]:
    """One process's training step of a finished run, from its ``config.json`` and ``summary.json``.

    Returns:
        ``model``; ``batch``, one process's micro-batch (``batch_size / (world size x
        accum_steps)``); the shape of its data (``image_size``, ``in_chans`` and ``num_classes``, or
        ``vocab_size`` and ``context_length``);
        ``amp``, the precision it trained in (``"none"`` where it was never resolved);
        ``exact``; ``stored``, the units its memory plan stored; ``device``.
    """
    world = int(summary.get("world_size", 1))
    amp = config.get("amp", "none")
    if "vocab_size" in summary:
        shape = {k: summary[k] for k in ("vocab_size", "context_length")}
    else:
        shape = {"image_size": summary["image_size"], "in_chans": summary["in_chans"],
                 "num_classes": summary.get("num_classes", 10)}
    return {"model": config["model"], "batch": config["batch_size"] // (world * config.get("accum_steps", 1)),
            **shape, "amp": amp if amp in AMP_DTYPES else "none",
            "exact": bool(config.get("exact", False)), "stored": list(summary.get("stored") or []),
            "device": summary.get("device", "cpu")}


def saved_bytes_of_run(config: Mapping[str, Any], summary: Mapping[str, Any], *,
                       device: str | torch.device | None = None) -> dict[str, Any] | None:
    """The bytes one training step of the run keeps for backward, reversible and plain, in this process.

    Args:
        config: the run's configuration (``config.json``, or ``summary["config"]``).
        summary: its summary (``summary.json``, or what :func:`revnet.training.fit` returned).
        device: where to measure; default the run's own device.

    Returns:
        :func:`step_of_run`'s step, with ``method`` (:data:`SAVED_BYTES_METHOD`),
        ``reversible_bytes`` and ``plain_bytes``; None for a model with nothing to rebuild
        (a ResNet, a ViT).
    """
    step = step_of_run(config, summary)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    fields = {k: v for k, v in config.items() if k in names}
    cfg = TrainConfig(**{**fields, "milestones": tuple(fields.get("milestones", ())), "amp": step["amp"]})
    shape = {k: step[k] for k in SHAPE_KEYS if k in step}
    model = build_model(cfg, **shape)
    if not has_reversible_units(model):
        return None
    dev = torch.device(device if device is not None else step["device"])
    model.to(dev, memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format).train()
    g = torch.Generator(dev).manual_seed(0)
    x, y = random_batch(shape, step["batch"], cfg, dev, g)
    if "vocab_size" in shape:  # as a language model trains: the loss without the logits (models.lm_loss)
        kw: dict[str, Any] = {"loss_fn": lambda loss: loss, "forward_kwargs": {"targets": y}}
    else:
        kw = {"loss_fn": lambda out: prediction_loss(out, y)}
    dtype = amp_dtype(step["amp"])
    set_stored(model, step["stored"])  # as it trained: the plan's units stored, every other rebuilt
    reversible = saved_bytes(model, x, autocast=dtype, **kw)
    set_reversible(model, False)
    plain = saved_bytes(model, x, autocast=dtype, **kw)
    return {**step, "method": SAVED_BYTES_METHOD, "reversible_bytes": reversible, "plain_bytes": plain}


def memory_line(report: Mapping[str, Any]) -> str:
    """The comparison as one line: ``report`` holds ``model``, ``batch``, ``amp``, ``stored``,
    ``method``, ``reversible_bytes`` and ``plain_bytes`` (:func:`saved_bytes_of_run`)."""
    a, b = report["reversible_bytes"], report["plain_bytes"]
    precision = "" if report["amp"] == "none" else f", {report['amp']} autocast"
    stored = report.get("stored") or []
    planned = f" ({len(stored)} units stored by the plan)" if stored else ""
    return (f"activation memory of one {report['model']} training step at batch {report['batch']} "
            f"({report['method']}{precision}): reversible{planned} {format_bytes(a)} vs plain backprop "
            f"{format_bytes(b)}: {b / max(a, 1):.1f}x less, {format_bytes(b - a)} saved")
