"""Numerical fidelity: exact mode, drift measurement, gradient angle and the drift guard."""

import copy

import pytest
import torch
from torch import nn

import revnet
from revnet.coupling import EXACT_BITS, exact_range, to_lattice
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


def test_exact_whole_model_matches_plain_and_names_its_couplings():
    model = RevNet((2, 2, 2), (8, 8, 16, 16), in_chans=1, exact=True)
    names = [c.name for c in model.modules() if isinstance(c, revnet.AdditiveCoupling)]
    assert names[0] == "stages.0.0.couplings.0" and all(names)
    plain = copy.deepcopy(model)
    plain.reversible = False
    x, target = torch.randn(4, 1, 10, 10), torch.randint(0, 10, (4,))
    out = []
    for net in (model, plain):
        loss = nn.functional.cross_entropy(net(x), target)
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
        model.stem.weight.mul_(1e4)  # activations far beyond +-256
    with pytest.raises(OverflowError) as info:
        model(torch.randn(2, 1, 8, 8))
    msg = str(info.value)
    assert "stages.0.0.couplings.0" in msg  # which coupling
    assert "max |y| = " in msg and "+-2^8 = 256" in msg  # how far, and the range
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
