"""The plan at budget "min" against every unit rebuilt: the same peak, how much faster a step?

The main job's setting by default (RevNet-38, Fashion-MNIST's 1x28x28 images, batch 128,
channels_last, bf16 autocast, cross-entropy): plans with ``revnet.plan(..., budget="min")``,
then measures the activation peak of one step of each (the allocator's, as the planner reads
it) and times them alternated in one process with freed memory kept, after a warm-up round.
Prints, and writes as JSON, the plan, both peaks and the step-time ratio (median over rounds
of each round's ratio).

    python studies/min_plan.py [--model revnet38] [--batch 128] [--amp bf16] [--rounds 7]
        [--out docs/benchmarks/min_plan.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import revnet
from revnet.bench.environment import environment
from revnet.engine.modes import set_stored
from revnet.memory.measure import keep_freed_memory, peak_of
from revnet.training.precision import autocast


def summarize(peaks: dict[str, int], times: dict[str, list[float]]) -> dict:
    """Both configurations' peaks, their median step times, and the ratio plan / all rebuilt as
    the median of each round's ratio. ``times``: per configuration, one step's seconds per round."""
    ratio = statistics.median(a / b for a, b in zip(times["plan at min"], times["all rebuilt"], strict=True))
    return {"peak_bytes": peaks, "median_step_s": {k: statistics.median(v) for k, v in times.items()},
            "times_s": times, "ratio_plan_to_rebuild": ratio}


def write_results(result: dict, out: Path | None) -> None:
    """Prints the result's lines and, if ``out`` is given, writes the result there as JSON."""
    for name, peak in result["peak_bytes"].items():
        step_ms = result["median_step_s"][name] * 1e3
        print(f"{name:<12} peak {peak / 2**20:7.1f} MiB  step {step_ms:6.0f} ms")
    print(f"plan at min / all rebuilt, round by round: {result['ratio_plan_to_rebuild']:.3f} "
          f"({len(result['stored'])} of {result['units']} units stored; planning {result['plan_s']:.1f} s)")
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="revnet38")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--image-size", type=int, default=28)
    ap.add_argument("--in-chans", type=int, default=1)
    ap.add_argument("--amp", default="bf16", choices=["none", "bf16"])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per configuration and round")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    keep_freed_memory()
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    net = revnet.create_model(args.model, num_classes=10, in_chans=args.in_chans)
    net = net.to(memory_format=torch.channels_last)
    x = torch.randn(args.batch, args.in_chans, args.image_size, args.image_size)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch,))

    def loss(out: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.float(), y)

    t = time.perf_counter()
    with autocast(cpu, args.amp):
        p = revnet.plan(net, x, budget="min", loss_fn=loss)
    plan_s = time.perf_counter() - t
    print(p)

    def step() -> None:
        with autocast(cpu, args.amp):
            out = net(x)
        loss(out).backward()
        net.zero_grad(set_to_none=True)

    configs = {"all rebuilt": set(), "plan at min": set(p.stored)}
    peaks = {}
    for name, stored in configs.items():
        set_stored(net, stored)
        step()
        peaks[name] = peak_of(step, cpu)
    times: dict[str, list[float]] = {name: [] for name in configs}
    for r in range(args.rounds + 1):  # round 0 warms up
        for name, stored in configs.items():
            set_stored(net, stored)
            t = time.perf_counter()
            for _ in range(args.steps):
                step()
            if r:
                times[name].append((time.perf_counter() - t) / args.steps)
    result = {
        "model": args.model, "batch": args.batch, "image_size": args.image_size, "amp": args.amp,
        "stored": p.stored, "units": len(p.units), "plan_s": plan_s,
        **summarize(peaks, times), "rounds": args.rounds, "environment": environment(),
    }
    write_results(result, args.out)


if __name__ == "__main__":
    main()
