"""What storing each unit saves, read from the windows of one step: RevNet-164, batch 128.

Times, alternated in one process with freed memory kept (after a warm-up round), a step with
every unit rebuilt and a step with every unit stored, marking where each unit's forward and
each unit's backward begins (a unit's window lasts until the next mark). A unit's saving is
its forward and backward windows rebuilt, less the same windows stored (medians over rounds);
printed per stage against what the planner counts, the units' forward times.

    python scripts/window_savings.py [--rounds 6]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch

from revnet.bench.contenders import build, make_batch, run_mode, train_step
from revnet.memory.measure import keep_freed_memory
from revnet.memory.planner import _forward_seconds, plan_units, set_stored


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
    keep_freed_memory()
    torch.manual_seed(0)
    net = build("revnet", model="revnet164")
    x, y = make_batch(net, 128, 32)
    units = plan_units(net)
    names = [n for n, _, _ in units]
    forward_s = _forward_seconds(net, x, units, 3)
    marks: list[tuple[float, tuple[str, str]]] = []
    stored = [False]

    def mark(label: tuple[str, str]) -> None:
        marks.append((time.perf_counter(), label))

    def on_output(out: object, name: str) -> None:  # a stored unit's backward begins at its output's grad
        if stored[0] and isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(lambda _g: mark(("b", name)))

    for name, kind, unit in units:
        first, last = (unit.f, unit.g) if kind == "block" else (unit, unit)
        # Forward: F (or the unit) called; rebuilt, without a graph. Backward, rebuilt: G (or the
        # unit) called again with one.
        first.register_forward_pre_hook(
            lambda _m, _a, n=name: mark(("f", n)) if stored[0] or not torch.is_grad_enabled() else None)
        last.register_forward_pre_hook(
            lambda _m, _a, n=name: mark(("b", n)) if torch.is_grad_enabled() and not stored[0] else None)
        last.register_forward_hook(lambda _m, _a, out, n=name: on_output(out, n))
    windows: dict[str, dict[tuple[str, str], list[float]]] = {
        m: defaultdict(list) for m in ("rebuilt", "stored")}
    steps: dict[str, list[float]] = {"rebuilt": [], "stored": []}
    with run_mode(net, "revnet"):
        for r in range(args.rounds + 1):
            for mode in ("rebuilt", "stored"):
                stored[0] = mode == "stored"
                set_stored(net, names if stored[0] else [])
                net.zero_grad(set_to_none=True)
                marks.clear()
                t0 = time.perf_counter()
                train_step(net, x, y)
                t1 = time.perf_counter()
                if not r:
                    continue
                steps[mode].append(t1 - t0)
                for (t, label), (t_next, _) in zip(marks, [*marks[1:], (t1, ("end", ""))], strict=True):
                    windows[mode][label].append(t_next - t)

    def med(mode: str, label: tuple[str, str]) -> float:
        return statistics.median(windows[mode][label])

    per: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
    for n in names:
        stage = n.split(".")[1] + (" couplings" if ".couplings." in n else " opener")
        saving = sum(med("rebuilt", (p, n)) - med("stored", (p, n)) for p in ("f", "b"))
        per[stage][0] += saving
        per[stage][1] += forward_s[n]
        per[stage][2] += 1
    print(f"step: all rebuilt {statistics.median(steps['rebuilt']):.3f} s, all stored "
          f"{statistics.median(steps['stored']):.3f} s (medians of {args.rounds})")
    print(f"{'stage':<14} {'units':>5} {'window saving ms':>17} {'forward time ms':>16} {'ratio':>6}")
    for stage, (saving, fwd, count) in sorted(per.items()):
        print(f"{stage:<14} {count:>5} {saving * 1e3:>17.0f} {fwd * 1e3:>16.0f} {saving / fwd:>6.2f}")


if __name__ == "__main__":
    main()
