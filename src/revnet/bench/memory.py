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
from ..models import RevViT, VisionTransformer, model_accepts
from ..models.transformer import TransformerBlock
from ..training.precision import AMP_DTYPES
from .contenders import (
    GPT_SWEEP,
    KINDS,
    Progress,
    build,
    depth_of,
    family_of,
    is_baseline,
    logits_loss,
    make_batch,
    make_tokens,
    model_kind,
    run_mode,
    sync,
)

__all__ = ["SWEEPS", "measure", "memory_point", "memory_sweep", "step_memory", "sweep_plan"]

LM_LOSSES = ("fused", "logits")  # how a language model's loss is computed (memory_point's lm_loss)
SWEEPS = ("depth", "context")  # what a sweep varies: blocks (every family), or tokens (language models)


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
    compile: str | None = None, stored: Sequence[str] = (), amp: str = "none", context: int | None = None,
    embed_dim: int | None = None, num_heads: int | None = None, vocab_size: int | None = None,
    lm_loss: str = "fused",
) -> dict[str, Any]:
    """Memory of one training step (forward, cross-entropy, backward) of a zoo network, in this process.

    Prefer :func:`measure`, which gives CPU points a fresh process. See :func:`step_memory`
    (``grads``, and what is returned besides the configuration).

    A language model (the GPT kinds, :data:`revnet.bench.contenders.GPT_KINDS`) takes random token
    ids ``(batch, context)`` in ``[0, vocab_size)`` and its loss is the cross-entropy at every
    position against the next tokens; ``image_size`` and ``in_chans`` do not apply.

    Args:
        kind: one of :data:`KINDS`, :data:`revnet.bench.contenders.VIT_KINDS` or
            :data:`revnet.bench.contenders.GPT_KINDS`.
        units: units per stage of a sweep network (:func:`revnet.bench.contenders.build`; blocks of
            a transformer), or
        model: a registered model.
        context: tokens per sequence of a language model (default 1024; a named model's position
            table must hold them).
        embed_dim, num_heads, vocab_size: the width of a language-model sweep network (default
            GPT-2 small's, :data:`revnet.bench.contenders.GPT_SWEEP`).
        warmup_batch: batch of the warm-up step (default ``batch``).
        exact: a RevNet's couplings in exact mode (:func:`revnet.set_exact`).
        compile: a torch.compile backend: the network under :func:`revnet.compile` (the
            warm-up step compiles; ``revnet`` and ``revnet-plain`` kinds, and ``resnet``).
        stored: units stored in a reversible kind (names as in a :class:`revnet.Plan`).
        amp: ``"none"``, ``"bf16"`` or ``"fp16"``: the forward under autocast in that dtype, as
            ``revnet train --amp`` runs it.
        lm_loss: a language model's loss: ``"fused"`` (default), as ``revnet train`` computes it,
            ``model(tokens, targets=...)`` without keeping the logits
            (:func:`revnet.models.lm_loss.linear_cross_entropy`); ``"logits"``: the cross-entropy
            of the logits, which keeps them (batch x context x vocabulary floats, and as many again
            for their gradient).
    """
    if lm_loss not in LM_LOSSES:
        raise ValueError(f"memory_point: lm_loss must be one of {LM_LOSSES}, got {lm_loss!r}.")
    if amp not in AMP_DTYPES:
        raise ValueError(f"memory_point: amp must be one of {', '.join(AMP_DTYPES)}, got {amp!r}.")
    family = family_of(kind)
    lm = family == "gpt"
    width = {"embed_dim": embed_dim, "num_heads": num_heads, "vocab_size": vocab_size}
    if lm:
        context = 1024 if context is None else context
        if context < 1:
            raise ValueError(f"memory_point: context must be >= 1 token, got {context}.")
    elif context is not None or any(v is not None for v in width.values()):
        raise ValueError(f"memory_point: context, embed_dim, num_heads and vocab_size are for the language "
                         f"models (GPT kinds); kind {kind!r} is {family}. Fix: leave them out.")
    torch.manual_seed(seed)
    net = build(kind, units, model=model, block=block, in_chans=in_chans, device=device,
                dtype=getattr(torch, dtype), image_size=image_size if family == "vit" else None,
                **({"context": context, **width} if lm else {}))
    if exact and not set_exact(net, True):
        raise ValueError(f"memory_point: exact mode needs a RevNet, got kind {kind!r}.")
    if compile is not None:
        if kind.endswith("-checkpoint"):
            raise ValueError("memory_point: compile is for every kind but the -checkpoint ones.")
        revnet_compile(net, backend=compile)

    def batch_of(n: int) -> tuple[torch.Tensor, torch.Tensor]:  # tokens and next tokens, or images and labels
        return make_tokens(net, n, context) if lm else make_batch(net, n, image_size, in_chans)

    def loss(out: torch.Tensor) -> torch.Tensor:
        if out.dim() == 0:  # already the loss: a language model given its targets
            return out
        target = labels[out.shape[0]]
        return logits_loss(out, target) if lm else F.cross_entropy(out.float(), target)

    x, y = batch_of(batch)
    with run_mode(net, kind):
        if stored:
            if kind not in ("revnet", "revvit", "revgpt"):
                raise ValueError(f"memory_point: stored units need a reversible kind, got {kind!r}.")
            set_stored(net, stored)
        warm_x, warm_y = batch_of(warmup_batch or batch)
        labels = {len(warm_y): warm_y, len(y): y}  # by batch size: the warm-up's may differ
        stepped = _WithTargets(net, labels) if lm and lm_loss == "fused" else net
        result = step_memory(stepped, x, loss, grads=grads, warmup_inputs=warm_x, autocast=AMP_DTYPES[amp])
    result["total_bytes"] += nbytes(y)  # the batch: images (or tokens) and labels (or next tokens)
    shape = ({"image_size": None, "in_chans": None, "context": context, "vocab_size": net.vocab_size,
              "embed_dim": net.tok_embed.embedding_dim, "lm_loss": lm_loss} if lm
             else {"image_size": image_size, "in_chans": in_chans})
    return {
        "kind": kind, "units": units, "model": model, "block": block,
        "depth": depth_of(kind, units, block) if model is None else _model_depth(model, net),
        "batch": batch, **shape, "device": device,
        "dtype": dtype, "amp": amp, "exact": exact, "compile": compile, "stored": list(stored), **result,
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
    }


class _WithTargets(nn.Module):
    """A language model stepped on its training loss: ``net(tokens, targets=...)``, the targets
    of each batch size looked up in ``labels`` (the warm-up's batch may differ)."""

    def __init__(self, net: nn.Module, labels: dict[int, torch.Tensor]) -> None:
        super().__init__()
        self.net, self.labels = net, labels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x, targets=self.labels[x.shape[0]])


def _model_depth(name: str, net: nn.Module) -> int:
    """The depth in a CNN's name (``revnet38``: 38); a transformer's (a GPT's too) number of blocks."""
    if isinstance(net, RevViT | VisionTransformer) or model_accepts(name, "vocab_size"):
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
    compile: str | None = None, sweep: str = "depth", contexts: Sequence[int] = (),
) -> list[dict[str, Any]]:
    """The points :func:`memory_sweep` measures, in order (its arguments, without the machine's).

    A registered model runs in each of ``kinds`` that matches it: a reversible one (asked of
    the model: :func:`revnet.bench.contenders.model_kind`) in every reversible kind, a
    baseline as the baseline (``gpt`` and ``gpt-checkpoint`` for a GPT).

    ``sweep="context"`` (language models): every kind at the one depth in ``units``, at each
    of ``contexts`` tokens, each point carrying its ``context``; no named models.

    Raises:
        ValueError: an unknown sweep; a context sweep of image models, with more or fewer than
            one depth, without contexts, with a context < 1, or with named models.
    """
    if sweep not in SWEEPS:
        raise ValueError(f"sweep_plan: sweep must be one of {', '.join(SWEEPS)}, got {sweep!r}.")
    if sweep == "context":
        image = sorted({k for k in kinds if family_of(k) != "gpt"})
        if image:
            raise ValueError(f"sweep_plan: sweep='context' varies a language model's tokens; kinds {image} "
                             f"take images. Fix: GPT kinds only, or sweep='depth'.")
        if len(units) != 1 or not contexts or min(contexts) < 1 or models:
            raise ValueError(f"sweep_plan: sweep='context' needs one depth in units (got {list(units)}), "
                             f"contexts >= 1 (got {list(contexts)}) and no named models "
                             f"(got {list(models)}).")
        plan = [{"kind": k, "units": units[0], "block": block, "batch": batch, "context": c}
                for c in contexts for k in kinds]
    else:
        plan = [{"kind": k, "units": 2 * n if k == "resnet" else n, "block": block, "batch": batch}
                for n in units for k in kinds]
    for name in models:
        rev = not is_baseline(model_kind(name))
        plan += [{"kind": k, "model": name, "batch": model_batch}
                 for k in kinds if (not is_baseline(k)) == rev]
    if compile is not None:
        plan += [{**p, "compile": compile} for p in plan
                 if p["kind"] in ("revnet", "revnet-plain", "revvit", "revvit-plain", "revgpt",
                                  "revgpt-plain")]
    return plan


def memory_sweep(
    units: Sequence[int] = (1, 3, 9, 18, 36), kinds: Sequence[str] = KINDS, *,
    models: Sequence[str] = (), block: str = "basic", batch: int = 32, model_batch: int = 128,
    image_size: int = 32, device: str = "cpu", dtype: str = "float32", compile: str | None = None,
    sweep: str = "depth", context: int | None = None, contexts: Sequence[int] = (),
    embed_dim: int | None = None, num_heads: int | None = None, vocab_size: int | None = None,
    lm_loss: str = "fused", progress: Progress = None,
) -> dict[str, Any]:
    """Memory across depth (or, for language models, across context length), plus named models.

    Depths are matched: a RevNet with ``n`` units per stage (``12n+2`` layers, basic) is
    compared with a ResNet with ``2n`` units per stage (``6(2n)+2`` layers).

    Args:
        units: RevNet units per stage to sweep (the ResNet gets twice as many); transformer blocks.
            With ``sweep="context"``: the one depth of every point.
        kinds: which of :data:`KINDS` (or of one transformer family's kinds) to run.
        models: registered models to measure at ``model_batch``; RevNets run in every
            RevNet kind of ``kinds``, ResNets as ``resnet`` (likewise ViTs and GPTs).
        block: residual function of the sweep networks.
        batch: batch of the sweep points.
        compile: a torch.compile backend: every ``revnet`` and ``revnet-plain`` point is
            measured a second time under :func:`revnet.compile` (kind shown as ``KIND+compile``).
        sweep: ``"depth"`` or ``"context"`` (GPT kinds: ``contexts`` at one depth).
        context: tokens per sequence of the language models' depth sweep and named models
            (default 1024).
        contexts: the context lengths of ``sweep="context"``.
        embed_dim, num_heads, vocab_size: width of the language-model sweep networks (default
            GPT-2 small's, :data:`revnet.bench.contenders.GPT_SWEEP`).
        lm_loss: the language models' loss, ``"fused"`` or ``"logits"`` (:func:`memory_point`).
        progress: called with each finished point.

    Raises:
        ValueError: ``kinds`` mix families; the language-model arguments with image kinds.
    """
    families = {family_of(k) for k in kinds}
    if len(families) != 1:
        raise ValueError(f"memory_sweep: kinds {list(kinds)} mix families; run the CNNs, the ViTs and the "
                         f"GPTs apart.")
    family = families.pop()
    lm = family == "gpt"
    width = {k: v for k, v in (("embed_dim", embed_dim), ("num_heads", num_heads), ("vocab_size", vocab_size))
             if v is not None}
    if not lm and (context is not None or width):
        raise ValueError(f"memory_sweep: context, embed_dim, num_heads and vocab_size are for the GPT kinds; "
                         f"kinds {list(kinds)} are {family}. Fix: leave them out.")
    context = (1024 if context is None else context) if lm else None
    plan = sweep_plan(units, kinds, models=models, block=block, batch=batch, model_batch=model_batch,
                      compile=compile, sweep=sweep, contexts=contexts)
    points = []
    for p in plan:
        shape = ({"context": context, "lm_loss": lm_loss, **({} if p.get("model") else width), **p} if lm
                 else {"image_size": image_size, **p})
        points.append(measure(**shape, device=device, dtype=dtype))
        if progress is not None:
            progress(points[-1])
    config = {"family": family, "sweep": sweep, "units": list(units), "kinds": list(kinds),
              "models": list(models), "block": block, "batch": batch, "model_batch": model_batch,
              "image_size": None if lm else image_size, "device": device, "dtype": dtype, "compile": compile}
    if lm:
        config.update(context=context if sweep == "depth" else None, contexts=list(contexts or ()),
                      lm_loss=lm_loss,
                      **{**GPT_SWEEP, **width})
    return {"config": config, "points": points}
