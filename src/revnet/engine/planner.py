"""The memory-budget planner: which blocks to store and which to rebuild, for the fastest step that fits.

Every reversible block can be rebuilt in backward (no activations kept, one extra forward
of F and G) or stored (``Coupling.stored``: ordinary autograd, its activations kept); every
recomputed unit (a RevNet's stage opener) likewise (``Recomputed.reversible``). Storing a
unit saves its forward time and costs the bytes its graph keeps. :func:`plan` measures
both per unit on an example batch, then solves the 0/1 knapsack over the units exactly (a
dynamic program over the byte budget, as Rotor/Checkmate-style planners do for chains;
Jiang et al., ECCV 2020, choose per block for reversible networks): the largest saving of
time whose bytes fit between the all-rebuild step's peak and the budget. Each candidate plan is
checked by a measured step, and the knapsack's capacity corrected by what the prediction
missed (tightened where the step did not fit, grown into the room it left where it did).

"Memory" here is the activation memory of one training step: the peak of forward, loss
and backward above what was allocated before it, each parameter gradient freed as it is
accumulated (what ``revnet bench memory`` reports). It is read from the allocator: on CUDA its
peak, on CPU its allocation and free events (:func:`revnet.engine.peak.peak_of`), which in a
fresh process agree with the resident-memory peak that ``revnet bench memory`` reads, and
unlike that, stay exact in a process whose heap earlier work has fragmented.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from .coupling import Coupling
from .peak import peak_of
from .recompute import Recomputed
from .replay import batchnorm_stats_frozen
from .reversible import ReversibleSequence
from .sizes import format_bytes, parse_bytes

__all__ = ["Plan", "PlanUnit", "plan", "plan_units", "set_stored"]

_BUCKETS = 4096  # resolution of the knapsack over the free bytes
_TRIES = 4  # measured steps of candidate plans


@dataclasses.dataclass(frozen=True)
class PlanUnit:
    """One unit the plan decides on."""

    name: str  # the module's path in the model
    kind: str  # "block" (a coupling) or "opener" (a recomputed unit)
    bytes: int  # activation bytes its graph keeps when stored
    seconds: float  # forward time of the unit: what storing it saves per step
    stored: bool  # the decision


@dataclasses.dataclass(frozen=True)
class Plan:
    """A store/rebuild decision per unit, with what it is predicted and measured to cost.

    ``minimum``: the all-rebuild step's activation peak, the least any plan needs;
    ``all_stored``: the predicted peak with every unit stored; ``predicted_peak`` and
    ``predicted_step_s``: this plan's; ``measured_peak``: one step of this plan, measured.
    """

    budget: int
    units: tuple[PlanUnit, ...]
    minimum: int
    all_stored: int
    rebuild_step_s: float
    predicted_peak: int
    predicted_step_s: float
    measured_peak: int
    batch: int

    @property
    def stored(self) -> list[str]:
        return [u.name for u in self.units if u.stored]

    def apply(self, model: nn.Module) -> nn.Module:
        """Sets every unit of ``model`` as planned (and its sequences reversible); returns it."""
        modules = dict(model.named_modules())
        missing = [u.name for u in self.units if u.name not in modules]
        if missing:
            raise ValueError(f"Plan.apply: the model has no {', '.join(missing[:3])}: a plan applies to the "
                             "model it was made for (or a copy of it).")
        set_stored(model, {u.name for u in self.units if u.stored})
        return model

    def __str__(self) -> str:
        lines = [f"memory plan: budget {format_bytes(self.budget)}; predicted peak "
                 f"{format_bytes(self.predicted_peak)} (measured {format_bytes(self.measured_peak)}), "
                 f"step {self.predicted_step_s * 1e3:.0f} ms predicted; all rebuilt "
                 f"{format_bytes(self.minimum)} / {self.rebuild_step_s * 1e3:.0f} ms, all stored "
                 f"{format_bytes(self.all_stored)}; {len(self.stored)} of {len(self.units)} units stored",
                 f"{'unit':<32} {'kind':<7} {'stored':<6} {'bytes':>10} {'forward ms':>10}"]
        lines += [f"{u.name:<32} {u.kind:<7} {'yes' if u.stored else 'no':<6} {format_bytes(u.bytes):>10} "
                  f"{u.seconds * 1e3:>10.2f}" for u in self.units]
        return "\n".join(lines)


def plan_units(model: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """``(name, kind, module)`` of what a plan decides on: couplings inside reversible
    sequences (``"block"``) and recomputed units (``"opener"``), in forward order."""
    units = []
    for name, m in model.named_modules():
        if isinstance(m, ReversibleSequence):
            units += [(f"{name}.couplings.{k}" if name else f"couplings.{k}", "block", c)
                      for k, c in enumerate(m.couplings)]
        elif isinstance(m, Recomputed):
            units.append((name, "opener", m))
    return units


def set_stored(model: nn.Module, stored: Iterable[str]) -> None:
    """Every sequence reversible; the units named in ``stored`` stored, all others rebuilt."""
    stored = set(stored)
    for m in model.modules():
        if isinstance(m, ReversibleSequence):
            m.reversible = True
    for name, kind, m in plan_units(model):
        if kind == "block":
            m.stored = name in stored
        else:
            m.reversible = name not in stored


@contextlib.contextmanager
def _kept_modes(model: nn.Module) -> Iterator[None]:
    """The model's store/rebuild switches, buffers (BatchNorm statistics), gradients and RNG
    state come back as they were."""
    buffers = [(b, b.clone()) for b in model.buffers()]
    grads = [(p, p.grad) for p in model.parameters()]
    flags = [(m, "reversible", m.reversible) for m in model.modules()
             if isinstance(m, ReversibleSequence | Recomputed)]
    flags += [(m, "stored", m.stored) for m in model.modules() if isinstance(m, Coupling)]
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        for m, attr, value in flags:
            setattr(m, attr, value)
        with torch.no_grad():
            for b, value in buffers:
                b.copy_(value)
        for p, g in grads:
            p.grad = g
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def _bytes_per_unit(model: nn.Module, inputs: torch.Tensor, units: list[tuple[str, str, nn.Module]]
                    ) -> dict[str, int]:
    """What each unit's graph keeps when stored: a forward with every unit stored, the saved
    tensors attributed to the unit running when they were saved (each storage counted once)."""
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    current: list[str] = []
    counts = {name: 0 for name, _, _ in units}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if current and ptr not in skip and ptr not in seen:
            seen.add(ptr)
            counts[current[-1]] += t.untyped_storage().nbytes()
        # Not t itself: a node that saves its own output would then hold a tensor that holds the
        # node, a cycle in C++ that Python's gc cannot break (the graph leaked, ~1 step per call).
        return t.detach()

    def enter(_m: nn.Module, _a: Any, n: str) -> None:
        current.append(n)

    def leave(_m: nn.Module, _a: Any, _o: Any) -> None:  # a hook's return value would replace the output
        current.pop()

    hooks = []
    for m, name in _watched(units):
        hooks.append(m.register_forward_pre_hook(lambda m_, a, n=name: enter(m_, a, n)))
        hooks.append(m.register_forward_hook(leave))
    set_stored(model, {name for name, _, _ in units})
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(inputs)
        del out
    finally:
        for h in hooks:
            h.remove()
    return counts


def _forward_seconds(model: nn.Module, inputs: torch.Tensor, units: list[tuple[str, str, nn.Module]],
                     repeats: int) -> dict[str, float]:
    """Median forward time of each unit (what rebuilding it costs again in backward)."""
    times: dict[str, list[float]] = {name: [] for name, _, _ in units}
    started: dict[str, float] = {}
    sync = (lambda: torch.cuda.synchronize(inputs.device)) if inputs.is_cuda else (lambda: None)

    def pre(_m: nn.Module, _a: Any, n: str) -> None:
        sync()
        started[n] = time.perf_counter()

    def post(_m: nn.Module, _a: Any, _o: Any, n: str) -> None:
        sync()
        times[n].append(time.perf_counter() - started[n])

    hooks = []
    for m, name in _watched(units):
        hooks.append(m.register_forward_pre_hook(lambda m_, a, n=name: pre(m_, a, n)))
        hooks.append(m.register_forward_hook(lambda m_, a, o, n=name: post(m_, a, o, n)))
    try:
        with torch.no_grad(), batchnorm_stats_frozen(model):
            for _ in range(repeats + 1):  # the first warms up
                model(inputs)
    finally:
        for h in hooks:
            h.remove()
    calls = {n: len(v) // (repeats + 1) for n, v in times.items()}  # F and G: two calls per forward
    per_forward = {n: [sum(v[r * calls[n]:(r + 1) * calls[n]]) for r in range(1, repeats + 1)]
                   for n, v in times.items()}
    return {n: sorted(v)[len(v) // 2] for n, v in per_forward.items()}


def _watched(units: list[tuple[str, str, nn.Module]]) -> list[tuple[nn.Module, str]]:
    """The modules whose calls make up each unit: a coupling's F and G (the engine calls the
    coupling's halves, not the coupling), a recomputed unit itself."""
    return [(m, name) for name, kind, unit in units
            for m in ((unit.f, unit.g) if kind == "block" else (unit,))]


def _solve(units: list[tuple[str, int, float]], capacity: int) -> set[str]:
    """Exact 0/1 knapsack: the units whose bytes fit ``capacity`` with the most seconds saved.

    Bytes are rounded up to buckets of ``capacity / _BUCKETS``, so a chosen set never
    exceeds the capacity.
    """
    if capacity <= 0:
        return set()
    if sum(b for _, b, _ in units) <= capacity:
        return {n for n, _, _ in units}
    size = max(1, math.ceil(capacity / _BUCKETS))
    cap = capacity // size
    weights = [math.ceil(b / size) for _, b, _ in units]
    best = [0.0] * (cap + 1)
    keep = [[False] * (cap + 1) for _ in units]
    for i, ((_, _, value), w) in enumerate(zip(units, weights, strict=True)):
        for c in range(cap, w - 1, -1):
            if best[c - w] + value > best[c]:
                best[c] = best[c - w] + value
                keep[i][c] = True
    chosen, c = set(), cap
    for i in range(len(units) - 1, -1, -1):
        if keep[i][c]:
            chosen.add(units[i][0])
            c -= weights[i]
    return chosen


def _checked(items: list[tuple[str, int, float]], capacity: int, limit: int,
             measured: Callable[[set[str]], int], seconds: dict[str, float]
             ) -> tuple[set[str] | None, int]:
    """The fastest solution, among at most ``_TRIES`` measured ones, whose measured peak fits ``limit``.

    The prediction (the all-rebuild peak plus each stored unit's bytes) is not exact: the
    rebuild's transient and the stored activations need not peak together, so it errs
    high, and a unit's bytes may share storage with its neighbour's. Each measured step
    corrects the capacity by what it missed: down by the excess where it did not fit, up
    by the room it left where it did (so a budget at plain autograd's peak stores every unit).
    """
    best: tuple[set[str] | None, int] = (None, 0)
    tried: list[set[str]] = []
    for _ in range(_TRIES):
        chosen = _solve(items, capacity)
        if chosen in tried:
            break
        tried.append(chosen)
        peak = measured(chosen)
        if peak <= limit:
            if best[0] is None or sum(map(seconds.get, chosen)) > sum(map(seconds.get, best[0])):
                best = (chosen, peak)
            if len(chosen) == len(items):
                break
        capacity += limit - peak
    return best


def _square_mean(output: torch.Tensor) -> torch.Tensor:
    return output.float().square().mean()


def plan(model: nn.Module, inputs: torch.Tensor, *, budget: int | str,
         loss_fn: Callable[[Any], torch.Tensor] | None = None, repeats: int = 3) -> Plan:
    """The fastest mix of stored and rebuilt units of ``model`` whose training step fits ``budget``.

    Profiles on ``inputs`` (one example batch, as the model takes it): the all-rebuild
    step's peak and time, each unit's stored bytes and forward time; solves exactly; then
    measures one step of the plan and tightens it until that fits. The model's switches,
    RNG state, gradients and BatchNorm statistics are left as they were; apply the result
    with :meth:`Plan.apply`.

    Args:
        model: a model holding :class:`ReversibleSequence` s (and :class:`Recomputed` units).
        inputs: an example batch.
        budget: activation bytes (an int, or a string such as ``"1.5GiB"``).
        loss_fn: ``loss_fn(output) -> scalar``; default ``output.float().square().mean()``.
        repeats: timed forwards per unit.

    Raises:
        ValueError: nothing to plan, or ``budget`` below what the all-rebuild step needs
            (the message names that minimum and the largest batch that would fit).
    """
    limit = parse_bytes(budget) if isinstance(budget, str) else int(budget)
    units = plan_units(model)
    if not units:
        raise ValueError(f"plan: {type(model).__name__} has no reversible blocks or recomputed units, so "
                         "there is nothing to plan: its step keeps every activation whatever the budget.")
    loss_fn = loss_fn or _square_mean
    device, batch = inputs.device, int(inputs.shape[0]) if inputs.dim() else 1
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        hooks = [p.register_post_accumulate_grad_hook(_drop_grad) for p in params]
        try:
            loss_fn(model(inputs)).backward()
        finally:
            for h in hooks:
                h.remove()

    def measured(stored: set[str]) -> int:
        set_stored(model, stored)
        model.zero_grad(set_to_none=True)
        return peak_of(step, device)  # on CPU from the allocator's events: the same on every call

    with _kept_modes(model):
        set_stored(model, set())
        step()  # warm-up
        model.zero_grad(set_to_none=True)
        t = time.perf_counter()
        step()  # timed outside the measurement, whose profiler costs a few percent
        rebuild_s = time.perf_counter() - t
        minimum = measured(set())
        stored_bytes = _bytes_per_unit(model, inputs, units)
        seconds = _forward_seconds(model, inputs, units, repeats)
        all_stored = minimum + sum(stored_bytes.values())
        if limit < minimum:
            fits = max(0, batch * limit // max(minimum, 1))
            raise ValueError(
                f"plan: budget {format_bytes(limit)} is below the smallest peak of this model's step, "
                f"{format_bytes(minimum)} (every unit rebuilt) at batch {batch}. Fix: a budget of at "
                f"least {format_bytes(minimum)}, or a batch of at most about {fits} (activation memory "
                "grows with the batch).")
        items = [(n, stored_bytes[n], seconds[n]) for n, _, _ in units]
        peaks = {frozenset(): minimum}

        def peak_of_plan(stored: set[str]) -> int:
            if frozenset(stored) not in peaks:
                peaks[frozenset(stored)] = measured(stored)
            return peaks[frozenset(stored)]

        chosen, peak = _checked(items, limit - minimum, limit, peak_of_plan, seconds)
        if chosen is None:
            chosen, peak = set(), minimum
    decided = tuple(PlanUnit(n, kind, stored_bytes[n], seconds[n], n in chosen) for n, kind, _ in units)
    return Plan(budget=limit, units=decided, minimum=minimum, all_stored=all_stored,
                rebuild_step_s=rebuild_s,
                predicted_peak=minimum + sum(stored_bytes[n] for n in chosen),
                predicted_step_s=max(0.0, rebuild_s - sum(seconds[n] for n in chosen)),
                measured_peak=peak, batch=batch)


def _drop_grad(p: torch.Tensor) -> None:
    p.grad = None  # post-accumulate-grad hook: gradients leave the measurement at once

