"""revnet.optimizer_in_backward: each parameter stepped in backward, as the usual loop would step it,
with a lower step peak (no whole-model gradients at once), and clear refusals of what cannot work."""

import copy

import pytest
import torch
import torch.nn.functional as F

import revnet
from revnet.memory.measure import peak_of


def small_revnet():
    torch.manual_seed(0)
    return revnet.create_model("revnet38", num_classes=10).double()


def batches(n, size=16):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, size, size, dtype=torch.float64, generator=g),
             torch.randint(0, 10, (4,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_twenty_steps_equal_the_usual_loop_bit_for_bit(kind):
    """AdamW (and Nesterov SGD) under a OneCycle schedule, through the reversible engine: the same
    arithmetic per parameter, so the same weights to the last bit."""
    model = small_revnet()
    reference = copy.deepcopy(model)

    def make(params):
        if kind == "adamw":
            return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
        return torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)

    opt = revnet.optimizer_in_backward(model, make)
    ref_opt = make(list(reference.parameters()))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=opt.param_groups[0]["lr"], total_steps=20)
    ref_sched = torch.optim.lr_scheduler.OneCycleLR(ref_opt, max_lr=ref_opt.param_groups[0]["lr"],
                                                    total_steps=20)
    for x, y in batches(20):
        F.cross_entropy(model(x), y).backward()
        assert all(p.grad is None for p in model.parameters())  # stepped and freed in backward
        opt.step()
        sched.step()
        ref_opt.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        ref_opt.step()
        ref_sched.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters(), strict=True))
    n = sum(1 for p in model.parameters() if p.requires_grad)
    assert opt.steps == 20 * n and len(opt.optimizers) == n
    assert repr(opt) == f"OptimizerInBackward({n} parameters, {'AdamW' if kind == 'adamw' else 'SGD'})"


def test_checkpoint_round_trip_continues_as_the_original():
    model = small_revnet()
    make = lambda ps: torch.optim.AdamW(ps, lr=1e-3)  # noqa: E731
    opt = revnet.optimizer_in_backward(model, make)
    data = batches(4)
    for x, y in data[:2]:
        F.cross_entropy(model(x), y).backward()
    saved_weights, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    for x, y in data[2:]:
        F.cross_entropy(model(x), y).backward()
    other = small_revnet()
    other.load_state_dict(saved_weights)
    other_opt = revnet.optimizer_in_backward(other, make)
    other_opt.load_state_dict(saved_opt)
    for x, y in data[2:]:
        F.cross_entropy(other(x), y).backward()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters(), strict=True))
    with pytest.raises(ValueError, match="expected the state of .* per-parameter optimizers"):
        other_opt.load_state_dict({"optimizers": []})


def test_clipping_per_parameter_and_the_refusals():
    model = small_revnet()
    reference = copy.deepcopy(model)
    revnet.optimizer_in_backward(model, lambda ps: torch.optim.SGD(ps, lr=0.1), clip_per_parameter=0.01)
    x, y = batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    F.cross_entropy(reference(x), y).backward()
    with torch.no_grad():
        for p in reference.parameters():
            torch.nn.utils.clip_grad_norm_([p], 0.01)
            p -= 0.1 * p.grad
    pairs = zip(model.parameters(), reference.parameters(), strict=True)
    assert all(torch.allclose(a, b, rtol=0, atol=1e-15) for a, b in pairs)
    with pytest.raises(ValueError, match="global-norm gradient clip .* clip_per_parameter=1.0"):
        revnet.optimizer_in_backward(small_revnet(), lambda ps: torch.optim.SGD(ps, lr=0.1),
                                     clip_grad_norm=1.0)
    with pytest.raises(ValueError, match="step in backward already"):
        revnet.optimizer_in_backward(model, lambda ps: torch.optim.SGD(ps, lr=0.1))
    fresh = small_revnet()
    everything = list(fresh.parameters())
    with pytest.raises(ValueError, match=r"over exactly that parameter .* lambda params"):
        revnet.optimizer_in_backward(fresh, lambda ps: torch.optim.SGD(everything, lr=0.1))
    opt = revnet.optimizer_in_backward(fresh, lambda ps: torch.optim.SGD(ps, lr=0.1))
    with pytest.raises(RuntimeError, match="global-norm gradient clip needs every gradient"):
        opt.clip_grad_norm_(1.0)
    with pytest.raises(ValueError, match="closure"):
        opt.step(lambda: 0.0)
    opt.remove()  # the hooks are gone: backward leaves gradients again, for a usual optimizer
    F.cross_entropy(fresh(x), y).backward()
    assert all(p.grad is not None for p in fresh.parameters())


def test_the_step_peak_drops_by_the_gradients_of_all_but_one_block():
    """A wide reversible stack whose parameters outweigh its activations: stepping in backward keeps
    at most the gradients in flight, so the peak of a step falls by at least the size of all
    gradients minus the largest block's (the issue's bound), measured with the CPU allocator."""
    torch.manual_seed(0)
    width = 512
    seq = revnet.ReversibleSequence([revnet.AdditiveCoupling(torch.nn.Linear(width, width),
                                                             torch.nn.Linear(width, width), dim=-1)
                                     for _ in range(8)])
    x = torch.randn(4, 2 * width)
    grad_bytes = sum(p.numel() * p.element_size() for p in seq.parameters())
    block_bytes = max(sum(p.numel() * p.element_size() for p in c.parameters()) for c in seq)
    make = lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9)  # noqa: E731

    usual = make(list(seq.parameters()))

    def usual_step():
        seq(x).square().mean().backward()
        usual.step()
        usual.zero_grad(set_to_none=True)

    usual_step()  # the momentum buffers exist from here on, in both
    usual_peak = peak_of(usual_step, x.device)
    in_backward = copy.deepcopy(seq)
    revnet.optimizer_in_backward(in_backward, make)

    def in_backward_step():
        in_backward(x).square().mean().backward()

    in_backward_step()
    peak = peak_of(in_backward_step, x.device)
    assert usual_peak - peak >= grad_bytes - block_bytes, (usual_peak, peak, grad_bytes, block_bytes)
