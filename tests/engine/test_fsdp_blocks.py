"""FSDP2 per reversible block: ``fully_shard`` on each coupling of a sequence (and the root) trains as
one process does at the same global batch (2 processes, gloo, float64, 5 AdamW steps), with stored
blocks among the rebuilt ones; FSDP below a coupling is refused."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import revnet

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with gloo")

WORKER = Path(__file__).with_name("_fsdp_worker.py")


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("fsdp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(WORKER),
           str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert (out / "fsdp.pt").is_file(), proc.stdout[-3000:] + proc.stderr[-6000:]
    return torch.load(out / "fsdp.pt", weights_only=False)


@pytest.mark.parametrize("kind", ["revnet38", "revnet38_stored", "revvit_mini", "revgpt_mini",
                                  "revgpt_mini_in_backward"])
def test_fsdp_per_block_equals_one_process_at_the_global_batch(sharded, kind):
    sys.path.insert(0, str(WORKER.parent))
    from _fsdp_worker import train

    reference = train(kind, sharded=False)  # weights after 5 AdamW steps, and the last step's gradients
    got = sharded[kind]
    assert got.keys() == reference.keys()
    worst = max(((got[k] - v).abs().max() / v.abs().max().clamp_min(1e-300)).item()
                for k, v in reference.items())
    assert worst <= 1e-10


def test_fsdp_mixed_precision_per_block_is_as_close_as_autocast(sharded):
    """MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=float32) on each block: F and G compute in
    bf16 on the float32 stream; one step's gradients are as close to float32's as bf16 autocast's are
    (in one process), so the gather, the rebuild and the reduction lose nothing beyond bf16 itself."""
    sys.path.insert(0, str(WORKER.parent))
    from _fsdp_worker import build, train

    reference = train("revnet38_bf16", sharded=False)
    keys = [k for k in reference if k.startswith("grad.")]
    flat = lambda d: torch.cat([d[k].flatten().double() for k in keys])  # noqa: E731
    got = sharded["revnet38_bf16"]
    assert all(got[k].dtype == torch.float32 for k in keys)  # reduced in float32 into the shards
    error = ((flat(got) - flat(reference)).norm() / flat(reference).norm()).item()
    model, xs, ys = build("revnet38_bf16")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.nn.functional.cross_entropy(model(xs[0]), ys[0]).backward()
    autocast = {f"grad.{n}": p.grad for n, p in model.named_parameters()}
    autocast_error = ((flat(autocast) - flat(reference)).norm() / flat(reference).norm()).item()
    assert error <= 2 * autocast_error, (error, autocast_error)


def test_the_next_block_to_rebuild_is_gathered_ahead(monkeypatch):
    """In backward each sharded block starts gathering the parameters of the block rebuilt after it
    (FSDP's explicit backward prefetch): one asynchronous unshard per block but the first, and the
    gradients are those of the unsharded sequence."""
    import copy

    from torch.distributed.fsdp import fully_shard
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

    calls = []
    real = FSDPParamGroup.unshard
    monkeypatch.setattr(FSDPParamGroup, "unshard",
                        lambda self, async_op=False: calls.append(async_op) or real(self, async_op))
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        torch.manual_seed(0)
        seq = revnet.ReversibleSequence([revnet.AdditiveCoupling(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4),
                                                                 dim=-1) for _ in range(4)]).double()
        reference = copy.deepcopy(seq)
        for block in seq:
            fully_shard(block)
        x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
        with pytest.raises(RuntimeError, match=r"never initialised by FSDP.*fully_shard\(model\)"):
            seq(x)  # no root unit
        fully_shard(seq)
        seq(x).square().sum().backward()
        assert calls.count(True) == 3  # blocks 2, 1, 0 prefetched by the backward of 3, 2, 1
        reference(x).square().sum().backward()
        for p, q in zip(seq.parameters(), reference.parameters(), strict=True):
            assert torch.allclose(p.grad.full_tensor(), q.grad, rtol=1e-12, atol=1e-14)
    finally:
        dist.destroy_process_group()


def test_fsdp_below_a_coupling_is_refused():
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        seq = revnet.ReversibleSequence([revnet.AdditiveCoupling(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4),
                                                                 dim=-1) for _ in range(2)])
        fully_shard(seq[0].f)
        fully_shard(seq)
        with pytest.raises(RuntimeError, match=r"couplings.0.f is an FSDP unit .* below its coupling"):
            seq(torch.randn(2, 8, requires_grad=True))

    finally:
        dist.destroy_process_group()
