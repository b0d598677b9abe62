"""Does FSDP work with the reversible engine? A measurement on CPU with gloo (docs/DISTRIBUTED.md).

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 studies/fsdp_probe.py [--out probe.json]

For each way of wrapping RevNet-38 (BatchNorm in eval mode, so no cross-sample statistics),
reversible and plain autograd: one forward/backward on each rank's half of a batch of 8, then
the full gradients compared with one process on the whole batch. Prints JSON (rank 0), and
writes it to --out if given.

Wrappings tried:
  fsdp2-stage     fully_shard on each stage (each holds a whole ReversibleSequence), then the root
  fsdp2-coupling  fully_shard on each coupling inside a ReversibleSequence, then the root
  fsdp2-branch    fully_shard on each F and G inside a ReversibleSequence, then the root
  fsdp1           FullyShardedDataParallel, one unit per nn.Sequential
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from revnet import AdditiveCoupling, create_model


def wrap(model: nn.Module, variant: str) -> nn.Module:
    if variant == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        return FullyShardedDataParallel(model, use_orig_params=True,
                                        auto_wrap_policy=ModuleWrapPolicy({nn.Sequential}))
    from torch.distributed.fsdp import fully_shard

    couplings = [c for c in model.modules() if isinstance(c, AdditiveCoupling)]
    units = {"fsdp2-stage": list(model.stages),
             "fsdp2-coupling": couplings,
             "fsdp2-branch": [b for c in couplings for b in (c.f, c.g)]}[variant]
    for unit in units:
        fully_shard(unit)
    return fully_shard(model)


def full_grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        if g is not None and hasattr(g, "full_tensor"):  # FSDP2: a sharded DTensor
            g = g.full_tensor()
        out[name.replace("_fsdp_wrapped_module.", "")] = g
    return out


def compare(grads: dict[str, torch.Tensor | None], expected: dict[str, torch.Tensor]) -> dict:
    """One wrapping's row: how many parameters got no gradient, and the largest relative
    difference (max |g - e| / max |e|, per parameter) of the others from ``expected``."""
    missing = sorted(n for n in expected if grads.get(n) is None)
    worst = max((((grads[n] - e).abs().max() / e.abs().max()).item()
                 for n, e in expected.items() if n not in missing), default=None)
    return {"runs": True, "params_without_grad": len(missing), "of_params": len(expected),
            "max_rel_grad_diff": worst}


def failure(e: Exception) -> dict:
    """A wrapping's row when it raised: the exception's type and first line."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return {"runs": False, "error": f"{type(e).__name__}: {first[:240]}"}


def write_results(results: dict, out: Path | None) -> str:
    """The results as JSON: returned (the study prints it) and written to ``out`` if given."""
    text = json.dumps(results, indent=1)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="JSON file to write (rank 0)")
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    # Contiguous weights: the models' convolution weights are channels_last from construction,
    # and FSDP2 refuses non-contiguous parameters ("does not support non-contiguous parameters yet").
    base = create_model("revnet38", num_classes=10, in_chans=3).eval()
    base = base.to(memory_format=torch.contiguous_format)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)
    ref = copy.deepcopy(base)
    nn.functional.cross_entropy(ref(x), y).backward()
    expected = {n: p.grad for n, p in ref.named_parameters()}
    part = slice(rank * 8 // world, (rank + 1) * 8 // world)
    results = {"torch": torch.__version__, "world_size": world}
    for variant in ("fsdp2-stage", "fsdp2-coupling", "fsdp2-branch", "fsdp1"):
        for reversible in (True, False):
            key = f"{variant}/{'reversible' if reversible else 'plain'}"
            model = copy.deepcopy(base)
            model.reversible = reversible
            try:
                net = wrap(model, variant)
                nn.functional.cross_entropy(net(x[part]), y[part]).backward()
                if variant == "fsdp1":
                    from torch.distributed.fsdp import FullyShardedDataParallel

                    with FullyShardedDataParallel.summon_full_params(net, with_grads=True):
                        grads = full_grads(net)
                else:
                    grads = full_grads(net)
                results[key] = compare(grads, expected)
            except Exception as e:  # the point is to record what happens
                results[key] = failure(e)
    if rank == 0:
        print(write_results(results, args.out))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
