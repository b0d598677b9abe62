"""Does storing a unit save what the planner counts (its forward time)? RevNet-164, batch 128.

Times, alternated in one process with freed memory kept (after one warm-up round): every
unit rebuilt; the units `revnet bench budget` stored at its f = 0.25 budget (read from
docs/benchmarks/budget/budget.json); as many units of the last stage, and of the first;
the stage openers alone; every unit stored. For
each set it prints the planner's predicted saving (the sum of its units' forward times), its
bytes, and the measured step time as a median ratio to all-rebuild, round by round.

    python scripts/planner_savings.py [--rounds 5]
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
from revnet.memory.measure import keep_freed_memory
from revnet.memory.planner import plan, set_stored


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--budget-json", type=Path, default=Path("docs/benchmarks/budget/budget.json"))
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
    base = times["all rebuilt"]
    print(f"{'units stored':<20} {'n':>3} {'MiB':>6} {'predicted saving ms':>20} {'step ms':>8} "
          f"{'/ all rebuilt':>13}")
    for name, stored in sets.items():
        ratio = statistics.median(a / b for a, b in zip(times[name], base, strict=True))
        print(f"{name:<20} {len(stored):>3} {sum(nbytes[n] for n in stored) / 2**20:>6.0f} "
              f"{1e3 * sum(seconds[n] for n in stored):>20.0f} {1e3 * statistics.median(times[name]):>8.0f} "
              f"{ratio:>13.3f}")


if __name__ == "__main__":
    main()
