"""Measure what reversibility saves on your own model: one training step, reversible vs plain.

    python examples/measure_memory.py [--blocks 8 16 32] [--batch 64]

Uses the project's own measurement, ``revnet.bench.memory.step_memory``: the peak memory
of one training step above the level before it (on CPU the peak resident set, on CUDA
the allocator's peak), with each parameter gradient freed as it arrives, so the figure is
activations and workspace. ``saved`` cross-checks it with the bytes the autograd graph
keeps for backward. For figures to publish, run each point in a fresh process, as
``revnet bench memory`` does.
"""

import argparse

import torch
from torch import nn

import revnet
from revnet.bench.memory import step_memory
from revnet.memory.sizes import format_bytes


def my_block(channels: int) -> nn.Module:
    return nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1))


def my_model(blocks: int, width: int = 64) -> nn.Module:
    """Your model: any nn.Module holding ReversibleSequences (here: stem, blocks, head)."""
    half = width // 2
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        revnet.ReversibleSequence([revnet.AdditiveCoupling(my_block(half), my_block(half))
                                   for _ in range(blocks)]),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=32, help="image height and width")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    print(f"{'blocks':>6}  {'reversible':>12}  {'plain autograd':>14}  {'saved (rev / plain)':>21}  ratio")
    for blocks in args.blocks:
        model = my_model(blocks).to(device)
        result = {}
        for reversible in (True, False):
            revnet.set_reversible(model, reversible)
            result[reversible] = step_memory(model, x)  # default loss: output.float().square().mean()
        rev, plain = result[True], result[False]
        print(f"{blocks:>6}  {format_bytes(rev['activation_bytes']):>12}  "
              f"{format_bytes(plain['activation_bytes']):>14}  "
              f"{format_bytes(rev['saved_bytes']):>9} / {format_bytes(plain['saved_bytes']):>9}  "
              f"{plain['activation_bytes'] / max(rev['activation_bytes'], 1):.1f}x")


if __name__ == "__main__":
    main()
