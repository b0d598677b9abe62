"""The engine's rules on a CUDA device: gradients, RNG replay, autocast, the planner and its budget.

Skipped without a GPU (this project's CI machines have none); `pytest -m cuda` runs them where
one is present. Each mirrors a CPU test that runs everywhere.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err

import revnet
from revnet.models.transformer import RevTransformer
from revnet.training import TrainConfig, fit

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CUDA = torch.device("cuda")


def _grads(model, x, *, seed=3):
    """Output, input gradient and parameter gradients of one weighted-sum backward, masks seeded."""
    torch.manual_seed(seed)
    x = x.detach().clone().requires_grad_()
    y = model(x)
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=y.device).view_as(y)).sum().backward()
    return y.detach(), x.grad, [p.grad.clone() for p in model.parameters()]


def _same(a, b, tol):
    for u, v in zip([a[0], a[1], *a[2]], [b[0], b[1], *b[2]], strict=True):
        assert rel_err(u, v) <= tol


def test_revnet_float64_gradients_equal_plain_autograd():
    model = revnet.create_model("revnet38").to(CUDA, torch.float64)
    ref = copy.deepcopy(model)
    revnet.set_reversible(ref, False)
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64, device=CUDA)
    _same(_grads(model, x), _grads(ref, x), 1e-9)


def test_dropout_and_drop_path_masks_are_replayed_on_the_gpu():
    model = RevTransformer(16, 3, num_heads=4, drop_rate=0.2, attn_drop_rate=0.2, drop_path_rate=0.3,
                           dtype=torch.float64).to(CUDA)
    ref = copy.deepcopy(model)
    ref.reversible = False
    x = torch.randn(3, 7, 16, dtype=torch.float64, device=CUDA)
    before = torch.cuda.get_rng_state()
    got = _grads(model, x)
    _same(got, _grads(ref, x), 1e-9)
    torch.manual_seed(3)
    y = model(x.requires_grad_())
    state = torch.cuda.get_rng_state()
    y.sum().backward()
    assert torch.equal(torch.cuda.get_rng_state(), state)  # backward leaves the caller's RNG as found
    assert not torch.equal(before, state)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_on_the_gpu(dtype):
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    model = revnet.create_model("revnet38").to(CUDA)
    ref = copy.deepcopy(model)
    revnet.set_reversible(ref, False)
    x = torch.randn(8, 3, 16, 16, device=CUDA)
    with torch.autocast("cuda", dtype=dtype):
        got, want = _grads(model, x), _grads(ref, x)
    assert got[0].dtype == want[0].dtype
    _same(got, want, 5e-2)  # half precision, rebuilt inputs rounded differently from stored ones


def test_plans_fit_their_budget_on_the_gpu():
    model = revnet.create_model("revnet38").to(CUDA)
    x = torch.randn(32, 3, 16, 16, device=CUDA)
    low = revnet.plan(model, x, budget="min")
    assert low.budget == low.minimum and low.measured_peak <= low.minimum
    everything = revnet.plan(model, x, budget=1 << 40)
    assert len(everything.stored) == len(everything.units)
    mid = revnet.plan(model, x, budget=(low.minimum + everything.measured_peak) // 2)
    assert mid.measured_peak <= mid.budget


def test_train_with_memory_budget_auto(tmp_path):
    """``--memory-budget auto``: the budget is what the GPU has free; a tiny model fits whole."""
    config = TrainConfig(model="revnet38", dataset="synthetic", device="cuda", steps=4, batch_size=16,
                         lr=0.1, amp="auto", memory_budget="auto", out=str(tmp_path / "run"),
                         synthetic={"num_samples": 64, "image_size": 12, "channels": 3})
    summary = fit(config)
    assert summary["step"] == 4 and summary["device"].startswith("cuda")
    assert (tmp_path / "run" / "plan.txt").read_text().startswith("memory plan: budget")
    assert len(summary["stored"]) == 9  # everything fits


def test_cross_entropy_step_on_the_gpu_matches_cpu():
    """The same weights and batch: one reversible step's gradients agree across devices."""
    model = revnet.create_model("revnet38").double()
    x, y = torch.randn(4, 3, 16, 16, dtype=torch.float64), torch.randint(0, 10, (4,))
    grads = []
    for device in ("cpu", "cuda"):
        m = copy.deepcopy(model).to(device)
        F.cross_entropy(m(x.to(device)), y.to(device)).backward()
        grads.append([p.grad.cpu() for p in m.parameters()])
    for a, b in zip(*grads, strict=True):
        assert rel_err(a, b) <= 1e-9


def test_optimizer_in_backward_on_the_gpu_equals_the_usual_step():
    """The per-parameter steps in backward, on CUDA tensors: the usual loop's weights after 10 steps."""
    torch.manual_seed(0)
    model = revnet.create_model("revnet38").to(CUDA)
    reference = copy.deepcopy(model)
    make = lambda ps: torch.optim.AdamW(ps, lr=1e-3)  # noqa: E731
    revnet.optimizer_in_backward(model, make)
    ref_opt = make(list(reference.parameters()))
    for _ in range(10):
        x, y = torch.randn(8, 3, 32, 32, device=CUDA), torch.randint(0, 10, (8,), device=CUDA)
        F.cross_entropy(model(x), y).backward()
        ref_opt.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        ref_opt.step()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert rel_err(p, q) <= 1e-6


def test_fsdp_per_block_on_one_gpu_with_nccl():
    """fully_shard on every coupling and the root, one process on NCCL: the engine's gather, rebuild
    and reduce-scatter run on the GPU and the gradients are the unsharded model's (float64)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    if not dist.is_nccl_available():
        pytest.skip("needs NCCL")
    dist.init_process_group("nccl", rank=0, world_size=1, store=dist.HashStore())
    try:
        torch.manual_seed(0)
        model = revnet.create_model("revgpt_mini", vocab_size=64, context_length=16).to(CUDA, torch.float64)
        reference = copy.deepcopy(model)
        for seq in [m for m in model.modules() if isinstance(m, revnet.ReversibleSequence)]:
            for block in seq:
                fully_shard(block)
        fully_shard(model)
        x = torch.randint(0, 64, (4, 16), device=CUDA)
        model(x, targets=x).backward()
        reference(x, targets=x).backward()
        for p, q in zip(model.parameters(), reference.parameters(), strict=True):
            assert rel_err(p.grad.full_tensor(), q.grad) <= 1e-10
    finally:
        dist.destroy_process_group()
