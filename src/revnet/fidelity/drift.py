"""Reconstruction error of a running model, and the drift guard that acts on it.

Rebuilding activations in floating point is not exact: ``(x + F(x2)) - F(x2)`` need not
equal ``x``, and the error compounds over depth.

- :func:`roundtrip` / :func:`reconstruction_error`: a sequence's input rebuilt from its
  output, block by block as the engine does it, against the stored input;
- :class:`DriftGuard`: every few steps, the rebuild error of each reversible sequence on
  the real batch; past a threshold it warns, or switches that sequence to exact mode
  (:func:`revnet.set_exact`) or to stored activations (``seq.reversible = False``).

Every check leaves the training state as it found it: parameters, BatchNorm buffers,
RNG streams, ``.grad`` and the ``reversible`` flags.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..engine import Coupling, ReversibleSequence
from ..engine.context import NO_CONTEXT, Context
from ..engine.coupling import halves, merge
from ..engine.exact import Tape
from ..engine.modes import kept_state, set_exact
from ..engine.replay import Replay
from .angle import unwrap

__all__ = ["DRIFT_ACTIONS", "DriftGuard", "reconstruction_error", "roundtrip", "sequence_inputs"]

log = logging.getLogger(__name__)

DRIFT_ACTIONS = ("warn", "exact", "store")


# --------------------------------------------------------------------------------------
# Rebuilding a sequence's input
# --------------------------------------------------------------------------------------

def roundtrip(
    couplings: Sequence[Coupling], x: torch.Tensor, dim: int = 1, context: Context = NO_CONTEXT
) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs ``x`` through ``couplings`` and rebuilds it from the output, as the engine does.

    Each block's inverse recomputes F and G under the RNG state of its forward (so
    dropout masks match) and BatchNorm normalises with batch statistics (train mode), as
    in the reversible backward; call it under the caller's autocast to replay that too.
    Under autocast a bf16/fp16 ``x`` becomes a float32 stream first, as
    :class:`ReversibleSequence` does. ``context`` holds the sequence call's extra arguments
    (masks, encoder states: :func:`sequence_inputs` records them). Runs without grad.

    Returns:
        ``(y, x_rebuilt)``: the output and the input rebuilt from it.
    """
    if x.dtype in (torch.bfloat16, torch.float16) and torch.is_autocast_enabled(x.device.type):
        x = x.float()  # the engine's stream under autocast (ReversibleSequence.forward)
    tape = Tape()  # what exact mode's scalings lose, for their rebuild
    with torch.no_grad():
        x1, x2 = halves(x, dim)
        replays = []
        for c in couplings:
            replay = Replay(x1, keep_rng=True)
            replay.mark()
            y1 = c.apply_couple("f", x1, c.run_f(x1, x2, context), tape)
            replay.mark()
            x2 = c.apply_couple("g", x2, c.run_g(x2, y1, context), tape)
            x1 = y1
            replays.append(replay)
        y = merge(x1, x2, dim)
        for c, replay in zip(reversed(couplings), reversed(replays), strict=True):
            replay.rewind(1)
            x2 = c.apply_decouple("g", x2, c.run_g(x2, x1, context), tape)
            replay.rewind(0)
            x1 = c.apply_decouple("f", x1, c.run_f(x1, x2, context), tape)
        return y, merge(x1, x2, dim)


def reconstruction_error(x: torch.Tensor, rebuilt: torch.Tensor) -> dict[str, float]:
    """``max_abs_error`` = max |rebuilt - x|, ``rel_error`` = that / max |x|, and ``input_max``
    = max |x| (in float64)."""
    x, rebuilt = x.detach().double(), rebuilt.detach().double()
    err = (rebuilt - x).abs().max().item() if x.numel() else 0.0
    scale = x.abs().max().item() if x.numel() else 0.0
    return {"max_abs_error": err, "rel_error": err / scale if scale else err, "input_max": scale}


# --------------------------------------------------------------------------------------
# Drift guard
# --------------------------------------------------------------------------------------

def sequence_inputs(model: nn.Module, forward: Callable[[nn.Module], Any], *,
                    contexts: dict[str, Context] | None = None) -> dict[str, torch.Tensor]:
    """The input each :class:`ReversibleSequence` of ``model`` receives in ``forward(model)``.

    The forward runs without grad; buffers and RNG streams are restored afterwards. The extra
    arguments of each call (masks, encoder states) go into ``contexts``, when given.
    """
    net = unwrap(model)
    seen: dict[str, torch.Tensor] = {}

    def record(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], name: str) -> None:
        seen[name] = args[0].detach()
        if contexts is not None:
            contexts[name] = Context(args[1:], kwargs)

    handles = [m.register_forward_pre_hook(functools.partial(record, name=name), with_kwargs=True)
               for name, m in net.named_modules() if isinstance(m, ReversibleSequence)]
    try:
        with torch.no_grad(), kept_state(net):
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
        net = unwrap(model)
        contexts: dict[str, Context] = {}
        inputs = sequence_inputs(net, forward, contexts=contexts)
        seqs = dict(net.named_modules())
        errors: dict[str, dict[str, float]] = {}
        with kept_state(net):
            for name, x in inputs.items():
                seq = seqs[name]
                if not seq.reversible:  # activations stored: nothing is rebuilt
                    continue
                _, rebuilt = roundtrip(list(seq.couplings), x, seq.dim, contexts[name])
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
            action = self.action
            if action == "exact" and set_exact(seq, True, prefix=name) == 0:
                # No coupling of this sequence has an exact mode (affine couplings): its
                # activations are stored instead, which cannot drift.
                action = "store (its couplings have no exact mode)"
            if action.startswith("store"):
                seq.reversible = False
            log.warning("step %d: drift guard: %s rebuilds its input with relative error %.3g (max abs "
                        "%.3g) > %.3g; action: %s", step, name, e["rel_error"], e["max_abs_error"],
                        self.threshold, action)
            rows.append({"step": step, "event": "drift", "sequence": name, **e,
                         "threshold": self.threshold, "action": action})
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
