import pytest
import torch
from torch import nn

import revnet


def branch(c: int, out: int | None = None) -> nn.Module:
    return nn.Sequential(nn.Conv2d(c, out or c, 3, padding=1), nn.Tanh())


@pytest.mark.parametrize("kind", ["additive", "affine"])
def test_inverse_is_exact_in_float64(kind):
    c = 4
    if kind == "additive":
        block = revnet.AdditiveCoupling(branch(c), branch(c))
    else:
        block = revnet.AffineCoupling(branch(c, 2 * c), branch(c, 2 * c))
    block = block.double()
    x = torch.randn(3, 2 * c, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        y = block(x)
        assert (y - x).abs().max() > 1e-3  # the block does something
        err = (block.inverse(y) - x).abs().max().item()
    assert err < 1e-12


def test_affine_scale_is_bounded():
    block = revnet.AffineCoupling(nn.Identity(), nn.Identity(), clamp=2.0)
    h = torch.cat([torch.full((1, 1), 1e6), torch.zeros(1, 1)], 1)
    scale, _ = block._scale_shift(h)
    assert scale.item() <= torch.exp(torch.tensor(2.0)).item() + 1e-5
    h = torch.cat([torch.full((1, 1), -1e6), torch.zeros(1, 1)], 1)
    scale, _ = block._scale_shift(h)
    assert scale.item() >= torch.exp(torch.tensor(-2.0)).item() - 1e-6


def test_affine_rejects_bad_clamp():
    with pytest.raises(ValueError, match="clamp"):
        revnet.AffineCoupling(nn.Identity(), nn.Identity(), clamp=0.0)


def test_couple_backward_matches_autograd_for_affine():
    block = revnet.AffineCoupling(nn.Identity(), nn.Identity()).double()
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    h = torch.randn(2, 6, 4, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(2, 3, 4, dtype=torch.float64)
    dx, dh = block.couple_backward(x, h, dy)
    ex, eh = torch.autograd.grad(block.couple(x, h), (x, h), dy)
    torch.testing.assert_close(dx, ex)
    torch.testing.assert_close(dh, eh)


def test_split_along_other_dim():
    block = revnet.AdditiveCoupling(nn.Linear(3, 3), nn.Linear(3, 3), dim=-1).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(block.inverse(block(x)), x, rtol=0, atol=1e-12)


# --- bad input ------------------------------------------------------------------------

def test_odd_channels_error_names_module_shape_and_fix():
    block = revnet.AdditiveCoupling(branch(2), branch(2))
    with pytest.raises(ValueError, match=r"AdditiveCoupling.*\(2, 5, 4, 4\).*odd.*even"):
        block(torch.randn(2, 5, 4, 4))


def test_branch_changing_shape_is_reported():
    f = nn.Conv2d(2, 2, 3, stride=2, padding=1)
    block = revnet.AdditiveCoupling(f, branch(2))
    with pytest.raises(ValueError, match=r"AdditiveCoupling: F \(Conv2d\).*\(1, 2, 4, 4\).*\(1, 2, 2, 2\)"):
        block(torch.randn(1, 4, 4, 4))
    seq = revnet.ReversibleSequence([revnet.AdditiveCoupling(branch(2), nn.Conv2d(2, 3, 1))])
    with pytest.raises(ValueError, match=r"G \(Conv2d\).*must return \(1, 2, 4, 4\)"):
        seq(torch.randn(1, 4, 4, 4, requires_grad=True))


@pytest.mark.parametrize("reversible", [True, False])
@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
def test_branches_get_dense_halves(reversible, layout):
    # The first block's halves are strided slices of its input, slow for CPU convolutions: F and
    # G get dense tensors in every call (forward and, reversible, the rebuild in backward).
    seen = []

    class Probe(nn.Module):
        def forward(self, v):
            seen.append(v.is_contiguous() or v.is_contiguous(memory_format=torch.channels_last))
            return torch.tanh(v)

    seq = revnet.ReversibleSequence([revnet.AdditiveCoupling(Probe(), Probe()) for _ in range(2)],
                                    reversible=reversible)
    x = torch.randn(2, 8, 4, 4).contiguous(memory_format=layout).requires_grad_()
    assert not x.chunk(2, 1)[1].is_contiguous(memory_format=layout)  # the half is a slice
    seq(x).sum().backward()
    assert len(seen) == (8 if reversible else 4) and all(seen)


@pytest.mark.parametrize("reversible", [True, False])
def test_inplace_write_into_input_is_reported(reversible):
    f = nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(2, 2, 1))
    seq = revnet.ReversibleSequence([revnet.AdditiveCoupling(f, branch(2))], reversible=reversible)
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    # The first block's F gets a dense copy of its half (a split view is slow to convolve): the
    # coupling's own check reports a write into that copy, with or without grad, in either mode.
    msg = r"F \(Sequential\) modified its input.*in place.*inplace=False"
    with pytest.raises(RuntimeError, match=msg):
        seq(x).sum().backward()
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"F \(Sequential\) modified its input"):
        seq(x)


def test_non_callable_branch_rejected():
    with pytest.raises(TypeError, match="f must be"):
        revnet.AdditiveCoupling(3, nn.Identity())
