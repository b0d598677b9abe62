"""What the kernel's page faults cost a CPU training step, with and without revnet's kept memory.

Each setting runs in a fresh process: glibc's defaults (a freed block above its mmap
threshold, at most 32 MiB, is unmapped, and the heap's top returned past twice that), and
after ``revnet.memory.measure.keep_freed_memory()`` (blocks up to 1 GiB from a heap that is never
trimmed). Per kind, the median over rounds (after one warm-up round, kinds alternated) of
the step time, the minor page faults and the system CPU time of one training step.

    python studies/page_faults.py --model revnet164 --batch 128 --out docs/benchmarks/page_faults.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

KINDS = ("revnet", "revnet-plain", "revnet-checkpoint")


def medians(rows: dict[str, list[tuple[float, int, float]]]) -> dict[str, dict[str, float]]:
    """Per kind, the medians over rounds of its (step seconds, minor faults, system seconds)."""
    return {k: {"step_s": statistics.median(v[0] for v in r),
                "minor_faults": statistics.median(v[1] for v in r),
                "system_s": statistics.median(v[2] for v in r)} for k, r in rows.items()}


def one_setting(model: str, batch: int, image_size: int, rounds: int, kept: bool) -> dict:
    import torch

    from revnet.bench.contenders import build, make_batch, run_mode, train_step
    from revnet.bench.environment import environment
    from revnet.memory.measure import keep_freed_memory

    told = keep_freed_memory() if kept else False
    torch.manual_seed(0)
    net = build("revnet", model=model)
    x, y = make_batch(net, batch, image_size)
    rows: dict[str, list[tuple[float, int, float]]] = {k: [] for k in KINDS}
    for r in range(rounds + 1):
        for kind in KINDS:
            net.zero_grad(set_to_none=True)
            with run_mode(net, kind):
                a, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
                train_step(net, x, y)
                t, b = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF)
            if r:  # the first round warms up
                rows[kind].append((t, b.ru_minflt - a.ru_minflt, b.ru_stime - a.ru_stime))
    return {"kept_memory": kept, "glibc_told": told, "threads": torch.get_num_threads(),
            "environment": environment(), "kinds": medians(rows)}


def write_results(results: list[dict], model: str, batch: int, image_size: int, rounds: int,
                  out: Path | None, command: str) -> None:
    """Prints the table of both settings' ``one_setting`` results and, if ``out`` is given,
    writes them there as JSON with the study's configuration and ``command``."""
    print(f"{model}, batch {batch}, {image_size}px: one training step, median of {rounds} rounds")
    print(f"{'memory':<9} {'kind':<18} {'step s':>7} {'minor faults':>13} {'system s':>9}")
    for r in results:
        for kind, v in r["kinds"].items():
            print(f"{'kept' if r['kept_memory'] else 'default':<9} {kind:<18} {v['step_s']:>7.2f} "
                  f"{v['minor_faults']:>13.0f} {v['system_s']:>9.2f}")
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"command": command, "model": model, "batch": batch,
                                   "image_size": image_size, "rounds": rounds, "results": results},
                                  indent=1) + "\n")
        print(f"wrote {out}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="revnet164")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--worker", choices=("default", "kept"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(one_setting(args.model, args.batch, args.image_size, args.rounds,
                                     args.worker == "kept")))
        return 0
    results = []
    for setting in ("default", "kept"):
        cmd = [sys.executable, __file__, "--model", args.model, "--batch", str(args.batch),
               "--image-size", str(args.image_size), "--rounds", str(args.rounds), "--worker", setting]
        results.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
    write_results(results, args.model, args.batch, args.image_size, args.rounds, args.out,
                  "python studies/page_faults.py " + " ".join(sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
