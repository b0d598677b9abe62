"""The memory-budget planner: which blocks to store and which to rebuild, for the fastest step that fits.

Every reversible block can be rebuilt in backward (no activations kept, one extra forward
of F and G) or stored (``Coupling.stored``: ordinary autograd, its activations kept); every
recomputed unit (a RevNet's stage opener) likewise (``Recomputed.reversible``). Storing a
unit saves its forward time and costs the bytes its graph keeps, from its forward until its
backward. :func:`plan` measures, on an example batch, each unit's stored bytes and forward
time, and where the all-rebuild step's memory peaks: the peak in each unit's forward and in
each unit's backward. A unit stored adds its bytes to every moment between its forward and
its backward, so the units stored in the stage of the step that peaks cost memory, and those
stored where the step is below its peak, often the last stage, may cost none. The solver is
an exact dynamic program over the chain (as Rotor/Checkmate-style planners solve
checkpointing; Jiang et al., ECCV 2020, choose per block for reversible networks): units in
forward order, the bytes stored so far as its state, each moment's peak (its all-rebuild
peak plus what is stored before it) within the budget. Each candidate plan is checked by a
measured step, and the budget the solver sees corrected by what the prediction missed.

"Memory" here is the activation memory of one training step: the peak of forward, loss
and backward above what was allocated before it, each parameter gradient freed as it is
accumulated (what ``revnet bench memory`` reports). It is read from the allocator: on CUDA its
peak, on CPU its allocation and free events (:func:`revnet.memory.measure.peak_of`), which in a
fresh process agree with the resident-memory peak that ``revnet bench memory`` reads, and
unlike that, stay exact in a process whose heap earlier work has fragmented.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..engine import modes
from ..engine.replay import batchnorm_stats_frozen
from .measure import peak_of, window_peaks_of
from .sizes import format_bytes, parse_bytes

__all__ = ["Plan", "PlanUnit", "forward_seconds", "plan", "unit_parts"]

_BUCKETS = 4096  # resolution of the dynamic program over the stored bytes
_TRIES = 4  # measured steps of candidate plans
_MIN = ("min", "minimum")  # budget: the all-rebuild step's peak (store what costs no memory)


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
        modes.set_stored(model, {u.name for u in self.units if u.stored})
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


def _bytes_per_unit(model: nn.Module, inputs: torch.Tensor, units: list[tuple[str, str, nn.Module]]
                    ) -> dict[str, tuple[int, int, int]]:
    """What each unit's graph keeps when stored, the most of that one of its branches (F or G)
    keeps, and the bytes of the half of the stream a coupling's F takes (0 for other units):
    a forward with every unit stored, the saved tensors attributed to the module running
    when they were saved (each storage counted once per branch: a tensor two branches save, such
    as one's output that the next takes in, counts in both, as each alone stored would keep it).

    The graph keeps none of them (there is no backward): each branch's saved tensors are let go
    when it returns, so the pass needs the memory of one branch's graph, not of all of them
    (a model planned for a budget below plain autograd's peak would not fit otherwise).
    """
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    held: list[torch.Tensor] = []  # the running branch's saved tensors, alive while it runs
    current: list[tuple[str, int]] = []
    counts = {name: [0, 0] for name, _, _ in units}
    halves = {name: 0 for name, _, _ in units}

    def pack(t: torch.Tensor) -> None:
        ptr = t.untyped_storage().data_ptr()
        if current and ptr not in skip and ptr not in seen:
            seen.add(ptr)
            held.append(t)
            name, part = current[-1]
            counts[name][part] += t.untyped_storage().nbytes()

    def enter(_m: nn.Module, args: Any, key: tuple[str, int], half: bool) -> None:
        current.append(key)
        if half and args and isinstance(args[0], torch.Tensor):
            x = args[0]  # under autocast, the float32 half cast to the autocast dtype (Coupling._run)
            cast = torch.is_autocast_enabled(x.device.type) and x.dtype == torch.get_autocast_dtype(
                x.device.type)
            halves[key[0]] = x.numel() * (4 if cast else x.element_size())

    def leave(_m: nn.Module, _a: Any, _o: Any) -> None:  # a hook's return value would replace the output
        seen.clear()  # the branch's saved tensors are freed now: a later one may take their address
        held.clear()
        current.pop()

    blocks = {name for name, kind, _ in units if kind == "block"}
    hooks = []
    for m, name, part in unit_parts(units):
        hooks.append(m.register_forward_pre_hook(
            lambda m_, a, k=(name, part), h=(name in blocks and part == 0): enter(m_, a, k, h)))
        hooks.append(m.register_forward_hook(leave))
    modes.set_stored(model, {name for name, _, _ in units})
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda _: None):
            out = model(inputs)
        del out
    finally:
        held.clear()
        for h in hooks:
            h.remove()
    return {name: (sum(c), max(c), halves[name]) for name, c in counts.items()}


def forward_seconds(model: nn.Module, inputs: torch.Tensor, units: list[modes.Unit],
                    repeats: int = 3) -> dict[str, float]:
    """Median forward time of each unit: what rebuilding it costs again in backward.

    The value :func:`plan` gives a unit when it decides whether to store it (``PlanUnit.seconds``).
    Runs ``repeats + 1`` forwards of ``model`` on ``inputs`` without a graph (the first warms
    up) with BatchNorm's running statistics frozen, timing each unit's calls (a coupling's F and
    G together, which the engine calls rather than the coupling); on CUDA each call is
    synchronised. Under an autocast context, the units run under it.

    Example:
        >>> import torch, revnet
        >>> from revnet.engine.modes import units
        >>> from revnet.memory.planner import forward_seconds
        >>> model = revnet.create_model("revnet38")
        >>> seconds = forward_seconds(model, torch.randn(8, 3, 32, 32), units(model), repeats=1)
        >>> sorted(seconds) == sorted(name for name, _, _ in units(model))
        True

    Args:
        model: the model holding the units.
        inputs: a batch, as the model takes it.
        units: the units to time, as :func:`revnet.engine.modes.units` lists them (or some
            of them: only those listed are timed).
        repeats: timed forwards; each unit's time is the median over them.

    Returns:
        Seconds per unit path, for one forward of ``model``.
    """
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
    for m, name, _ in unit_parts(units):
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


def unit_parts(units: list[tuple[str, str, nn.Module]]) -> list[tuple[nn.Module, str, int]]:
    """The modules whose calls make up each unit, with their part: a coupling's F (0) and G (1)
    (the engine calls the coupling's halves, not the coupling), a recomputed unit itself (0)."""
    return [(m, name, part) for name, kind, unit in units
            for part, m in enumerate((unit.f, unit.g) if kind == "block" else (unit,))]


@dataclasses.dataclass(frozen=True)
class _Item:
    """A unit as the solver sees it (bytes and seconds as measured; peaks of the all-rebuild step)."""

    name: str
    bytes: int  # what its graph keeps when stored
    extra: int  # what storing it adds at its own backward over its rebuild's transient (F and G at once)
    forward: int  # the all-rebuild step's peak from this unit's forward to the next unit's
    backward: int  # ... from this unit's backward to the next one's (the unit before it)
    seconds: float  # forward time: what storing it saves
    # Kept besides, stored after a rebuilt unit: the chain before it keeps its output for the
    # rebuild to restart from, the half its graph does not hold (a coupling after a coupling).
    entry: int = 0


def _predicted_peak(items: list[_Item], stored: set[str], floor: int = 0) -> int:
    """The step's peak with ``stored`` stored: at each moment the all-rebuild peak, plus the bytes
    of the units stored before it (kept from their forward to their backward)."""
    peak, kept, before = floor, 0, False
    for it in items:
        s = it.name in stored
        entry = it.entry if s and not before else 0
        peak = max(peak, it.forward + kept + (it.bytes + entry if s else 0),
                   it.backward + kept + (it.extra + entry if s else 0))
        kept += it.bytes + entry if s else 0
        before = s
    return peak


def _windows(units: list[tuple[str, str, nn.Module]], step: Callable[[], None], device: torch.device
             ) -> tuple[int, dict[str, tuple[int, int]]]:
    """The all-rebuild step's peak, and per unit its peaks in forward and in backward.

    A unit's forward starts where F (or the recomputed unit) runs without a graph, its
    backward where G (or the unit) runs again with one. Where the calls do not come as a
    chain's do (each unit's forward in order, then each backward in reverse), every window
    gets the whole step's peak: each stored unit then counts as kept through the peak.
    """
    names = [name for name, _, _ in units]
    mark: list[Callable[[str], None]] = [lambda _n: None]  # window_peaks_of's, once it runs

    def pre(_m: nn.Module, _a: Any, name: str, first: bool) -> None:
        graph = torch.is_grad_enabled()
        if graph != first:  # forward: the first part without a graph; backward: the last part with one
            mark[0](("b:" if graph else "f:") + name)

    hooks = []
    for name, kind, unit in units:
        first, last = (unit.f, unit.g) if kind == "block" else (unit, unit)
        hooks.append(first.register_forward_pre_hook(lambda m_, a, n=name: pre(m_, a, n, True)))
        hooks.append(last.register_forward_pre_hook(lambda m_, a, n=name: pre(m_, a, n, False)))

    def work(m: Callable[[str], None]) -> None:
        mark[0] = m
        step()

    try:
        windows = window_peaks_of(work, device)
    finally:
        for h in hooks:
            h.remove()
    peak = max(p for _, p in windows)
    expected = [f"f:{n}" for n in names] + [f"b:{n}" for n in reversed(names)]
    if [n for n, _ in windows[1:]] != expected:
        return peak, {n: (peak, peak) for n in names}
    found = dict(windows[1:])
    return peak, {n: (found[f"f:{n}"], found[f"b:{n}"]) for n in names}


def _solve(items: list[_Item], limit: int) -> set[str]:
    """Exact: the units whose storing saves the most seconds with :func:`_predicted_peak` within
    ``limit``. A dynamic program over the chain whose state is the bytes stored so far, rounded
    up to buckets of ``limit / _BUCKETS`` (so a chosen set never exceeds the limit), and whether
    the unit before was stored."""
    if limit <= 0:
        return set()
    size = max(1, math.ceil(limit / _BUCKETS))
    # (buckets kept, unit before stored) -> (seconds saved, units stored): the best so far
    states: dict[tuple[int, bool], tuple[float, tuple[str, ...]]] = {(0, False): (0.0, ())}
    for it in items:
        nxt: dict[tuple[int, bool], tuple[float, tuple[str, ...]]] = {}
        for (at, before), (value, chosen) in states.items():
            kept = at * size
            options = []
            if max(it.forward, it.backward) + kept <= limit:  # rebuilt
                options.append(((at, False), value, chosen))
            entry = 0 if before else it.entry
            w = math.ceil((it.bytes + entry) / size)
            if (max(it.forward + it.bytes + entry, it.backward + it.extra + entry) + kept <= limit
                    and (at + w) * size <= limit):  # stored
                options.append(((at + w, True), value + it.seconds, (*chosen, it.name)))
            for key, v, c in options:
                if key not in nxt or v > nxt[key][0]:
                    nxt[key] = (v, c)
        states = nxt
    if not states:
        return set()
    return set(max(states.values(), key=lambda v: v[0])[1])


def _checked(items: list[_Item], limit: int, measured: Callable[[set[str]], int]
             ) -> tuple[set[str] | None, int]:
    """The fastest solution, among at most ``_TRIES`` measured ones, whose measured peak fits ``limit``.

    The prediction is not exact (a stored unit's graph and the step's transients need not
    peak together, and neighbouring units may share storage), so each measured step corrects
    the limit the solver sees by what the prediction missed: lower where the step needed more
    than predicted, higher where it needed less (so a budget at plain autograd's peak stores
    every unit).
    """
    best: tuple[set[str] | None, int] = (None, 0)
    tried: list[set[str]] = []
    target = limit
    value = {it.name: it.seconds for it in items}
    for _ in range(_TRIES):
        chosen = _solve(items, target)
        if chosen in tried:
            break
        tried.append(chosen)
        peak = measured(chosen)
        if peak <= limit:
            if best[0] is None or sum(map(value.get, chosen)) > sum(map(value.get, best[0])):
                best = (chosen, peak)
            if len(chosen) == len(items):
                break
        target = limit - (peak - _predicted_peak(items, chosen))
    return best


def _same_sequence(a: tuple[str, str, nn.Module], b: tuple[str, str, nn.Module]) -> bool:
    """Whether units ``a`` and ``b`` are couplings of one :class:`ReversibleSequence`."""
    return a[1] == b[1] == "block" and a[0].rsplit(".", 1)[0] == b[0].rsplit(".", 1)[0]


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
        budget: activation bytes (an int, or a string such as ``"1.5GiB"``), or ``"min"``: the
            all-rebuild step's peak, so that only what costs no memory at the peak is stored.
        loss_fn: ``loss_fn(output) -> scalar``; default ``output.float().square().mean()``.
        repeats: timed forwards per unit.

    Raises:
        ValueError: nothing to plan, or ``budget`` below what the all-rebuild step needs
            (the message names that minimum and the largest batch that would fit).
    """
    lowest = isinstance(budget, str) and budget.strip().lower() in _MIN
    limit = 0 if lowest else parse_bytes(budget) if isinstance(budget, str) else int(budget)
    units = modes.units(model)
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
        modes.set_stored(model, stored)
        model.zero_grad(set_to_none=True)
        return peak_of(step, device)  # on CPU from the allocator's events: the same on every call

    with modes.kept_state(model):
        modes.set_stored(model, set())
        step()  # warm-up
        model.zero_grad(set_to_none=True)
        t = time.perf_counter()
        step()  # timed outside the measurement, whose profiler costs a few percent
        rebuild_s = time.perf_counter() - t
        model.zero_grad(set_to_none=True)
        minimum, windows = _windows(units, step, device)
        limit = minimum if lowest else limit
        stored_bytes = _bytes_per_unit(model, inputs, units)
        seconds = forward_seconds(model, inputs, units, repeats)
        items = [_Item(n, b, b - branch, *windows[n], seconds[n],
                       entry=half if i and _same_sequence(units[i - 1], units[i]) else 0)
                 for i, (n, (b, branch, half)) in enumerate((n, stored_bytes[n]) for n, _, _ in units)]
        if limit < minimum:
            fits = max(0, batch * limit // max(minimum, 1))
            raise ValueError(
                f"plan: budget {format_bytes(limit)} is below the smallest peak of this model's step, "
                f"{format_bytes(minimum)} (every unit rebuilt) at batch {batch}. Fix: a budget of at "
                f"least {format_bytes(minimum)} (or \"min\"), or a batch of at most about {fits} (activation "
                "memory grows with the batch).")
        peaks = {frozenset(): minimum}

        def peak_of_plan(stored: set[str]) -> int:
            if frozenset(stored) not in peaks:
                peaks[frozenset(stored)] = measured(stored)
            return peaks[frozenset(stored)]

        chosen, peak = _checked(items, limit, peak_of_plan)
        if chosen is None:
            chosen, peak = set(), minimum
    decided = tuple(PlanUnit(it.name, kind, it.bytes, it.seconds, it.name in chosen)
                    for it, (_, kind, _) in zip(items, units, strict=True))
    return Plan(budget=limit, units=decided, minimum=minimum,
                all_stored=_predicted_peak(items, {it.name for it in items}, minimum),
                rebuild_step_s=rebuild_s,
                predicted_peak=_predicted_peak(items, chosen, minimum),
                predicted_step_s=max(0.0, rebuild_s - sum(it.seconds for it in items if it.name in chosen)),
                measured_peak=peak, batch=batch)


def _drop_grad(p: torch.Tensor) -> None:
    p.grad = None  # post-accumulate-grad hook: gradients leave the measurement at once

