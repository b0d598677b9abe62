"""Worker for tests/engine/test_fsdp_blocks.py, started by torchrun with 2 processes on CPU (gloo).

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/engine/_fsdp_worker.py OUT

For each model (float64): ``fully_shard`` on every coupling of every ReversibleSequence, then on the
root; 5 AdamW steps on each rank's half of a global batch; the full weights and gradients written
to OUT for the test to compare with one process at the whole batch.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import revnet
from revnet.engine.modes import set_stored


def build(kind: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if kind.startswith("revnet38"):
        group = functools.partial(nn.GroupNorm, 4)  # no cross-sample statistics: ranks see half a batch
        dtype = torch.float32 if kind.endswith("bf16") else torch.float64
        model = revnet.create_model("revnet38", num_classes=10, norm_layer=group, dtype=dtype)
        model = model.to(memory_format=torch.contiguous_format)  # FSDP2 needs contiguous parameters
        if kind == "revnet38_stored":
            seqs = [m for m in model.modules() if isinstance(m, revnet.ReversibleSequence)]
            set_stored(model, [])
            for s in seqs:
                s[1].stored = True
        x = torch.randn(5, 8, 3, 8, 8, dtype=dtype, generator=g)
        y = torch.randint(0, 10, (5, 8), generator=g)
    elif kind == "revvit_mini":
        model = revnet.create_model("revvit_mini", num_classes=10, in_chans=1, img_size=8, patch_size=4,
                                    embed_dim=32, depth=2, num_heads=4, drop_path_rate=0.0).double()
        model.eval()  # its convolutional stem's BatchNorm: running statistics, none across samples
        x = torch.randn(5, 8, 1, 8, 8, dtype=torch.float64, generator=g)
        y = torch.randint(0, 10, (5, 8), generator=g)
    else:  # revgpt_mini, revgpt_mini_in_backward
        model = revnet.create_model("revgpt_mini", vocab_size=32, context_length=8, embed_dim=32, depth=2,
                                    num_heads=4, dtype=torch.float64)
        x = torch.randint(0, 32, (5, 8, 8), generator=g)
        y = torch.randint(0, 32, (5, 8, 8), generator=g)
    return model, x, y


def loss_of(kind: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if kind.startswith("revgpt_mini"):
        return model(x, targets=y)
    return nn.functional.cross_entropy(model(x), y)


def train(kind: str, sharded: bool) -> dict[str, torch.Tensor]:
    model, xs, ys = build(kind)
    rank, world = (dist.get_rank(), dist.get_world_size()) if sharded else (0, 1)
    if sharded:
        # Mixed precision on the blocks (bf16 parameters and branch compute, float32 reduction); the
        # root (stem, head) in float32, so the residual stream stays float32.
        policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                  if kind.endswith("bf16") else MixedPrecisionPolicy())
        for seq in [m for m in model.modules() if isinstance(m, revnet.ReversibleSequence)]:
            for block in seq:
                fully_shard(block, mp_policy=policy)
        fully_shard(model)
    make = lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.05)  # noqa: E731
    in_backward = kind.endswith("in_backward") and sharded  # stepped in backward, after each reduce-scatter
    opt = revnet.optimizer_in_backward(model, make) if in_backward else make(model.parameters())
    per = xs.shape[1] // world
    steps = 1 if kind.endswith("bf16") else xs.shape[0]  # bf16: one step's gradients, before weights drift
    for step in range(steps):
        part = slice(rank * per, (rank + 1) * per)
        opt.zero_grad()
        loss_of(kind, model, xs[step, part], ys[step, part]).backward()
        if step == steps - 1:  # (stepped in backward: the gradients are gone already)
            grads = {} if kind.endswith("in_backward") else {
                f"grad.{n}": p.grad for n, p in model.named_parameters()}
        opt.step()
    out = {n: p.detach() for n, p in model.named_parameters()} | grads
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).clone() for k, v in out.items()}


if __name__ == "__main__":
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    results = {kind: train(kind, sharded=True)
               for kind in ("revnet38", "revnet38_stored", "revvit_mini", "revgpt_mini", "revnet38_bf16",
                            "revgpt_mini_in_backward")}
    if dist.get_rank() == 0:
        torch.save(results, out / "fsdp.pt")
    dist.destroy_process_group()
