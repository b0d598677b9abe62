"""Numerical fidelity: exact mode, rebuild error, gradient angle and the drift guard."""

import copy

import pytest
import torch
from torch import nn

import revnet
from revnet import fidelity
from revnet.engine.exact import EXACT_BITS, exact_range, to_lattice
from revnet.models import RevNet


def branch(c: int, *, bn: bool = True) -> nn.Module:
    layers = [nn.BatchNorm2d(c)] if bn else []
    return nn.Sequential(*layers, nn.ReLU(), nn.Conv2d(c, c, 3, padding=1))


def exact_seq(blocks: int = 3, c: int = 4, dtype=torch.float32, **kw) -> revnet.ReversibleSequence:
    return revnet.ReversibleSequence(
        [revnet.AdditiveCoupling(branch(c), branch(c), exact=True, **kw) for _ in range(blocks)]).to(dtype)


def lattice(shape, bits: int = EXACT_BITS, span: int = 4) -> torch.Tensor:
    """Random float32 values on the 2^-bits lattice in [-span, span] (no -0.0)."""
    return torch.randint(-span * 2**bits, span * 2**bits + 1, shape).float() * 2.0**-bits


def grads(seq, x, *, autocast: bool = False):
    """Output and gradients (input, then every parameter) of a weighted sum of the output."""
    x = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = seq(x)
    w = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
    return y.detach(), torch.autograd.grad((y * w).sum(), [x, *seq.parameters()])


# --- exact mode -----------------------------------------------------------------------

def test_exact_mode_is_bit_exact_through_1000_blocks():
    c = 8

    def lin() -> nn.Module:
        layer = nn.Linear(c, c)
        with torch.no_grad():
            layer.weight.mul_(0.3)
        return nn.Sequential(layer, nn.Tanh())

    seq = revnet.ReversibleSequence(
        [revnet.AdditiveCoupling(lin(), lin(), exact=True) for _ in range(1000)])
    x = lattice((4, 2 * c))
    with torch.no_grad():
        y = seq(x)
        assert (y - x).abs().max() > 1  # 1000 blocks moved the stream a long way
        back = seq.inverse(y)
    assert torch.equal(back.view(torch.int32), x.view(torch.int32))  # bit for bit
    # The same network in float mode does not come back exactly.
    assert revnet.set_exact(seq, False) == 1000
    with torch.no_grad():
        assert (seq.inverse(seq(x)) - x).abs().max() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exact_reversible_gradients_equal_plain_autograd_bitwise(dtype):
    seq = exact_seq(4, dtype=dtype)
    plain = copy.deepcopy(seq)
    plain.reversible = False
    x = torch.randn(4, 8, 6, 6, dtype=dtype)  # off the lattice: rounded on entry
    (y, got), (y_ref, ref) = grads(seq, x), grads(plain, x)
    assert torch.equal(y, y_ref)
    assert len(got) == len(ref) == 1 + len(list(seq.parameters()))
    for a, b in zip(got, ref, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(seq.buffers(), plain.buffers(), strict=True):  # BN stats updated once each
        assert torch.equal(a, b)


@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16])
def test_exact_under_bf16_autocast_keeps_a_float32_stream(in_dtype):
    seq = exact_seq(3)
    plain = copy.deepcopy(seq)
    plain.reversible = False
    x = torch.randn(4, 8, 6, 6).to(in_dtype)
    (y, got), (y_ref, ref) = grads(seq, x, autocast=True), grads(plain, x, autocast=True)
    assert y.dtype == torch.float32 and got[0].dtype == in_dtype
    assert torch.equal(y, y_ref)
    for a, b in zip(got, ref, strict=True):
        assert torch.equal(a, b)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(seq.inverse(seq(x)), to_lattice(x.float()))


@pytest.mark.parametrize(("channels_last", "autocast"), [(False, False), (True, True)])
def test_exact_whole_model_matches_plain_and_names_its_couplings(channels_last, autocast):
    model = RevNet((2, 2, 2), (8, 8, 16, 16), in_chans=1, exact=True)
    names = [c.name for c in model.modules() if isinstance(c, revnet.AdditiveCoupling)]
    assert names[0] == "stages.0.0.couplings.0" and all(names)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    plain = copy.deepcopy(model)
    plain.reversible = False
    x, target = torch.randn(4, 1, 10, 10).contiguous(memory_format=fmt), torch.randint(0, 10, (4,))
    out = []
    for net in (model, plain):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = nn.functional.cross_entropy(net(x).float(), target)
        out.append(torch.autograd.grad(loss, list(net.parameters())))
    for a, b in zip(*out, strict=True):
        assert torch.equal(a, b)


def test_off_lattice_input_comes_back_rounded():
    seq = exact_seq(2)
    x = torch.randn(2, 8, 4, 4)
    with torch.no_grad():
        assert torch.equal(seq.inverse(seq(x)), to_lattice(x))


def test_to_lattice_rounds_exactly_with_a_straight_through_gradient():
    x = torch.tensor([0.1, -2.5e-6, 3.0, 1e-9], requires_grad=True)
    q = to_lattice(x, 4)
    assert q.tolist() == [0.125, -0.0, 3.0, 0.0]
    (g,) = torch.autograd.grad((q * torch.arange(4.0)).sum(), x)
    assert g.tolist() == [0.0, 1.0, 2.0, 3.0]
    assert exact_range(torch.float32, 16) == 256.0 and exact_range(torch.float64, 16) == 2.0**37


def test_leaving_the_range_raises_a_clear_error():
    model = RevNet((2, 2, 2), (8, 8, 16, 16), in_chans=1, exact=True)
    with torch.no_grad():
        model.stem.weight.mul_(1e5)  # activations far beyond +-4096
    with pytest.raises(OverflowError) as info:
        model(torch.randn(2, 1, 8, 8))
    msg = str(info.value)
    assert "stages.0.0.couplings.0" in msg  # which coupling
    assert "max |y| = " in msg and "+-2^12 = 4096" in msg  # how far, and the range
    assert "Fix: fewer fraction bits (exact_bits=" in msg and "float64" in msg  # the fix
    # NaN is caught too, never silently passed on.
    seq = exact_seq(1)
    with pytest.raises(OverflowError, match="max .y. = nan"):
        seq(torch.full((2, 8, 4, 4), float("nan")))
    # A float64 stream has the range 2^37 at the same lattice.
    seq = exact_seq(1, dtype=torch.float64)
    seq(torch.randn(2, 8, 4, 4, dtype=torch.float64) * 1e4)


def test_exact_mode_refuses_a_bf16_stream_outside_autocast():
    seq = exact_seq(1).to(torch.bfloat16)
    with pytest.raises(TypeError, match=r"outside autocast.*torch\.autocast"):
        seq(torch.randn(2, 8, 4, 4, dtype=torch.bfloat16))


def test_set_exact_and_bad_bits():
    model = RevNet((2, 2, 2), (8, 8, 16, 16), in_chans=1)
    couplings = [c for c in model.modules() if isinstance(c, revnet.AdditiveCoupling)]
    assert not any(c.exact for c in couplings)
    assert revnet.set_exact(model, True, bits=12) == len(couplings) == 4
    assert all(c.exact and c.exact_bits == 12 for c in couplings)
    assert "exact=True, exact_bits=12" in repr(couplings[0])
    with pytest.raises(ValueError, match="exact_bits must be an integer in"):
        revnet.AdditiveCoupling(nn.Identity(), nn.Identity(), exact=True, exact_bits=60)
    with pytest.raises(ValueError, match="bits must be an integer"):
        revnet.set_exact(model, True, bits=1.5)


# --- rebuild error ----------------------------------------------------------------

def test_roundtrip_matches_the_engine_and_replays_dropout():
    def br():
        return nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.Tanh(), nn.Dropout(0.5))

    seq = revnet.ReversibleSequence([revnet.AdditiveCoupling(br(), br()) for _ in range(3)]).double()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    torch.manual_seed(1)
    y, back = fidelity.roundtrip(list(seq.couplings), x)
    torch.manual_seed(1)
    with torch.no_grad():
        assert torch.equal(y, seq(x))  # the same forward as the sequence's own
    err = fidelity.reconstruction_error(x, back)
    assert 0 < err["max_abs_error"] < 1e-12 and err["rel_error"] <= err["max_abs_error"] / x.abs().max()


# --- gradient angle -------------------------------------------------------------------

def tiny_revnet(dtype=torch.float32, **kw) -> RevNet:
    return RevNet((2, 2, 2), (8, 8, 16, 16), in_chans=1, **kw).to(dtype)


def loss_of(x, target, autocast: bool = False):
    def fn(m):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return nn.functional.cross_entropy(m(x).float(), target)
    return fn


def test_gradient_angle_is_tiny_in_float64_and_leaves_the_state_alone():
    model = tiny_revnet(torch.float64)
    x, target = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (4,))
    twin = copy.deepcopy(model)
    rng = torch.get_rng_state()
    result = fidelity.gradient_angle(model, loss_of(x, target))
    assert set(result["grad_angle_by_stage"]) == {"stem", "stages.0", "stages.1", "stages.2", "head"}
    assert 0 <= result["grad_angle_deg"] < 1e-6 and result["grad_rel_diff"] < 1e-12
    assert result["grad_angle_by_stage"]["head"] == 0.0  # above every rebuilt activation
    # Nothing changed: RNG, buffers, .grad, flags; a training step gives the same result as the twin's.
    assert torch.equal(torch.get_rng_state(), rng)
    for a, b in zip(model.buffers(), twin.buffers(), strict=True):
        assert torch.equal(a, b)
    assert all(p.grad is None for p in model.parameters()) and model.reversible
    for m in (model, twin):
        loss_of(x, target)(m).backward()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad)


def test_gradient_angle_orders_precisions_and_is_zero_in_exact_mode():
    x, target = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    f32 = fidelity.gradient_angle(tiny_revnet(), loss_of(x, target))["grad_angle_deg"]
    b16 = fidelity.gradient_angle(tiny_revnet(), loss_of(x, target, autocast=True))["grad_angle_deg"]
    # Under autocast the residual stream stays float32 (ReversibleSequence), so bf16 rebuilds
    # are as faithful as float32 ones (with a bf16 stream this angle was above 1e-2 degrees).
    assert 0 < f32 < 1e-2 and 0 <= b16 < 1e-2
    exact = fidelity.gradient_angle(tiny_revnet(exact=True), loss_of(x, target, autocast=True))
    assert exact["grad_angle_deg"] == 0.0 and exact["grad_rel_diff"] == 0.0
    assert fidelity.stage_of(tiny_revnet(), "stages.1.0.f.0.weight") == "stages.1"


# --- drift guard ----------------------------------------------------------------------

@pytest.mark.parametrize("action", ["exact", "store", "warn"])
def test_drift_guard_acts_past_the_threshold(action, caplog):
    model = tiny_revnet()
    x = torch.randn(4, 1, 8, 8)
    buffers = [b.clone() for b in model.buffers()]
    guard = fidelity.DriftGuard(threshold=1e-12, action=action)  # float32 rebuilds exceed it
    rows = guard.check(model, lambda m: m(x), step=7)
    assert rows[0]["step"] == 7 and set(rows[0]["drift"]) == {"stages.0.0", "stages.1.1", "stages.2.1"}
    events = [r for r in rows if r.get("event") == "drift"]
    assert events and all(e["action"] == action and e["rel_error"] > 1e-12 for e in events)
    assert "drift guard" in caplog.text
    for a, b in zip(model.buffers(), buffers, strict=True):
        assert torch.equal(a, b)
    seqs = {e["sequence"]: model.get_submodule(e["sequence"]) for e in events}
    again = guard.check(model, lambda m: m(x), step=8)
    if action == "exact":
        assert all(c.exact for s in seqs.values() for c in s.couplings)
        assert all(v == 0.0 for v in again[0]["drift"].values()) and len(again) == 1
    elif action == "store":
        assert not any(s.reversible for s in seqs.values())
        assert again == [{"step": 8, "drift": {}, "drift_max_abs": {}, "drift_input_max": {}}]  # none rebuilt
    else:
        assert len(again) == len(rows)


def test_drift_guard_switches_momentum_couplings_to_exact_mode():
    """A converted model's momentum couplings have an exact mode: the guard's 'exact' turns it on,
    and the next check rebuilds bit for bit (the remainders of gamma * v kept on the tape)."""
    torch.manual_seed(0)
    seq = revnet.ReversibleSequence([revnet.MomentumCoupling(torch.nn.Linear(8, 8), gamma=0.5, dim=-1)
                                     for _ in range(6)])
    model = torch.nn.Sequential(seq)
    x = torch.randn(4, 16)
    guard = fidelity.DriftGuard(threshold=1e-12, action="exact")
    rows = guard.check(model, lambda m: m(x), step=1)
    assert rows[1]["action"] == "exact" and all(c.exact for c in seq) and seq.reversible
    assert guard.check(model, lambda m: m(x), step=2) == [
        {"step": 2, "drift": {"0": 0.0}, "drift_max_abs": {"0": 0.0},
         "drift_input_max": {"0": pytest.approx(x.abs().max().item(), abs=2.0 ** -12)}}]


def test_drift_guard_stores_a_sequence_whose_couplings_have_no_exact_mode():
    torch.manual_seed(0)
    lin = torch.nn.Linear
    seq = revnet.ReversibleSequence([revnet.AffineCoupling(lin(4, 8), lin(4, 8), dim=-1) for _ in range(6)])
    model = torch.nn.Sequential(seq)
    x = torch.randn(4, 8)
    rows = fidelity.DriftGuard(threshold=1e-12, action="exact").check(model, lambda m: m(x), step=1)
    assert rows[1]["action"] == "store (its couplings have no exact mode)" and not seq.reversible


def test_drift_guard_reduces_errors_over_processes():
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        errors = {"b": {"max_abs_error": 2.0, "rel_error": 0.5, "input_max": 4.0},
                  "a": {"max_abs_error": 1.0, "rel_error": 0.25, "input_max": 4.0}}
        assert fidelity.drift._reduce_max(errors) == errors  # one process: the max is its own
    finally:
        dist.destroy_process_group()


def test_drift_guard_rejects_bad_settings():
    with pytest.raises(ValueError, match="threshold must be a positive number"):
        fidelity.DriftGuard(threshold=0)
    with pytest.raises(ValueError, match="action must be one of"):
        fidelity.DriftGuard(action="panic")
