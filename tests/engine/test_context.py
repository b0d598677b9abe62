"""Context inputs: ``seq(x, *args, **kwargs)`` hands masks, positions and encoder states to every F and G.

Reversible and plain autograd on the same weights must agree on the gradients of the input,
every parameter and every context tensor that requires grad (float64, <= 1e-10 relative),
and the context must be kept once per sequence, not once per block.
"""

import copy

import pytest
import torch
from torch import nn

import revnet
from revnet.engine import Recomputed
from revnet.engine.modes import set_stored
from revnet.fidelity import DriftGuard
from revnet.memory.measure import SavedBytes

D = torch.float64


class Branch(nn.Module):
    """A branch that reads every kind of context: an encoder output (positional), a (cos, sin)
    pair in a tuple, a mask and a non-tensor flag (keywords)."""

    def __init__(self, c: int, p: float = 0.0) -> None:
        super().__init__()
        self.lin = nn.Linear(c, c, dtype=D)
        self.enc = nn.Linear(c, c, dtype=D)
        self.drop = nn.Dropout(p)

    def forward(self, h, encoder, rope=None, *, mask=None, scale=1.0):
        out = torch.tanh(self.lin(h)) + self.enc(encoder).mean(dim=1, keepdim=True)  # (B, T, c)
        if rope is not None:
            cos, sin = rope
            out = out * cos + torch.roll(out, 1, dims=-1) * sin
        if mask is not None:
            out = out.masked_fill(~mask[..., None], 0.0)
        return self.drop(out) * scale


def make_seq(depth: int, c: int = 4, p: float = 0.0) -> revnet.ReversibleSequence:
    torch.manual_seed(0)
    return revnet.ReversibleSequence([revnet.AdditiveCoupling(Branch(c, p), Branch(c, p), dim=-1)
                                      for _ in range(depth)])


def inputs(c: int = 4, t: int = 5):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, t, 2 * c, dtype=D, generator=g, requires_grad=True)
    encoder = torch.randn(2, 3, c, dtype=D, generator=g, requires_grad=True)
    cos = torch.rand(t, c, dtype=D, generator=g).requires_grad_()
    sin = torch.rand(t, c, dtype=D, generator=g)
    mask = torch.rand(2, t, generator=g) > 0.3
    return x, encoder, (cos, sin), mask


def grads(seq, reversible: bool, x, encoder, rope, mask):
    seq.reversible = reversible
    torch.manual_seed(3)  # the same dropout masks in both runs
    y = seq(x, encoder, rope, mask=mask, scale=0.5)
    w = torch.linspace(-1, 1, y.numel(), dtype=D).view_as(y)
    return torch.autograd.grad((y * w).sum(), [x, encoder, rope[0], *seq.parameters()])


def assert_close(got, ref, tol=1e-10):
    for a, b in zip(got, ref, strict=True):
        assert ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() <= tol


@pytest.mark.parametrize("depth", [3, 4])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_context_gradients_equal_plain_autograd(depth, p):
    seq = make_seq(depth, p=p)
    args = inputs()
    assert_close(grads(seq, True, *args), grads(copy.deepcopy(seq), False, *args))


def test_context_with_stored_blocks_and_in_exact_mode():
    seq = make_seq(5)
    args = inputs()
    ref = grads(copy.deepcopy(seq), False, *args)
    set_stored(seq, ["couplings.1", "couplings.3"])
    assert_close(grads(seq, True, *args), ref)
    revnet.set_exact(seq, True, bits=30)  # float64 stream on the 2^-30 lattice
    plain = copy.deepcopy(seq)
    assert_close(grads(seq, True, *args), grads(plain, False, *args))


def test_context_is_kept_once_not_per_block():
    x, encoder, rope, mask = inputs()
    big = torch.randn(2, 64, 4, dtype=D)  # an encoder output much larger than the stream

    def saved(depth):
        seq = make_seq(depth)
        with SavedBytes(seq) as count:
            seq(x, big, rope, mask=mask)
        return count.total

    assert saved(8) == saved(2)  # the output, the context: nothing per block


def test_inference_and_inverse_take_the_context():
    seq = make_seq(3)
    x, encoder, rope, mask = inputs()
    with torch.no_grad():
        y = seq(x, encoder, rope, mask=mask, scale=0.5)
        back = seq.inverse(y, encoder, rope, mask=mask, scale=0.5)
        seq.reversible = False
        assert torch.equal(seq(x, encoder, rope, mask=mask, scale=0.5), y)
    assert (back - x).abs().max() < 1e-12


def test_a_write_into_the_context_is_reported():
    class Writer(nn.Module):
        def forward(self, h, encoder):
            encoder.mul_(2)
            return h

    seq = revnet.ReversibleSequence([revnet.AdditiveCoupling(Writer(), Writer(), dim=-1)])
    x = torch.randn(2, 3, 8, dtype=D, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"modified a context tensor of shape \(2, 3, 4\) in place"):
        seq(x, torch.randn(2, 3, 4, dtype=D))


def test_recomputed_unit_takes_the_context():
    class Opener(Recomputed, nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 8, dtype=D)

        def forward(self, h, encoder, *, scale=1.0):
            return self.lin(h) * scale + encoder.sum()

    torch.manual_seed(0)
    unit = Opener()
    h = torch.randn(2, 3, 4, dtype=D, requires_grad=True)
    enc = torch.randn(3, dtype=D, requires_grad=True)

    def run(u, rev):
        u.reversible = rev
        return torch.autograd.grad((u(h, enc, scale=0.5) ** 2).sum(), [h, enc, *u.parameters()])

    assert_close(run(unit, True), run(copy.deepcopy(unit), False))


def test_drift_guard_rebuilds_with_the_context():
    seq = make_seq(4)
    x, encoder, rope, mask = inputs()
    rows = DriftGuard(threshold=1e-3).check(seq, lambda m: m(x, encoder, rope, mask=mask), step=0)
    assert rows[0]["drift"][""] < 1e-12  # float64: rebuilt from the output with the same context


def test_compiled_branches_take_the_context():
    seq = make_seq(3)
    args = inputs()
    ref = grads(copy.deepcopy(seq), True, *args)
    revnet.compile(seq, backend="aot_eager")
    assert_close(grads(seq, True, *args), ref, tol=1e-12)
