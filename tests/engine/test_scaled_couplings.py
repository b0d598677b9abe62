"""TwoStreamCoupling, and exact mode for the couplings that scale a half by gamma (momentum,
two-stream): the residual chain at gamma = 0, reversible gradients equal plain autograd's, and in
exact mode a bit-exact rebuild at any gamma and depth, its remainders kept as saved tensors."""

import copy
from fractions import Fraction

import pytest
import torch
from conftest import rel_err
from torch import nn

import revnet
from revnet.engine.exact import Ratio, Tape
from revnet.engine.modes import get_modes, set_modes, set_stored
from revnet.fidelity.drift import roundtrip
from revnet.memory.measure import saved_bytes

F64 = {"dtype": torch.float64}


def branch(c=6, dtype=torch.float64):
    return nn.Sequential(nn.Linear(c, c, dtype=dtype), nn.Tanh(), nn.Linear(c, c, dtype=dtype))


def coupling(kind, gamma, exact=False, c=6, dtype=torch.float64):
    if kind == "momentum":
        return revnet.MomentumCoupling(branch(c, dtype), gamma=gamma, dim=-1, exact=exact)
    return revnet.TwoStreamCoupling(branch(c, dtype), branch(c, dtype), gamma=gamma, dim=-1, exact=exact)


def test_two_stream_at_gamma_zero_is_the_residual_chain_and_inverts_above():
    f, g = branch(), branch()
    x = torch.randn(3, 6, **F64)
    out = revnet.TwoStreamCoupling(f, g, gamma=0.0, dim=-1)(torch.cat([x, x], -1))
    h = x + f(x)
    assert torch.equal(out[:, :6], h) and rel_err(out[:, 6:], h + g(h)) <= 1e-15
    c = revnet.TwoStreamCoupling(f, g, gamma=0.7, dim=-1)
    z = torch.randn(3, 12, **F64)
    assert rel_err(c.inverse(c(z)), z) <= 1e-14
    x1, x2 = z[:, :6], z[:, 6:]
    y1 = 0.7 * x1 + 0.3 * x2 + f(x2)
    assert torch.allclose(c(z), torch.cat([y1, 0.7 * x2 + 0.3 * y1 + g(y1)], -1), rtol=1e-14, atol=1e-14)
    # without G (an odd number of branches): y2 blends the two states
    lone = revnet.TwoStreamCoupling(f, gamma=0.7, dim=-1)
    assert torch.allclose(lone(z)[:, 6:], 0.7 * x2 + 0.3 * y1, rtol=1e-14, atol=1e-14)
    assert rel_err(lone.inverse(lone(z)), z) <= 1e-14


@pytest.mark.parametrize("kind", ["momentum", "two-stream"])
@pytest.mark.parametrize("exact", [False, True])
def test_reversible_gradients_equal_plain_autograd(kind, exact):
    seq = revnet.ReversibleSequence([coupling(kind, 0.6, exact) for _ in range(5)])
    plain = copy.deepcopy(seq)
    plain.reversible = False
    x = torch.randn(4, 12, **F64, requires_grad=True)
    grads = torch.autograd.grad(seq(x).square().sum(), [x, *seq.parameters()])
    refs = torch.autograd.grad(plain(x).square().sum(), [x, *plain.parameters()])
    worst = max(rel_err(a, b) for a, b in zip(grads, refs, strict=True))
    assert worst == 0.0 if exact else worst <= 1e-10  # exact: the same arithmetic, bit for bit


@pytest.mark.parametrize("kind", ["momentum", "two-stream"])
def test_exact_mode_rebuilds_bit_for_bit_where_float_drifts(kind):
    """40 float32 couplings at gamma 0.25: the float rebuild amplifies rounding by 4 a step and loses
    the input entirely; exact mode gives it back bit for bit."""
    x = torch.randn(8, 16)
    x[:, :8] = 0 if kind == "momentum" else x[:, 8:]  # the stream a converted stack starts from
    errors = {}
    for exact in (False, True):
        torch.manual_seed(1)
        chain = [coupling(kind, 0.25, exact, c=8, dtype=torch.float32) for _ in range(40)]
        y, rebuilt = roundtrip(chain, x, dim=-1)
        entered = chain[0].entry(x)
        errors[exact] = ((rebuilt - entered).abs().max() / entered.abs().max()).item()
        if exact:
            assert torch.equal(rebuilt, entered) and torch.isfinite(y).all()
    assert not errors[False] < 1e-2  # lost (or NaN)
    assert errors[True] == 0.0


def test_exact_mode_is_the_float_computation_up_to_the_lattice():
    torch.manual_seed(0)
    seq = revnet.ReversibleSequence([coupling("momentum", 0.9, False) for _ in range(4)])
    exact = copy.deepcopy(seq)
    assert revnet.set_exact(exact, True) == 4
    assert exact[0].factor == 0.9 and repr(exact[0]._ratio()) == "9/10"
    x = torch.randn(4, 12, **F64)
    with torch.no_grad():
        assert (exact(x) - seq(x)).abs().max() <= 4 * 8 * 2.0 ** -12  # a half-unit per rounding


def test_gamma_becomes_the_nearest_fraction_with_a_small_denominator():
    r = Ratio(0.3)
    assert (r.n, r.d) == (3, 10)
    odd = Ratio(0.7123)
    assert odd.d <= 256 and Fraction(odd.n, odd.d) == Fraction(0.7123).limit_denominator(256)
    x = torch.arange(-50, 50, dtype=torch.float32) / 4096
    y, remainder = r.scale(x, 12)
    assert remainder.dtype == torch.int8 and remainder.abs().max() <= 5
    # rounded to the nearest lattice point, and given back exactly
    assert (y - 0.3 * x).abs().max() <= 2.0 ** -13 + 1e-7
    assert torch.equal(r.unscale(y, remainder, 12), x)
    with pytest.raises(ValueError, match=r"exact mode scales by gamma in \(0, 1\)"):
        Ratio(0.0)


def test_the_remainders_are_saved_tensors_one_byte_per_element_and_freed_by_backward():
    """In exact mode each rebuilt block keeps one int8 remainder per scaled half (momentum: one,
    two-stream: two) as its saved tensors; the float mode keeps nothing per block."""
    x = torch.randn(16, 64, requires_grad=True)
    half = 16 * 32
    for kind, per_block in (("momentum", 1), ("two-stream", 2)):
        torch.manual_seed(0)
        seq = revnet.ReversibleSequence([coupling(kind, 0.5, False, c=32, dtype=torch.float32)
                                         for _ in range(6)])
        float_bytes = saved_bytes(seq, x)
        revnet.set_exact(seq, True)
        assert saved_bytes(seq, x) - float_bytes == 6 * per_block * half
        seq(x).sum().backward()  # and the graph trains


def test_exact_mode_with_stored_blocks_context_and_autocast():
    """Stored blocks run under autograd (nothing recorded), the others rebuild with their remainders;
    under bf16 autocast the exact stream stays float32."""

    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 6, dtype=torch.float64)

        def forward(self, x, scale):
            return torch.tanh(self.lin(x)) * scale

    seq = revnet.ReversibleSequence([revnet.MomentumCoupling(Masked(), gamma=0.25, dim=-1, exact=True)
                                     for _ in range(5)])
    set_stored(seq, ["couplings.1", "couplings.3"])
    plain = copy.deepcopy(seq)
    plain.reversible = False
    x = torch.randn(4, 12, **F64, requires_grad=True)
    scale = torch.rand(4, 1, **F64, requires_grad=True)
    grads = torch.autograd.grad(seq(x, scale).square().sum(), [x, scale, *seq.parameters()])
    refs = torch.autograd.grad(plain(x, scale).square().sum(), [x, scale, *plain.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(grads, refs, strict=True))
    torch.manual_seed(0)
    amp = revnet.ReversibleSequence([coupling("two-stream", 0.5, True, c=8, dtype=torch.float32)
                                     for _ in range(3)])
    xb = torch.randn(4, 16, dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = amp(xb)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert xb.grad is not None and torch.isfinite(xb.grad).all()


def test_exact_switch_is_saved_and_the_inverse_without_a_tape_is_refused():
    seq = revnet.ReversibleSequence([coupling("two-stream", 0.5, False) for _ in range(2)])
    modes = get_modes(seq)
    revnet.set_exact(seq, True, bits=10)
    assert get_modes(seq)["exact"] == {"couplings.0": True, "couplings.1": True}
    assert "exact=True, exact_bits=10" in repr(seq[0])
    x = torch.randn(2, 12, **F64)
    with torch.no_grad(), pytest.raises(RuntimeError, match="exact mode, whose rebuild needs the remainders"):
        seq.inverse(seq(x))
    with pytest.raises(RuntimeError, match="no remainder is left"):
        Tape().take(("c", "f"), "TwoStreamCoupling")
    set_modes(seq, modes)
    assert not any(c.exact for c in seq)
    with pytest.raises(ValueError, match=r"TwoStreamCoupling: gamma must be in \[0, 1\)"):
        revnet.TwoStreamCoupling(branch(), gamma=1.0)
