"""Numerical fidelity of reversible backprop: reconstruction error, gradient angle, drift guard.

Rebuilding activations in floating point is not exact: ``(x + F(x2)) - F(x2)`` need not
equal ``x``, and the error compounds over depth. Gomez et al. (2017, Sec. 6) tracked the
angle between the reversible gradient and the true one during training and saw no
instability. This module measures both for a running model:

- :func:`roundtrip` / :func:`reconstruction_error`: a sequence's input rebuilt from its
  output, block by block as the engine does it, against the stored input;
- :func:`gradient_angle`: on one batch, the angle between the gradient of reversible
  backprop and that of plain autograd on the same weights, whole model and per stage;
- :class:`DriftGuard`: every few steps, the rebuild error of each reversible sequence on
  the real batch; past a threshold it warns, or switches that sequence to exact mode
  (:func:`revnet.set_exact`) or to stored activations (``seq.reversible = False``).

Every check leaves the training state as it found it: parameters, BatchNorm buffers,
RNG streams, ``.grad`` and the ``reversible`` flags.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .coupling import Coupling, merge, set_exact, split
from .replay import get_rng, set_rng
from .reversible import ReversibleSequence, set_reversible

__all__ = [
    "DRIFT_ACTIONS", "DriftGuard", "gradient_angle", "preserved_state", "reconstruction_error",
    "roundtrip", "sequence_inputs", "stage_of",
]

log = logging.getLogger(__name__)

DRIFT_ACTIONS = ("warn", "exact", "store")


# --------------------------------------------------------------------------------------
# Rebuilding a sequence's input
# --------------------------------------------------------------------------------------

def roundtrip(
    couplings: Sequence[Coupling], x: torch.Tensor, dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs ``x`` through ``couplings`` and rebuilds it from the output, as the engine does.

    Each block's inverse recomputes F and G under the RNG state of its forward (so
    dropout masks match) and BatchNorm normalises with batch statistics (train mode), as
    in the reversible backward; call it under the caller's autocast to replay that too.
    Under autocast a bf16/fp16 ``x`` becomes a float32 stream first, as
    :class:`ReversibleSequence` does. Runs without grad.

    Returns:
        ``(y, x_rebuilt)``: the output and the input rebuilt from it.
    """
    devices = [x.device] if x.is_cuda else []
    if x.dtype in (torch.bfloat16, torch.float16) and torch.is_autocast_enabled(x.device.type):
        x = x.float()  # the engine's stream under autocast (ReversibleSequence.forward)
    with torch.no_grad():
        x1, x2 = split(x, dim)
        states = []
        for c in couplings:
            rng_f = get_rng(devices)
            y1 = c.couple(x1, c.run_f(x1, x2))
            rng_g = get_rng(devices)
            x2 = c.couple(x2, c.run_g(x2, y1))
            x1 = y1
            states.append((rng_f, rng_g))
        y = merge(x1, x2, dim)
        for c, (rng_f, rng_g) in zip(reversed(couplings), reversed(states), strict=True):
            set_rng(rng_g, devices)
            x2 = c.decouple(x2, c.run_g(x2, x1))
            set_rng(rng_f, devices)
            x1 = c.decouple(x1, c.run_f(x1, x2))
        return y, merge(x1, x2, dim)


def reconstruction_error(x: torch.Tensor, rebuilt: torch.Tensor) -> dict[str, float]:
    """``max_abs_error`` = max |rebuilt - x|, ``rel_error`` = that / max |x|, and ``input_max``
    = max |x| (in float64)."""
    x, rebuilt = x.detach().double(), rebuilt.detach().double()
    err = (rebuilt - x).abs().max().item() if x.numel() else 0.0
    scale = x.abs().max().item() if x.numel() else 0.0
    return {"max_abs_error": err, "rel_error": err / scale if scale else err, "input_max": scale}


# --------------------------------------------------------------------------------------
# Leaving the training state as it was
# --------------------------------------------------------------------------------------

@contextlib.contextmanager
def preserved_state(module: nn.Module) -> Iterator[Callable[[], None]]:
    """Saves the RNG streams (CPU, and CUDA of ``module``'s device) and every buffer; restores them.

    Yields a function that restores the saved state on demand (to run a second pass from
    the same state); the state is restored again on exit.
    """
    first = next(iter(module.parameters()), None)
    devices = [first.device] if first is not None and first.is_cuda else []
    rng = get_rng(devices)
    buffers = [(b, b.detach().clone()) for b in module.buffers()]

    def restore() -> None:
        set_rng(rng, devices)
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)

    try:
        yield restore
    finally:
        restore()


def _unwrap(model: nn.Module) -> nn.Module:
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
    net = _unwrap(model)
    named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("gradient_angle: the model has no trainable parameters.")
    params = [p for _, p in named]
    # Every flag set_reversible may flip (sequences, and any unit with its own ``reversible``).
    flags = [(m, m.reversible) for m in net.modules() if isinstance(getattr(m, "reversible", None), bool)]
    grads: list[list[torch.Tensor]] = []
    try:
        with preserved_state(net) as restore:
            for plain in (False, True):
                restore()
                if plain:
                    set_reversible(net, False)
                loss = loss_fn(net)
                got = torch.autograd.grad(loss, params, allow_unused=True)
                grads.append([torch.zeros_like(p) if g is None else g.detach() for g, p in zip(got, params,
                                                                                             strict=True)])
    finally:
        for m, flag in flags:
            m.reversible = flag
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


# --------------------------------------------------------------------------------------
# Drift guard
# --------------------------------------------------------------------------------------

def sequence_inputs(model: nn.Module, forward: Callable[[nn.Module], Any]) -> dict[str, torch.Tensor]:
    """The input each :class:`ReversibleSequence` of ``model`` receives in ``forward(model)``.

    The forward runs without grad; buffers and RNG streams are restored afterwards.
    """
    net = _unwrap(model)
    seen: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_pre_hook(lambda _m, args, n=name: seen.__setitem__(n, args[0].detach()))
               for name, m in net.named_modules() if isinstance(m, ReversibleSequence)]
    try:
        with torch.no_grad(), preserved_state(net):
            forward(net)
    finally:
        for h in handles:
            h.remove()
    return seen


class DriftGuard:
    """Every check, rebuilds each reversible sequence's input on the real batch and compares.

    Args:
        threshold: largest tolerated ``rel_error`` (max |rebuilt - stored| / max |stored|).
            The default 0.1 flags a rebuild that has lost the signal's leading digit: far
            above float32 (~1e-6 per block), passed by a bf16 stream within about 8 blocks
            and by deep stacks under bf16 autocast (docs/FIDELITY.md).
        action: past the threshold, ``"warn"`` (log only), ``"exact"`` (switch that
            sequence's couplings to exact mode, whose rebuild is bit-exact) or ``"store"``
            (``seq.reversible = False``: store its activations from then on).

    Under torch.distributed the errors are reduced (max) over processes first, so every
    process takes the same action and the replicas stay identical.
    """

    def __init__(self, threshold: float = 0.1, action: str = "warn") -> None:
        if not (isinstance(threshold, int | float) and math.isfinite(threshold) and threshold > 0):
            raise ValueError(f"DriftGuard: threshold must be a positive number, got {threshold!r}.")
        if action not in DRIFT_ACTIONS:
            raise ValueError(f"DriftGuard: action must be one of {DRIFT_ACTIONS}, got {action!r}.")
        self.threshold = float(threshold)
        self.action = action

    def check(self, model: nn.Module, forward: Callable[[nn.Module], Any], step: int) -> list[dict[str, Any]]:
        """Measures every reversible sequence, acts on those past the threshold.

        Args:
            model: the model being trained.
            forward: runs the model on the current batch (``lambda m: m(x)``); call
                ``check`` under the training autocast so the rebuild sees the same precision.
            step: the training step, for the rows.

        Returns:
            Rows for metrics.jsonl: one ``{"step", "drift": {sequence: rel_error},
            "drift_max_abs": {...}, "drift_input_max": {...}}`` line (``drift_input_max``:
            the largest |activation| entering the sequence, against exact mode's range),
            then one ``{"event": "drift", ...}`` line per sequence past the threshold.
        """
        net = _unwrap(model)
        inputs = sequence_inputs(net, forward)
        seqs = dict(net.named_modules())
        errors: dict[str, dict[str, float]] = {}
        with preserved_state(net):
            for name, x in inputs.items():
                seq = seqs[name]
                if not seq.reversible:  # activations stored: nothing is rebuilt
                    continue
                _, rebuilt = roundtrip(list(seq.couplings), x, seq.dim)
                # Against the input as the first block takes it (exact mode rounds it onto its
                # lattice on entry): what the backward must get back.
                errors[name] = reconstruction_error(seq.couplings[0].entry(x), rebuilt)
        errors = _reduce_max(errors)
        rows: list[dict[str, Any]] = [{
            "step": step, "drift": {n: e["rel_error"] for n, e in errors.items()},
            "drift_max_abs": {n: e["max_abs_error"] for n, e in errors.items()},
            "drift_input_max": {n: e["input_max"] for n, e in errors.items()}}]
        for name, e in errors.items():
            if not e["rel_error"] > self.threshold:
                continue
            seq = seqs[name]
            if self.action == "exact":
                set_exact(seq, True, prefix=name)
            elif self.action == "store":
                seq.reversible = False
            log.warning("step %d: drift guard: %s rebuilds its input with relative error %.3g (max abs "
                        "%.3g) > %.3g; action: %s", step, name, e["rel_error"], e["max_abs_error"],
                        self.threshold, self.action)
            rows.append({"step": step, "event": "drift", "sequence": name, **e,
                         "threshold": self.threshold, "action": self.action})
        return rows


def _reduce_max(errors: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or not errors:
        return errors
    names = sorted(errors)
    keys = ("max_abs_error", "rel_error", "input_max")
    flat = torch.tensor([[errors[n][k] for k in keys] for n in names], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        flat = flat.cuda()
    dist.all_reduce(flat, op=dist.ReduceOp.MAX)
    rows = flat.tolist()
    return {n: dict(zip(keys, map(float, row), strict=True)) for n, row in zip(names, rows, strict=True)}
