"""Does storing a unit save what the planner counts (its forward time)? RevNet-164, batch 128.

Times, alternated in one process with freed memory kept (after one warm-up round): every
unit rebuilt; the units `revnet bench budget` stored at its f = 0.25 budget (read from
docs/benchmarks/budget/budget.json); as many units of the last stage, and of the first;
the stage openers alone; every unit stored. For
each set it prints the planner's predicted saving (the sum of its units' forward times), its
bytes, and the measured step time as a median ratio to all-rebuild, round by round (and
writes them as JSON to --out if given).

    python studies/planner_savings.py [--rounds 5] [--out savings.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from revnet.bench.contenders import build, make_batch, run_mode, train_step
from revnet.engine.modes import set_stored
from revnet.memory.measure import keep_freed_memory
from revnet.memory.planner import plan


def summarize(sets: dict[str, list[str]], times: dict[str, list[float]], seconds: dict[str, float],
              nbytes: dict[str, int]) -> list[dict]:
    """One row per set of stored units: how many, their bytes, the planner's predicted saving
    (the sum of their forward times), the median step time, and the median over rounds of the
    step's ratio to the all-rebuild step of the same round (``times["all rebuilt"]``)."""
    base = times["all rebuilt"]
    return [{"set": name, "units": len(stored), "bytes": sum(nbytes[n] for n in stored),
             "predicted_saving_s": sum(seconds[n] for n in stored),
             "median_step_s": statistics.median(times[name]),
             "ratio_to_all_rebuilt": statistics.median(a / b for a, b in zip(times[name], base, strict=True)),
             "stored": list(stored)} for name, stored in sets.items()]


def write_results(rows: list[dict], out: Path | None) -> None:
    """Prints ``summarize``'s rows as a table and, if ``out`` is given, writes them there as JSON."""
    print(f"{'units stored':<20} {'n':>3} {'MiB':>6} {'predicted saving ms':>20} {'step ms':>8} "
          f"{'/ all rebuilt':>13}")
    for r in rows:
        print(f"{r['set']:<20} {r['units']:>3} {r['bytes'] / 2**20:>6.0f} "
              f"{1e3 * r['predicted_saving_s']:>20.0f} {1e3 * r['median_step_s']:>8.0f} "
              f"{r['ratio_to_all_rebuilt']:>13.3f}")
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"rows": rows}, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--budget-json", type=Path, default=Path("docs/benchmarks/budget/budget.json"))
    ap.add_argument("--out", type=Path, help="JSON file to write")
    args = ap.parse_args()
    keep_freed_memory()
    torch.manual_seed(0)
    net = build("revnet", model="revnet164")
    x, y = make_batch(net, 128, 32)
    units = plan(net, x, budget=2**62, loss_fn=lambda o: F.cross_entropy(o, y)).units
    seconds, nbytes = {u.name: u.seconds for u in units}, {u.name: u.bytes for u in units}
    openers = [u.name for u in units if u.kind == "opener"]
    runs = json.loads(args.budget_json.read_text())["runs"]
    run = next(r for r in runs if r["config"]["model"] == "revnet164")
    planned = run["points"]["plan@0.25"]["stored"]
    sets = {"all rebuilt": [], "plan@0.25's units": planned,
            "last stage's units": [n for n in seconds if n.startswith("stages.2")][:len(planned)],
            "first stage's units": [n for n in seconds if n.startswith("stages.0")][:len(planned)],
            "stage openers": openers,
            "all stored": list(seconds)}
    times: dict[str, list[float]] = {k: [] for k in sets}
    with run_mode(net, "revnet"):
        for r in range(args.rounds + 1):
            for name, stored in sets.items():
                set_stored(net, stored)
                net.zero_grad(set_to_none=True)
                t = time.perf_counter()
                train_step(net, x, y)
                if r:
                    times[name].append(time.perf_counter() - t)
    write_results(summarize(sets, times, seconds, nbytes), args.out)


if __name__ == "__main__":
    main()
