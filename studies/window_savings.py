"""What storing each unit saves, read from the windows of one step: RevNet-164, batch 128.

Times, alternated in one process with freed memory kept (after a warm-up round), a step with
every unit rebuilt and a step with every unit stored, marking where each unit's forward and
each unit's backward begins (a unit's window lasts until the next mark). A unit's saving is
its forward and backward windows rebuilt, less the same windows stored (medians over rounds);
printed per stage against what the planner counts, the units' forward times (and written as
JSON to --out if given).

    python studies/window_savings.py [--rounds 6] [--out windows.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

from revnet.bench.contenders import build, make_batch, run_mode, train_step
from revnet.engine.modes import set_stored
from revnet.engine.modes import units as engine_units
from revnet.memory.measure import keep_freed_memory
from revnet.memory.planner import forward_seconds

Windows = dict[str, dict[tuple[str, str], list[float]]]  # mode -> ("f" or "b", unit) -> seconds per round


def stage_of(name: str) -> str:
    """A unit's row: its stage, and whether it is a coupling or the stage's opener."""
    return name.split(".")[1] + (" couplings" if ".couplings." in name else " opener")


def per_stage(names: list[str], windows: Windows, forward_s: dict[str, float]) -> dict[str, dict]:
    """Per stage (and kind of unit): how many units, their summed saving (each unit's forward
    and backward windows rebuilt less the same stored, medians over rounds), their summed
    forward time (the planner's value) and the ratio of the two."""
    def med(mode: str, label: tuple[str, str]) -> float:
        return statistics.median(windows[mode][label])

    per: dict[str, dict] = {}
    for n in names:
        row = per.setdefault(stage_of(n), {"units": 0, "window_saving_s": 0.0, "forward_s": 0.0})
        row["window_saving_s"] += sum(med("rebuilt", (p, n)) - med("stored", (p, n)) for p in ("f", "b"))
        row["forward_s"] += forward_s[n]
        row["units"] += 1
    for row in per.values():
        row["ratio"] = row["window_saving_s"] / row["forward_s"]
    return dict(sorted(per.items()))


def write_results(result: dict, out: Path | None) -> None:
    """Prints the steps' medians and the per-stage table; writes ``result`` as JSON to ``out`` if given.
    ``result``: ``rounds``, ``step_s`` (per mode, seconds per round) and ``stages`` (``per_stage``)."""
    steps = result["step_s"]
    print(f"step: all rebuilt {statistics.median(steps['rebuilt']):.3f} s, all stored "
          f"{statistics.median(steps['stored']):.3f} s (medians of {result['rounds']})")
    print(f"{'stage':<14} {'units':>5} {'window saving ms':>17} {'forward time ms':>16} {'ratio':>6}")
    for stage, r in result["stages"].items():
        print(f"{stage:<14} {r['units']:>5} {r['window_saving_s'] * 1e3:>17.0f} "
              f"{r['forward_s'] * 1e3:>16.0f} {r['ratio']:>6.2f}")
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--out", type=Path, help="JSON file to write")
    args = ap.parse_args()
    keep_freed_memory()
    torch.manual_seed(0)
    net = build("revnet", model="revnet164")
    x, y = make_batch(net, 128, 32)
    units = engine_units(net)
    names = [n for n, _, _ in units]
    forward_s = forward_seconds(net, x, units, 3)
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
    windows: Windows = {m: defaultdict(list) for m in ("rebuilt", "stored")}
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
    write_results({"rounds": args.rounds, "step_s": steps, "stages": per_stage(names, windows, forward_s)},
                  args.out)


if __name__ == "__main__":
    main()
