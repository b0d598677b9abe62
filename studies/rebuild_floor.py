"""The least a step that rebuilds every block can cost against plain autograd, measured.

Rebuilding (the paper's Algorithm 1) runs every reversible block and recomputed unit forward
once more, so no engine can step faster than plain autograd's step plus those units' forward
time. This script times, alternated in one process on the same weights: plain autograd's step
(forward, cross-entropy, backward), the reversible step, and the units' forward without a
graph (the planner's per-unit timing, summed). It prints per configuration

    floor = (plain + units' forward) / plain     the best any all-rebuild engine can do here
    measured = reversible / plain                what revnet's engine does
    engine = reversible / (plain + units' forward)   what the engine adds over the floor

as medians of the per-round ratios. The README's and BENCHMARKS.md's speed targets (for
example reversible <= 1.25x plain) are below the floor where ``floor`` exceeds them.

    python studies/rebuild_floor.py [--rounds 7] [--models revgpt_mini ...] \
        [--out docs/benchmarks/rebuild_floor.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from revnet.bench.contenders import build, make_batch, make_tokens, run_mode
from revnet.bench.environment import environment
from revnet.engine import modes
from revnet.memory.measure import keep_freed_memory
from revnet.memory.planner import forward_seconds

# (kind, model, batch, image size (a language model: context length), channels_last, autocast dtype)
CONFIGS = [
    ("revnet", "revnet38", 128, 32, False, None),
    ("revnet", "revnet38", 128, 32, True, None),
    ("revnet", "revnet38", 128, 28, True, "bf16"),  # the main job's step (but 3 input channels)
    ("revnet", "revnet164", 32, 32, False, None),
    ("revvit", "revvit_base", 8, 224, False, None),
    ("revgpt", "revgpt_mini", 32, 128, False, None),  # revnet train --recipe text-lm's step
    ("revgpt", "revgpt_mini", 32, 128, False, "bf16"),
    ("revgpt", "revgpt2_small", 1, 512, False, None),
]
QUICK = [("revnet", "revnet38", 16, 16, False, None), ("revvit", "revvit_small", 2, 32, False, None),
         ("revgpt", "revgpt_mini", 2, 16, False, None)]


def ratios(times: dict[str, list[float]]) -> dict[str, float]:
    """``floor``, ``measured`` and ``engine`` (medians of each round's ratio) and plain autograd's
    median step, from per-round seconds of ``plain``, ``reversible`` and ``units_forward``."""
    rows = list(zip(times["plain"], times["reversible"], times["units_forward"], strict=True))
    return {
        "floor": statistics.median((p + u) / p for p, _, u in rows),
        "measured": statistics.median(rv / p for p, rv, _ in rows),
        "engine": statistics.median(rv / (p + u) for p, rv, u in rows),
        "plain_s": statistics.median(times["plain"]),
    }


def measure(kind: str, model: str, batch: int, size: int, channels_last: bool, amp: str | None,
            rounds: int) -> dict:
    torch.manual_seed(0)
    lm = kind == "revgpt"
    net = build(kind, model=model, image_size=size if kind == "revvit" else None,
                context=size if lm else None)
    x, y = make_tokens(net, batch, size) if lm else make_batch(net, batch, size, channels_last=channels_last)
    units = modes.units(net)

    def cast() -> contextlib.AbstractContextManager:
        return torch.autocast("cpu", dtype=torch.bfloat16) if amp == "bf16" else contextlib.nullcontext()

    def step(mode: str) -> float:
        net.zero_grad(set_to_none=True)
        with run_mode(net, mode):
            start = time.perf_counter()
            with cast():  # a language model's loss as revnet train computes it (no logits kept)
                loss = net(x, targets=y) if lm else torch.nn.functional.cross_entropy(net(x).float(), y)
            loss.backward()
            return time.perf_counter() - start

    def units_forward() -> float:
        with cast():
            return sum(forward_seconds(net, x, units, 1).values())

    times: dict[str, list[float]] = {"plain": [], "reversible": [], "units_forward": []}
    for r in range(rounds + 1):  # the first round warms up
        got = {"plain": step(f"{kind}-plain"), "reversible": step(kind), "units_forward": units_forward()}
        if r:
            for k, v in got.items():
                times[k].append(v)
    return {"kind": kind, "model": model, "batch": batch, "image_size": size, "channels_last": channels_last,
            "amp": amp or "none", "units": len(units), "times_s": times, **ratios(times)}


def row(r: dict) -> str:
    """One configuration's line of the printed table."""
    layout = "channels_last" if r["channels_last"] else "contiguous"
    return (f"{r['model']:<12} {r['batch']:>5} {r['image_size']:>4} {layout:<14} {r['amp']:<5} "
            f"{r['plain_s']:>8.3f} {r['floor']:>6.3f} {r['measured']:>9.3f} {r['engine']:>7.3f}")


def write_results(results: list[dict], rounds: int, out: Path, command: str) -> None:
    """Writes ``measure``'s results to ``out`` as JSON, with ``command``, the environment and ``rounds``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": command, "environment": environment(), "rounds": rounds,
                               "results": results}, indent=1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="two tiny configurations, seconds")
    ap.add_argument("--out", type=Path, help="JSON file to write")
    ap.add_argument("--models", nargs="+", metavar="MODEL", help="only the configurations of these models")
    args = ap.parse_args(argv)
    keep_freed_memory()
    results = []
    print(f"{'model':<12} {'batch':>5} {'px':>4} {'layout':<14} {'amp':<5} {'plain s':>8} "
          f"{'floor':>6} {'measured':>9} {'engine':>7}")
    for cfg in QUICK if args.quick else CONFIGS:
        if args.models and cfg[1] not in args.models:
            continue
        r = measure(*cfg, rounds=args.rounds)
        results.append(r)
        print(row(r), flush=True)
    if args.out:
        given = sys.argv[1:] if argv is None else argv
        write_results(results, args.rounds, args.out, " ".join(["python", "studies/rebuild_floor.py",
                                                                *given]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
