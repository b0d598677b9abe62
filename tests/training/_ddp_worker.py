"""Worker for tests/test_distributed.py, started by torchrun with 2 processes on CPU (gloo).

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/training/_ddp_worker.py OUT

It runs several fits and direct DDP checks in one process group (one start-up for all) and
writes what the test compares into OUT; then it runs ``revnet train`` through the CLI and
kills rank 1 at its third step, so the launch as a whole fails, as it should.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

import revnet
import revnet.training.loop as loop_mod
import revnet.training.setup as run_mod
from revnet import create_model
from revnet.cli import main as cli_main
from revnet.engine.modes import set_stored
from revnet.engine.modes import units as plan_units
from revnet.training import TrainConfig, fit

TINY = {"num_samples": 64, "image_size": 8, "channels": 3}
VIT = {"model": "revvit_mini", "lr": 0.05}  # a RevViT under DDP (SGD: AdamW amplifies rounding)
# A byte-level RevGPT on a small folder of text: windows drawn per global batch, sliced per rank.
LM = {"model": "revgpt_mini", "dataset": "text", "context_length": 16, "lr": 0.05, "batch_size": 8,
      "channels_last": False}


def write_corpus(folder: Path) -> Path:
    """Ten small files (one held out), the same bytes on every rank; tests/training/test_distributed.py
    trains on the same folder in one process."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(10):
        body = "".join(f"def f{i}_{j}(x):\n    return x + {j}\n" for j in range(30))
        (folder / f"m{i}.py").write_text(body)
    return folder


def config(out: Path, name: str, **kw) -> TrainConfig:
    fields = dict(model="revnet38", dataset="synthetic", synthetic=TINY, steps=4, batch_size=16, lr=0.1,
                  amp="none", log_every=2, ckpt_every=2, norm="group", out=str(out / name))
    fields.update(kw)
    return TrainConfig(**fields)


def stop_on_rank1_at(step: int) -> None:
    """Rank 1 alone receives SIGTERM after its optimiser step ``step``."""
    real, count = loop_mod._train_step, {"n": 0}

    def wrapped(run, x, y):
        result = real(run, x, y)
        count["n"] += 1
        if dist.get_rank() == 1 and count["n"] == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    loop_mod._train_step = wrapped


def direct_ddp(out: Path, reversible: bool, compiled: bool = False, mixed: bool = False) -> dict:
    """Three SGD steps of a BatchNorm-in-eval-mode RevNet under DDP against one process at 2B.

    Also records when DDP's buckets are all-reduced relative to the end of backward, and
    checks no_sync.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = create_model("revnet38", num_classes=10, in_chans=3)
    model.reversible = reversible
    if mixed:  # a memory-budget plan's mix: every other coupling and the first opener stored
        units = plan_units(model)
        set_stored(model, [name for k, (name, kind, _) in enumerate(units) if k % 2 or kind == "opener"][:-1])
    model.eval()  # BatchNorm normalises with running statistics: no cross-sample statistics
    reference = copy.deepcopy(model)
    if compiled:  # DDP around a model whose F, G, openers, stem and head run compiled
        revnet.compile(model, backend="aot_eager")
    ddp = DistributedDataParallel(model, bucket_cap_mb=0.25)
    events: list[str] = []

    def hook(state, bucket):
        events.append(f"bucket{bucket.index()}")
        return default_hooks.allreduce_hook(state, bucket)

    ddp.register_comm_hook(dist.group.WORLD, hook)
    # The stem's first weight gets its gradient last of all: the end of backward.
    next(model.stem.parameters()).register_post_accumulate_grad_hook(lambda _: events.append("stem"))
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(3, 2 * 4, 3, 8, 8, generator=g)  # 3 steps of a global batch 8
    ys = torch.randint(0, 10, (3, 8), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    per = xs.shape[1] // world
    orders = []
    for step in range(3):
        events.clear()
        opt.zero_grad()
        part = slice(rank * per, (rank + 1) * per)
        nn.functional.cross_entropy(ddp(xs[step, part]), ys[step, part]).backward()
        opt.step()
        orders.append(list(events))
        ref_opt.zero_grad()
        nn.functional.cross_entropy(reference(xs[step]), ys[step]).backward()
        ref_opt.step()
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    ref = torch.cat([p.detach().flatten() for p in reference.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    # no_sync: the first backward keeps local gradients, the next one averages the sum.
    opt.zero_grad()
    with ddp.no_sync():
        nn.functional.cross_entropy(ddp(xs[0, :per] * (rank + 1)), ys[0, :per]).backward()
    local = torch.cat([p.grad.flatten() for p in model.parameters()])
    nn.functional.cross_entropy(ddp(xs[1, :per]), ys[1, :per]).backward()
    synced = torch.cat([p.grad.flatten() for p in model.parameters()])
    locals_, synceds = [torch.empty_like(local) for _ in range(world)], [torch.empty_like(local)
                                                                          for _ in range(world)]
    dist.all_gather(locals_, local)
    dist.all_gather(synceds, synced)
    return {
        "max_rel_diff_vs_one_process": ((flat - ref).abs().max() / ref.abs().max()).item(),
        "ranks_identical": all(torch.equal(gathered[0], t) for t in gathered[1:]),
        "bucket_orders": orders,
        "no_sync_local_grads_differ": not torch.equal(locals_[0], locals_[1]),
        "synced_grads_identical": torch.equal(synceds[0], synceds[1]),
    }


def scenarios(out: Path) -> None:
    rank = dist.get_rank()
    results: dict = {}
    timings: dict = {}
    for name, kw in {"rev": {}, "plain": {"reversible": False}, "accum": {"accum_steps": 2},
                     "bn_rev": {"norm": "batch", "exact": True},
                     "bn_plain": {"norm": "batch", "exact": True, "reversible": False},
                     "linear": {"lr_scaling": "linear", "steps": 2, "log_every": 1},
                     "compiled": {"compile": "aot_eager"},
                     "vit_rev": VIT, "vit_plain": {**VIT, "reversible": False},
                     "in_backward": {"optimizer_in_backward": True},
                     "fsdp": {"fsdp": True}, "fsdp_vit": {**VIT, "fsdp": True},
                     "fsdp_in_backward": {"fsdp": True, "optimizer_in_backward": True}}.items():
        t = time.perf_counter()
        results[name] = fit(config(out, name, **kw))
        timings[name] = time.perf_counter() - t
    if rank == 0:
        write_corpus(out / "corpus")
    dist.barrier()
    results["lm_rev"] = fit(config(out, "lm_rev", **LM, data_dir=str(out / "corpus")))
    # --memory-budget: rank 0 plans and every rank applies its plan; rank 1 must not plan at all.
    planner = run_mod.plan_memory
    if rank == 1:
        def refuse(*_a, **_k):
            raise AssertionError("rank 1 planned: ranks must apply rank 0's plan")
        run_mod.plan_memory = refuse
    results["planned"] = fit(config(out, "planned", memory_budget="min", norm="batch"))
    run_mod.plan_memory = planner
    real = loop_mod._train_step
    stop_on_rank1_at(2)
    results["stop"] = fit(config(out, "stop"))
    loop_mod._train_step = real
    results["resumed"] = fit(config(out, "stop"), resume=True)
    stop_on_rank1_at(2)  # a sharded run stopped and resumed: its checkpoint gathers and re-shards
    results["fsdp_stop"] = fit(config(out, "fsdp_stop", fsdp=True))
    loop_mod._train_step = real
    results["fsdp_resumed"] = fit(config(out, "fsdp_stop", fsdp=True), resume=True)
    for checkpoint in ("sharded", "full"):  # the per-parameter optimizers' state, both ways
        name = f"fsdp_in_backward_stop_{checkpoint}"
        stop_on_rank1_at(2)
        fit(config(out, name, fsdp=True, optimizer_in_backward=True, checkpoint=checkpoint))
        loop_mod._train_step = real
        results[f"{name}_resumed"] = fit(config(out, name, fsdp=True, optimizer_in_backward=True,
                                                checkpoint=checkpoint), resume=True)
    # --memory-budget under FSDP: rank 0 plans on the whole model, then every block is sharded
    results["fsdp_planned"] = fit(config(out, "fsdp_planned", memory_budget="min", norm="batch", fsdp=True))
    try:
        fit(config(out, "syncbn", norm="batch", sync_bn=True))
        results["syncbn_error"] = None
    except ValueError as e:
        results["syncbn_error"] = str(e)
    for reversible in (True, False):
        results[f"direct_{'rev' if reversible else 'plain'}"] = direct_ddp(out, reversible)
    results["direct_rev_compiled"] = direct_ddp(out, True, compiled=True)
    results["direct_rev_mixed"] = direct_ddp(out, True, mixed=True)
    results["timings"] = timings
    (out / f"results_rank{rank}.json").write_text(json.dumps(results, default=str))


def die(out: Path) -> int:
    """`revnet train` under torchrun; rank 1 dies abruptly during its third step."""
    real = loop_mod._train_step

    def fatal(run, x, y):
        if run.dist.rank == 1 and run.step == 2:
            os._exit(3)
        return real(run, x, y)

    loop_mod._train_step = fatal
    return cli_main(["train", "--dataset", "synthetic", "--steps", "4", "--batch-size", "16",
                     "--norm", "group", "--amp", "none", "--ckpt-every", "2", "--log-every", "1",
                     "--dist-timeout", "30", "--out", str(out / "die"), "--no-memory-report"])


if __name__ == "__main__":
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    scenarios(out)
    sys.exit(die(out))
