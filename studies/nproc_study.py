"""One process with every core's threads, or one one-thread process per core? Measured on the recipes.

``revnet train --nproc auto`` (the default) decides by a rule; this study is what the rule rests on.
For each recipe it runs ``revnet train --recipe R --steps S`` alternately with ``--nproc 1`` (one
process, torch's threads on every core) and ``--nproc N`` (N one-thread processes, DDP over gloo),
``--rounds`` times each, and reads from each run's ``summary.json`` the training rate (images/s over
the training steps alone, as ``revnet train`` prints it) and from the clock the whole command
(start-up, the precision probe, evaluation, process launch). It prints per recipe the medians and
the ratio N processes / one process, and writes them with ``--out``.

    python studies/nproc_study.py [--recipes fashion-mnist fashion-mnist-vit] [--steps 150] \\
        [--rounds 2] [--nproc 2] [--out docs/benchmarks/nproc_study.json]

Run it with nothing else on the machine (PyTorch threads busy-wait).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from revnet.bench.environment import environment


def run_once(recipe: str, steps: int, nproc: int, out: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    cmd = [sys.executable, "-m", "revnet", "train", "--recipe", recipe, "--steps", str(steps),
           "--nproc", str(nproc), "--out", str(out), "--no-memory-report", "--eval-every", str(steps)]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    summary = json.loads((out / "summary.json").read_text())
    rate = summary.get("images_per_s") or summary.get("tokens_per_s")
    return {"nproc": nproc, "rate": rate, "wall_s": wall, "train_s": summary["wall_seconds"],
            "amp": summary["config"]["amp"], "world_size": summary["world_size"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", nargs="+", default=["fashion-mnist", "fashion-mnist-vit"])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--nproc", type=int, default=os.cpu_count() or 2)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in args.recipes:
            runs = []
            for r in range(args.rounds):
                order = (1, args.nproc) if r % 2 == 0 else (args.nproc, 1)  # alternated: drift cancels
                for n in order:
                    runs.append(run_once(recipe, args.steps, n, Path(tmp) / f"{recipe}-{n}-{r}"))
                    print(f"{recipe} nproc {n}: {runs[-1]['rate']:.0f}/s, {runs[-1]['train_s']:.1f} s "
                          f"training, {runs[-1]['wall_s']:.1f} s whole", flush=True)
            one = [x for x in runs if x["nproc"] == 1]
            many = [x for x in runs if x["nproc"] == args.nproc]
            med = {k: {n: statistics.median(x[k] for x in xs) for n, xs in ((1, one), (args.nproc, many))}
                   for k in ("rate", "wall_s", "train_s")}
            rows.append({"recipe": recipe, "steps": args.steps, "rounds": args.rounds, "nproc": args.nproc,
                         "amp": one[0]["amp"], "rate_1": med["rate"][1], "rate_n": med["rate"][args.nproc],
                         "speedup": med["rate"][args.nproc] / med["rate"][1],
                         "wall_1": med["wall_s"][1], "wall_n": med["wall_s"][args.nproc],
                         "overhead_1": med["wall_s"][1] - med["train_s"][1],
                         "overhead_n": med["wall_s"][args.nproc] - med["train_s"][args.nproc], "runs": runs})
    env = environment()
    for r in rows:
        r["date"], r["cpu"] = env["date"], env["cpu"]
    print(f"\n{env['cpu']}, {env['cpu_count']} cores, torch {env['torch']}, {args.steps} steps, "
          f"medians of {args.rounds}")
    n = args.nproc
    print(f"| recipe | precision | 1 process | {n} one-thread processes | ratio | outside training, 1 / {n} "
          "|")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['recipe']} | {r['amp']} | {r['rate_1']:.0f}/s | {r['rate_n']:.0f}/s | "
              f"{r['speedup']:.2f}x | {r['overhead_1']:.1f} s / {r['overhead_n']:.1f} s |")
    if args.out:  # rows of other recipes already in the file are kept (one recipe rerun at a time)
        kept = json.loads(args.out.read_text())["rows"] if args.out.is_file() else []
        rows = [r for r in kept if r["recipe"] not in args.recipes] + rows
        args.out.write_text(json.dumps({"environment": env, "rows": rows}, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
