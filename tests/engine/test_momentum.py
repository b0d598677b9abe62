"""MomentumCoupling (Sander et al. 2021): the residual step at gamma = 0, invertible above,
and reversible gradients equal plain autograd's in float64."""

import copy

import pytest
import torch
from conftest import rel_err
from torch import nn

import revnet


def branch(c=6):
    f64 = {"dtype": torch.float64}
    return nn.Sequential(nn.Linear(c, c, **f64), nn.Tanh(), nn.Linear(c, c, **f64))


def test_gamma_zero_is_the_residual_network_and_positive_gamma_inverts():
    torch.manual_seed(0)
    f = branch()
    x = torch.randn(3, 6, dtype=torch.float64)
    v0 = torch.zeros_like(x)
    out = revnet.MomentumCoupling(f, gamma=0.0, dim=-1)(torch.cat([v0, x], -1))
    assert torch.equal(out[:, 6:], x + f(x)) and torch.equal(out[:, :6], f(x))
    c = revnet.MomentumCoupling(f, gamma=0.8, dim=-1)
    z = torch.randn(3, 12, dtype=torch.float64)
    assert rel_err(c.inverse(c(z)), z) <= 1e-14
    v, p = z[:, :6], z[:, 6:]
    expected_v = 0.8 * v + 0.2 * f(p)
    assert torch.allclose(c(z), torch.cat([expected_v, p + expected_v], -1), rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("depth", [3, 4])
def test_reversible_gradients_equal_plain_autograd(depth):
    torch.manual_seed(0)
    seq = revnet.ReversibleSequence([revnet.MomentumCoupling(branch(), gamma=0.9, dim=-1)
                                     for _ in range(depth)])
    plain = copy.deepcopy(seq)
    plain.reversible = False
    x = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    grads = torch.autograd.grad(seq(x).square().sum(), [x, *seq.parameters()])
    refs = torch.autograd.grad(plain(x).square().sum(), [x, *plain.parameters()])
    assert max(rel_err(a, b) for a, b in zip(grads, refs, strict=True)) <= 1e-10


def test_gamma_is_checked_and_zero_cannot_rebuild():
    with pytest.raises(ValueError, match=r"gamma must be in \[0, 1\)"):
        revnet.MomentumCoupling(branch(), gamma=1.0)
    seq = revnet.ReversibleSequence([revnet.MomentumCoupling(branch(), gamma=0.0, dim=-1)])
    x = torch.randn(2, 12, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="gamma = 0 is the residual step"):
        seq(x).sum().backward()
    seq.reversible = False  # plain autograd trains the residual network
    seq(x).sum().backward()
    assert x.grad is not None


def test_rebuild_error_grows_as_one_over_gamma_per_step():
    """The drift roundtrip rebuilds momentum chains as the engine does; smaller gamma, larger error."""
    from revnet.fidelity.drift import roundtrip

    torch.manual_seed(0)
    x = torch.randn(8, 16)
    errors = {}
    for gamma in (0.9, 0.3):
        torch.manual_seed(1)
        f32 = [revnet.MomentumCoupling(nn.Sequential(nn.Linear(8, 8), nn.Tanh()), gamma=gamma, dim=-1)
               for _ in range(12)]
        _, rebuilt = roundtrip(f32, x, dim=-1)
        errors[gamma] = ((rebuilt - x).abs().max() / x.abs().max()).item()
    assert errors[0.9] < 1e-4 and errors[0.3] > errors[0.9]
