"""Activation memory of one training step, each point in a fresh process (docs/DESIGN.md, "How to measure").

On CPU a point runs in a fresh process with ``MALLOC_MMAP_THRESHOLD_=65536`` (freed
tensors leave the process at once); the peak resident set of one training step is read
from ``/proc/self/status`` after the high-water mark was reset just before the step. On
CUDA, ``torch.cuda.max_memory_allocated``. Either way the bytes saved for backward are
counted too, as a cross-check.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..engine import Coupling, set_exact
from ..engine import compile as revnet_compile
from ..engine.modes import set_stored
from ..memory.measure import SavedBytes, freed_memory_returned, nbytes, peak_of
from ..models import RevViT, VisionTransformer
from ..models.transformer import TransformerBlock
from ..training.precision import AMP_DTYPES
from .contenders import (
    KINDS,
    Progress,
    build,
    depth_of,
    family_of,
    is_baseline,
    make_batch,
    model_kind,
    run_mode,
    sync,
)

__all__ = ["measure", "memory_point", "memory_sweep", "step_memory", "sweep_plan"]


def _drop_grad(p: torch.Tensor) -> None:
    p.grad = None  # post-accumulate-grad hook: gradients leave the measurement at once


def step_memory(
    model: nn.Module, inputs: torch.Tensor, loss_fn: Callable[[Any], torch.Tensor] | None = None, *,
    grads: str = "freed", warmup_inputs: torch.Tensor | None = None, autocast: torch.dtype | None = None,
) -> dict[str, Any]:
    """Memory of one training step of any model, in this process: forward, ``loss_fn``, backward.

    The step runs once to warm up (on ``warmup_inputs``, default ``inputs``), gradients
    are freed, then it runs again under measurement: on CUDA the allocator's peak, on CPU
    (Linux) the peak resident set above the level before the step. On CPU the process's
    large allocations are made to go back to the system when freed (glibc's mmap
    threshold, as ``MALLOC_MMAP_THRESHOLD_=65536``), so the peak follows live tensors; a
    fresh process (:func:`measure`) is cleaner still, since nothing earlier is cached.

    Args:
        model: the model, in the mode to measure (e.g. after :func:`revnet.set_reversible`).
        inputs: one batch as the model takes it.
        loss_fn: ``loss_fn(output) -> scalar``; default ``output.float().square().mean()``.
        grads: ``"freed"``: each parameter's gradient is dropped the moment it has been
            accumulated, so the peak holds activations, workspace and gradients still in
            flight: the activation measurement. ``"kept"``: gradients stay, as in an
            ordinary step: what the step needs in all.
        warmup_inputs: batch of the warm-up step.
        autocast: run the forward and ``loss_fn`` under ``torch.autocast`` in this dtype (as a
            training step with ``--amp bf16``/``fp16`` does); backward runs outside it.

    Returns:
        ``peak_bytes`` (the step's peak above the level before it), ``grad_bytes`` (the
        parameter gradients), ``activation_bytes`` (``peak_bytes``, or with ``"kept"``
        ``peak_bytes - grad_bytes``, a lower bound), ``saved_bytes`` (distinct storages
        the autograd graph keeps for backward, parameters excluded: the cross-check),
        ``total_bytes`` (weights, buffers, the batch, gradients and the peak),
        ``params`` and ``method``.
    """
    if grads not in ("freed", "kept"):
        raise ValueError(f"step_memory: grads must be 'freed' or 'kept', got {grads!r}.")
    loss_fn = loss_fn or _square_mean
    dev = inputs.device
    cuda = dev.type == "cuda"

    def step(saved: SavedBytes | None = None, x: torch.Tensor = inputs) -> None:
        # Only the forward is counted: what backward recomputes and frees is not kept.
        cast = torch.autocast(dev.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
        with saved if saved is not None else contextlib.nullcontext(), cast:
            loss = loss_fn(model(x))
        loss.backward()

    def measured_step() -> None:
        step(saved)
        sync(dev)

    # On CPU the warm-up too runs with large allocations returned to the system (peak_of's rule).
    with contextlib.nullcontext() if cuda else freed_memory_returned():
        step(x=inputs if warmup_inputs is None else warmup_inputs)
        model.zero_grad(set_to_none=True)
        params = [p for p in model.parameters() if p.requires_grad]
        hooks = [p.register_post_accumulate_grad_hook(_drop_grad) for p in params] if grads == "freed" else []
        saved = SavedBytes(model)
        try:
            peak = peak_of(measured_step, dev, source="resident")  # docs/DESIGN.md: above the level before
        finally:
            for h in hooks:
                h.remove()
    grad_bytes = sum(map(nbytes, params))
    # Tensors only (not the interpreter, libraries or thread stacks), as CUDA's allocator counts.
    resident = sum(map(nbytes, [*model.parameters(), *model.buffers(), inputs]))
    kept = grad_bytes if grads == "kept" else 0
    return {"params": sum(p.numel() for p in params), "grads": grads, "peak_bytes": peak,
            "grad_bytes": grad_bytes, "activation_bytes": peak - kept, "saved_bytes": saved.total,
            "total_bytes": resident + grad_bytes - kept + peak,
            "method": "cuda.max_memory_allocated" if cuda else "VmHWM-VmRSS"}


def _square_mean(output: torch.Tensor) -> torch.Tensor:
    return output.float().square().mean()


def memory_point(
    kind: str, units: int | None = None, *, model: str | None = None, block: str = "basic",
    batch: int = 32, image_size: int = 32, in_chans: int = 3, warmup_batch: int | None = None,
    grads: str = "freed", device: str = "cpu", dtype: str = "float32", seed: int = 0, exact: bool = False,
    compile: str | None = None, stored: Sequence[str] = (), amp: str = "none",
) -> dict[str, Any]:
    """Memory of one training step (forward, cross-entropy, backward) of a zoo network, in this process.

    Prefer :func:`measure`, which gives CPU points a fresh process. See :func:`step_memory`
    (``grads``, and what is returned besides the configuration).

    Args:
        kind: one of :data:`KINDS` or :data:`revnet.bench.contenders.VIT_KINDS`.
        units: units per stage of a sweep network (:func:`revnet.bench.contenders.build`; blocks of
            a transformer), or
        model: a registered model.
        warmup_batch: batch of the warm-up step (default ``batch``).
        exact: a RevNet's couplings in exact mode (:func:`revnet.set_exact`).
        compile: a torch.compile backend: the network under :func:`revnet.compile` (the
            warm-up step compiles; ``revnet`` and ``revnet-plain`` kinds, and ``resnet``).
        stored: units stored in a reversible kind (names as in a :class:`revnet.Plan`).
        amp: ``"none"``, ``"bf16"`` or ``"fp16"``: the forward under autocast in that dtype, as
            ``revnet train --amp`` runs it.
    """
    if amp not in AMP_DTYPES:
        raise ValueError(f"memory_point: amp must be one of {', '.join(AMP_DTYPES)}, got {amp!r}.")
    torch.manual_seed(seed)
    net = build(kind, units, model=model, block=block, in_chans=in_chans, device=device,
                dtype=getattr(torch, dtype), image_size=image_size if family_of(kind) == "vit" else None)
    if exact and not set_exact(net, True):
        raise ValueError(f"memory_point: exact mode needs a RevNet, got kind {kind!r}.")
    if compile is not None:
        if kind.endswith("-checkpoint"):
            raise ValueError("memory_point: compile is for every kind but the -checkpoint ones.")
        revnet_compile(net, backend=compile)
    x, y = make_batch(net, batch, image_size, in_chans)
    with run_mode(net, kind):
        if stored:
            if kind not in ("revnet", "revvit"):
                raise ValueError(f"memory_point: stored units need a reversible kind, got {kind!r}.")
            set_stored(net, stored)
        warm_x, warm_y = make_batch(net, warmup_batch or batch, image_size, in_chans)
        labels = {len(warm_y): warm_y, len(y): y}  # by batch size: the warm-up's may differ
        result = step_memory(net, x, lambda out: F.cross_entropy(out.float(), labels[out.shape[0]]),
                             grads=grads, warmup_inputs=warm_x, autocast=AMP_DTYPES[amp])
    result["total_bytes"] += nbytes(y)  # the batch: images and labels
    return {
        "kind": kind, "units": units, "model": model, "block": block,
        "depth": depth_of(kind, units, block) if model is None else _model_depth(model, net),
        "batch": batch, "image_size": image_size, "in_chans": in_chans, "device": device,
        "dtype": dtype, "amp": amp, "exact": exact, "compile": compile, "stored": list(stored), **result,
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
    }


def _model_depth(name: str, net: nn.Module) -> int:
    """The depth in a CNN's name (``revnet38``: 38); a transformer's number of blocks."""
    if isinstance(net, RevViT | VisionTransformer):
        return sum(isinstance(m, Coupling | TransformerBlock) for m in net.modules())
    return int(re.sub(r"\D", "", name))


def measure(timeout: float = 1800.0, **point: Any) -> dict[str, Any]:
    """:func:`memory_point` in a fresh process on CPU (in this one on CUDA).

    Raises:
        RuntimeError: the worker process failed; its stderr is in the message.
    """
    if torch.device(point.get("device", "cpu")).type == "cuda":
        return memory_point(**point)
    src = str(Path(__file__).resolve().parents[2])  # the folder holding the revnet package
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536",
               PYTHONPATH=os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p),
               OMP_NUM_THREADS=str(torch.get_num_threads()))
    proc = subprocess.run([sys.executable, "-m", "revnet.bench.worker", json.dumps(point)],
                          capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"memory worker for {point} exited with {proc.returncode}:\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def sweep_plan(
    units: Sequence[int] = (1, 3, 9, 18, 36), kinds: Sequence[str] = KINDS, *,
    models: Sequence[str] = (), block: str = "basic", batch: int = 32, model_batch: int = 128,
    compile: str | None = None,
) -> list[dict[str, Any]]:
    """The points :func:`memory_sweep` measures, in order (its arguments, without the machine's).

    A registered model runs in each of ``kinds`` that matches it: a reversible one (asked of
    the model: :func:`revnet.bench.contenders.model_kind`) in every reversible kind, a
    baseline as the baseline.
    """
    plan = [{"kind": k, "units": 2 * n if k == "resnet" else n, "block": block, "batch": batch}
            for n in units for k in kinds]
    for name in models:
        rev = not is_baseline(model_kind(name))
        plan += [{"kind": k, "model": name, "batch": model_batch}
                 for k in kinds if (not is_baseline(k)) == rev]
    if compile is not None:
        plan += [{**p, "compile": compile} for p in plan
                 if p["kind"] in ("revnet", "revnet-plain", "revvit", "revvit-plain")]
    return plan


def memory_sweep(
    units: Sequence[int] = (1, 3, 9, 18, 36), kinds: Sequence[str] = KINDS, *,
    models: Sequence[str] = (), block: str = "basic", batch: int = 32, model_batch: int = 128,
    image_size: int = 32, device: str = "cpu", dtype: str = "float32", compile: str | None = None,
    progress: Progress = None,
) -> dict[str, Any]:
    """Memory across depth, plus the paper's named models.

    Depths are matched: a RevNet with ``n`` units per stage (``12n+2`` layers, basic) is
    compared with a ResNet with ``2n`` units per stage (``6(2n)+2`` layers).

    Args:
        units: RevNet units per stage to sweep (the ResNet gets twice as many).
        kinds: which of :data:`KINDS` to run.
        models: registered models to measure at ``model_batch``; RevNets run in every
            RevNet kind of ``kinds``, ResNets as ``resnet``.
        block: residual function of the sweep networks.
        batch: batch of the sweep points.
        compile: a torch.compile backend: every ``revnet`` and ``revnet-plain`` point is
            measured a second time under :func:`revnet.compile` (kind shown as ``KIND+compile``).
        progress: called with each finished point.
    """
    plan = sweep_plan(units, kinds, models=models, block=block, batch=batch, model_batch=model_batch,
                      compile=compile)
    points = []
    for p in plan:
        points.append(measure(**p, image_size=image_size, device=device, dtype=dtype))
        if progress is not None:
            progress(points[-1])
    families = {family_of(k) for k in kinds}
    if len(families) != 1:
        raise ValueError(f"memory_sweep: kinds {list(kinds)} mix families; run the CNNs and the ViTs apart.")
    config = {"family": families.pop(), "units": list(units), "kinds": list(kinds), "models": list(models),
              "block": block,
              "batch": batch, "model_batch": model_batch, "image_size": image_size,
              "device": device, "dtype": dtype, "compile": compile}
    return {"config": config, "points": points}
