"""The optimizer step inside backward against the usual step: peak memory and step time, side by side.

For each model, two copies with the same weights train on the same batches: ``usual`` (backward,
then ``optimizer.step()`` and ``zero_grad``) and ``in_backward`` (``revnet.optimizer_in_backward``:
each parameter stepped as its gradient completes). Step times alternate between the two (one step
of each per round, the order flipped every round) and the medians are compared; the peak of one
step above what was allocated before it comes from the CPU allocator
(``revnet.memory.measure.peak_of``), after a first step that creates the optimizer state in both.

    python studies/optimizer_in_backward.py [--models revnet38 revvit_mini stack] [--batch 64] \\
        [--rounds 15] [--out docs/benchmarks/optimizer_in_backward.json]

Time it on a quiet machine: PyTorch's threads busy-wait, and anything else running moves the ratio.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import revnet
from revnet.bench.environment import environment
from revnet.memory.measure import peak_of

MiB = 2**20


def build(name: str) -> torch.nn.Module:
    """A zoo model for 28x28 single-channel images, or ``stack``: eight 512-wide additive couplings
    between a linear stem and head, a model whose parameters outweigh its activations."""
    torch.manual_seed(0)
    if name == "stack":
        lin = torch.nn.Linear
        couplings = [revnet.AdditiveCoupling(lin(512, 512), lin(512, 512), dim=-1) for _ in range(8)]
        return torch.nn.Sequential(torch.nn.Flatten(), lin(784, 1024), revnet.ReversibleSequence(couplings),
                                   lin(1024, 10))
    if name.startswith(("vit", "revvit")):
        return revnet.create_model(name, num_classes=10, in_chans=1, img_size=28)
    return revnet.create_model(name, num_classes=10, in_chans=1)


def measure(name: str, batch: int, rounds: int) -> dict:
    usual_model = build(name)
    inb_model = copy.deepcopy(usual_model)
    make = lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.05)  # noqa: E731
    usual_opt = make(list(usual_model.parameters()))
    revnet.optimizer_in_backward(inb_model, make)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)

    def usual() -> None:
        F.cross_entropy(usual_model(x), y).backward()
        usual_opt.step()
        usual_opt.zero_grad(set_to_none=True)

    def in_backward() -> None:
        F.cross_entropy(inb_model(x), y).backward()

    for step in (usual, in_backward):
        step()  # optimizer state exists from here on
    peaks = {"usual": peak_of(usual, x.device), "in_backward": peak_of(in_backward, x.device)}
    times: dict[str, list[float]] = {"usual": [], "in_backward": []}
    for r in range(rounds):
        order = [("usual", usual), ("in_backward", in_backward)]
        for label, step in order if r % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            step()
            times[label].append(time.perf_counter() - start)
    grads = sum(p.numel() * p.element_size() for p in usual_model.parameters())
    med = {k: statistics.median(v) for k, v in times.items()}
    row = {"model": name, "batch": batch, "rounds": rounds, "params_mib": round(grads / MiB, 2),
           "peak_usual_mib": round(peaks["usual"] / MiB, 2),
           "peak_in_backward_mib": round(peaks["in_backward"] / MiB, 2),
           "step_usual_s": round(med["usual"], 4), "step_in_backward_s": round(med["in_backward"], 4),
           "time_ratio": round(med["in_backward"] / med["usual"], 3)}
    print(json.dumps(row), flush=True)
    return row


def table(result: dict) -> str:
    lines = ["| model | batch | gradients | step peak: usual | step peak: in backward | less | step: usual | "
             "step: in backward | ratio |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        less = r["peak_usual_mib"] - r["peak_in_backward_mib"]
        lines.append(f"| {r['model']} | {r['batch']} | {r['params_mib']:.1f} MiB | "
                     f"{r['peak_usual_mib']:.1f} MiB | "
                     f"{r['peak_in_backward_mib']:.1f} MiB | {less:.1f} MiB | "
                     f"{1000 * r['step_usual_s']:.0f} ms | {1000 * r['step_in_backward_s']:.0f} ms | "
                     f"{r['time_ratio']:.3f}x |")
    env = result["environment"]
    rounds = result["rows"][0]["rounds"]
    lines += ["", f"Measured by `{result['command']}` on {env.get('cpu', '?')} ({env.get('date', '?')}, "
                  f"commit {env.get('git_commit', '?')}); medians of {rounds} alternating steps each."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["revnet38", "revvit_mini"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", type=Path, help="write the rows and the table (JSON) here")
    args = parser.parse_args(argv)
    rows = [measure(m, args.batch, args.rounds) for m in args.models]
    given = argv if argv is not None else sys.argv[1:]
    result = {"environment": environment(),
              "command": " ".join(["python", "studies/optimizer_in_backward.py", *given]), "rows": rows}
    print(table(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({**result, "table": table(result)}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
