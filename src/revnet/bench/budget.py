"""The speed/memory frontier of the planner: step time against activation memory, per budget.

For one RevNet, :func:`revnet.plan` is asked for budgets spread between the all-rebuild
step's peak and the all-stored one. Each resulting configuration's activation memory is
measured in a fresh process (as ``revnet bench memory``), and the step times of all of them,
with all-rebuild (``revnet``), all-stored (``revnet-plain``) and per-block
``torch.utils.checkpoint`` (``revnet-checkpoint``), alternated in one process on the same
weights (as ``revnet bench speed``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..engine.modes import set_stored
from ..memory import plan
from .contenders import Progress, build, make_batch, run_mode, sync, time_stats, train_step
from .memory import measure

__all__ = ["budget_frontier", "frontier_checks"]


def budget_frontier(
    model: str = "revnet110", *, batch: int = 128, image_size: int = 32,
    fractions: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0), repeats: int = 5, warmup: int = 1,
    device: str = "cpu", seed: int = 0, progress: Progress = None,
) -> dict[str, Any]:
    """Plans at budgets ``minimum + f * (all_stored - minimum)`` for each ``f`` in ``fractions``.

    Returns:
        ``points``: per configuration (``plan@f`` and the three references) its stored units,
        the plan's budget and predicted peak, the measured activation bytes (fresh process)
        and step time; ``plan_s``: what planning took.
    """
    torch.manual_seed(seed)
    net = build("revnet", model=model, device=device)
    x, y = make_batch(net, batch, image_size)

    def loss(out: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, y)

    t = time.perf_counter()
    first = plan(net, x, budget=2**62, loss_fn=loss)
    plan_s = time.perf_counter() - t
    configs: dict[str, dict[str, Any]] = {}
    for f in fractions:
        budget = int(first.minimum + f * (first.all_stored - first.minimum))
        try:
            p = plan(net, x, budget=max(budget, first.minimum), loss_fn=loss)
        except ValueError:  # the minimum measured again came out above this budget: nothing fits
            configs[f"plan@{f:g}"] = {"kind": "revnet", "stored": [], "budget": budget,
                                      "predicted_peak": first.minimum, "measured_peak_in_plan": None}
            continue
        configs[f"plan@{f:g}"] = {"kind": "revnet", "stored": p.stored, "budget": p.budget,
                                  "predicted_peak": p.predicted_peak,
                                  "measured_peak_in_plan": p.measured_peak}
    for kind in ("revnet", "revnet-plain", "revnet-checkpoint"):
        configs[kind] = {"kind": kind, "stored": []}
    for name, c in configs.items():
        point = measure(kind=c["kind"], model=model, batch=batch, image_size=image_size, device=device,
                        stored=c["stored"])
        c["activation_bytes"] = point["activation_bytes"]
        if progress is not None:
            progress({"config": name, **point})

    def timed(c: dict[str, Any]) -> float:
        net.zero_grad(set_to_none=True)
        with run_mode(net, c["kind"]):
            if c["kind"] == "revnet":  # every time: the flags of the configuration timed before go
                set_stored(net, c["stored"])
            sync(device)
            start = time.perf_counter()
            train_step(net, x, y)
            sync(device)
            return time.perf_counter() - start

    names = list(configs)
    for name in names:
        for _ in range(warmup):
            timed(configs[name])
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(timed(configs[name]))
    set_stored(net, [])
    for name, c in configs.items():
        c.update(time_stats(times[name], batch))
        c["vs_rebuild"] = statistics.median(a / b for a, b in zip(times[name], times["revnet"], strict=True))
    config = {"model": model, "batch": batch, "image_size": image_size, "fractions": list(fractions),
              "repeats": repeats, "warmup": warmup, "device": device, "threads": torch.get_num_threads(),
              "seed": seed, "minimum": first.minimum, "all_stored": first.all_stored}
    return {"config": config, "points": configs, "plan_s": plan_s, "units": len(first.units)}


def frontier_checks(result: dict[str, Any]) -> dict[str, Any]:
    """The planner's targets, from one :func:`budget_frontier` result (None where not measured).

    - ``stored_vs_plain``: step time of the plan at the all-stored budget / plain autograd's;
    - ``minimum_vs_rebuild``: the plan at the all-rebuild minimum / all-rebuild; these two
      as the median of the ratios within each round of the alternation (the two steps of a
      round ran seconds apart; the machine's drift between rounds cancels);
    - ``over_budget``: plans between the ends whose measured activation memory exceeds their
      budget, by how many bytes;
    - ``line_excess``: for each plan between the ends, its step time over the straight line from
      all-rebuild to all-stored (time against measured memory) less 1, as the median over the
      rounds of the alternation of each round's excess over that round's line (drift between
      rounds cancels, as in the ratios above), with the rounds' quartiles: ``(median, q25, q75)``;
    - ``above_line``: those whose median excess is above 0, by it;
    - ``vs_checkpoint``: the frontier's step time at checkpoint-per-block's memory (linear
      between the neighbouring plans; None when no plan uses as little) / checkpoint's time;
    - ``plan_steps``: planning time in all-rebuild steps.
    """
    pts = result["points"]
    rebuild, plain, ckpt = pts["revnet"], pts["revnet-plain"], pts["revnet-checkpoint"]
    plans = {n: p for n, p in pts.items() if n.startswith("plan@")}
    by_f = sorted(plans.items(), key=lambda kv: float(kv[0].split("@")[1]))
    lo_name, lo = by_f[0]
    hi_name, hi = by_f[-1]
    t0 = rebuild["median_s"]

    between = dict(by_f[1:-1])  # the targets' "every budget between" the two ends
    excess = {n: _line_excess(p, rebuild, plain) for n, p in between.items()}
    above = {n: e[0] for n, e in excess.items() if e[0] > 0}
    frontier = sorted((p["activation_bytes"], p["median_s"]) for p in plans.values())
    at_ckpt = None
    for (xa, ta), (xb, tb) in zip(frontier, frontier[1:], strict=False):
        if xa <= ckpt["activation_bytes"] <= xb:
            share = (ckpt["activation_bytes"] - xa) / (xb - xa) if xb != xa else 0.0
            at_ckpt = ta + (tb - ta) * share
            break
    return {
        "stored_vs_plain": _paired(hi, plain) if float(hi_name.split("@")[1]) >= 1 else None,
        "minimum_vs_rebuild": _paired(lo, rebuild) if float(lo_name.split("@")[1]) <= 0 else None,
        "over_budget": {n: p["activation_bytes"] - p["budget"] for n, p in between.items()
                        if p.get("budget") is not None and p["activation_bytes"] > p["budget"]},
        "line_excess": excess,
        "above_line": above,
        "vs_checkpoint": None if at_ckpt is None else at_ckpt / ckpt["median_s"],
        "plan_steps": result["plan_s"] / t0,
    }


def _line_excess(p: dict[str, Any], rebuild: dict[str, Any], plain: dict[str, Any]
                 ) -> tuple[float, float, float]:
    """``p``'s step time over the all-rebuild/all-stored line at its memory, less 1: the median and
    quartiles over rounds, each round against its own two ends (the medians' alone without rounds)."""
    x0, x1 = rebuild["activation_bytes"], plain["activation_bytes"]
    share = (p["activation_bytes"] - x0) / (x1 - x0) if x1 != x0 else 0.0
    ta, t0, t1 = p.get("times_s"), rebuild.get("times_s"), plain.get("times_s")
    if not (ta and t0 and t1 and len(ta) == len(t0) == len(t1)):
        ta, t0, t1 = [p["median_s"]], [rebuild["median_s"]], [plain["median_s"]]
    per_round = [t / (a + (b - a) * share) - 1 for t, a, b in zip(ta, t0, t1, strict=True)]
    if len(per_round) < 2:
        return per_round[0], per_round[0], per_round[0]
    q25, _, q75 = statistics.quantiles(per_round, n=4, method="inclusive")
    return statistics.median(per_round), q25, q75


def _paired(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Median of ``a``'s step time over ``b``'s, round by round (medians' ratio without rounds)."""
    ta, tb = a.get("times_s"), b.get("times_s")
    if not ta or not tb or len(ta) != len(tb):
        return a["median_s"] / b["median_s"]
    return statistics.median(x / y for x, y in zip(ta, tb, strict=True))
