"""Where a training step's bytes go, per rank: parameters, gradients, optimizer state, activations.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 studies/memory_breakdown.py \\
        [--models revvit_base revgpt2_small] [--out docs/benchmarks/memory_breakdown.json]

For each model (float32, AdamW) and each way of training it on 2 processes (gloo):

- ``ddp plain``: DistributedDataParallel around the model under plain autograd;
- ``ddp reversible``: the same, reversible;
- ``fsdp reversible``: ``fully_shard`` on every coupling of every reversible sequence, then the root.

one training step runs, and this rank's tensors are counted (bytes of distinct storages; a
sharded parameter counts its local shard): parameters, gradients (DDP with
``gradient_as_bucket_view``, so the gradients are its buckets), the optimizer state, and the
activations a step keeps for backward (saved tensors of one forward and loss,
``revnet.memory.measure.SavedBytes``; under FSDP this includes the root's gathered parameters that
its own layers save). Rank 0 prints the table and writes it with ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import revnet
from revnet.bench.environment import environment
from revnet.memory.measure import SavedBytes

MiB = 2**20
MODES = ("ddp plain", "ddp reversible", "fsdp reversible")


def build(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if "gpt" in name:
        model = revnet.create_model(name, vocab_size=50257, context_length=1024)
        x = torch.randint(0, 50257, (1, 1024), generator=g)
        return model, x, torch.randint(0, 50257, (1, 1024), generator=g)
    model = revnet.create_model(name, num_classes=1000).to(memory_format=torch.contiguous_format)
    return model, torch.randn(2, 3, 224, 224, generator=g), torch.randint(0, 1000, (2,), generator=g)


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lm: bool) -> torch.Tensor:
    return model(x, targets=y) if lm else F.cross_entropy(model(x), y)


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def storage_bytes(tensors: list[torch.Tensor]) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        s = local(t).untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def measure(name: str, mode: str) -> dict:
    base, x, y = build(name)
    lm = "gpt" in name
    model = copy.deepcopy(base)
    revnet.set_reversible(model, mode != "ddp plain")
    if mode.startswith("fsdp"):
        from torch.distributed.fsdp import fully_shard

        for seq in [m for m in model.modules() if isinstance(m, revnet.ReversibleSequence)]:
            for block in seq:
                fully_shard(block)
        net = fully_shard(model)
    else:
        net = nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_of(net, x, y, lm).backward()
    opt.step()  # the optimizer state exists from here on; the gradients are kept for the count
    counter = SavedBytes(model)
    with counter._hooks:
        loss = loss_of(net, x, y, lm)
    activations = counter.total
    del loss
    params = list(model.parameters())
    state = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor) and t.dim() > 0]
    return {"model": name, "mode": mode, "params_mib": storage_bytes(params) / MiB,
            "grads_mib": storage_bytes([p.grad for p in params if p.grad is not None]) / MiB,
            "optimizer_mib": storage_bytes(state) / MiB, "activations_mib": activations / MiB}


def table(rows: list[dict]) -> str:
    lines = ["| model | training | parameters | gradients | optimizer state | activations | "
             "params + grads + optimizer |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        static = r["params_mib"] + r["grads_mib"] + r["optimizer_mib"]
        ddp = next(d for d in rows if d["model"] == r["model"] and d["mode"] == "ddp reversible")
        ratio = static / (ddp["params_mib"] + ddp["grads_mib"] + ddp["optimizer_mib"])
        lines.append(f"| {r['model']} | {r['mode']} | {r['params_mib']:.1f} MiB | {r['grads_mib']:.1f} MiB | "
                     f"{r['optimizer_mib']:.1f} MiB | {r['activations_mib']:.1f} MiB | {static:.1f} MiB "
                     f"({ratio:.2f}x DDP's) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["revvit_base", "revgpt2_small"])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    dist.init_process_group("gloo")
    rows = [measure(name, mode) for name in args.models for mode in MODES]
    if dist.get_rank() == 0:
        text = table(rows)
        print(text, flush=True)
        if args.out:
            given = argv if argv is not None else sys.argv[1:]
            command = " ".join(["torchrun --nproc-per-node 2 studies/memory_breakdown.py", *given])
            result = {"environment": environment(), "world_size": dist.get_world_size(), "command": command,
                      "rows": rows, "table": text}
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1) + "\n")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
