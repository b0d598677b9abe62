"""The reversible backward against plain autograd on the same weights."""

import copy

import pytest
import torch
from conftest import rel_err
from torch import nn

import revnet
from revnet.engine.reversible import _KeepOutput, _ReversibleBlock


def make_seq(blocks: int = 3, c: int = 4, *, bn: bool = True, dropout: float = 0.0,
             dtype=torch.float64, **kw) -> revnet.ReversibleSequence:
    def branch():
        layers = [nn.BatchNorm2d(c)] if bn else []
        layers += [nn.Conv2d(c, c, 3, padding=1), nn.Tanh()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Conv2d(c, c, 3, padding=1))
        return nn.Sequential(*layers)

    seq = revnet.ReversibleSequence(
        [revnet.AdditiveCoupling(branch(), branch()) for _ in range(blocks)], **kw)
    return seq.to(dtype)


def run(seq, x, reversible: bool, seed: int | None = None):
    """One forward/backward; returns output, input grad, param grads (fresh copies)."""
    seq.reversible = reversible
    seq.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    if seed is not None:
        torch.manual_seed(seed)
    y = seq(x)
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
    return y.detach(), x.grad, [p.grad.clone() for p in seq.parameters()]


def assert_same(a, b, tol):
    ya, xa, pa = a
    yb, xb, pb = b
    assert rel_err(ya, yb) < tol
    assert rel_err(xa, xb) < tol
    assert len(pa) == len(pb)
    for ga, gb in zip(pa, pb, strict=True):
        assert rel_err(ga, gb) < tol


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_reversible_equals_plain_autograd(dtype, tol):
    seq = make_seq(4, dtype=dtype)
    x = torch.randn(4, 8, 6, 6, dtype=dtype)
    ref = run(copy.deepcopy(seq), x, reversible=False)
    got = run(seq, x, reversible=True)
    assert_same(got, ref, tol)


def test_graph_is_one_node_per_block_plus_the_output():
    seq = make_seq(16)
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64, requires_grad=True)
    node, names = seq(x).grad_fn, []
    while node is not None and type(node).__name__ != "AccumulateGrad":
        names.append(type(node).__name__)
        node = node.next_functions[0][0]
    # then the split of the input into dense halves (a copy of the strided half), which saves nothing
    assert names[:17] == [_KeepOutput.__name__ + "Backward"] + [_ReversibleBlock.__name__ + "Backward"] * 16
    assert names[17:] == ["CloneBackward0", "SplitBackward0"]


def saved_bytes(seq, x) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = seq(x)  # what the forward keeps for backward
    y.sum().backward()
    return total


def test_saved_bytes_do_not_grow_with_length():
    x = torch.randn(2, 8, 8, 8, dtype=torch.float64, requires_grad=True)
    rev1, rev16 = saved_bytes(make_seq(1), x), saved_bytes(make_seq(16), x)
    plain1 = saved_bytes(make_seq(1, reversible=False), x)
    plain16 = saved_bytes(make_seq(16, reversible=False), x)
    assert rev1 == rev16 == x.numel() * x.element_size()  # the output alone
    assert plain16 > 12 * plain1  # linear in depth
    assert plain1 > rev1


def test_gradcheck_small_sequence():
    seq = make_seq(2, c=2, bn=False)
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    params = list(seq.parameters())

    def fn(x, *ps):
        with torch.nn.utils.stateless._reparametrize_module(
            seq, {n: p for (n, _), p in zip(seq.named_parameters(), ps, strict=True)}
        ):
            return seq(x)

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-5)


def test_gradcheck_affine_coupling():
    def br():
        return nn.Sequential(nn.Conv2d(2, 4, 1), nn.Tanh())

    seq = revnet.ReversibleSequence([revnet.AffineCoupling(br(), br()) for _ in range(2)]).double()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(seq, (x,), eps=1e-6, atol=1e-5)
    ref = run(copy.deepcopy(seq), x, reversible=False)
    assert_same(run(seq, x, reversible=True), ref, 1e-10)


def test_batchnorm_stats_updated_exactly_once():
    seq = make_seq(3)
    plain = copy.deepcopy(seq)
    x = torch.randn(4, 8, 5, 5, dtype=torch.float64)
    run(seq, x, reversible=True)
    run(plain, x, reversible=False)
    for (name, a), (_, b) in zip(seq.named_buffers(), plain.named_buffers(), strict=True):
        assert torch.equal(a, b), name
        if name.endswith("num_batches_tracked"):
            assert a.item() == 1


def test_dropout_masks_replayed():
    seq = make_seq(3, dropout=0.5)
    x = torch.randn(4, 8, 5, 5, dtype=torch.float64)
    ref = run(copy.deepcopy(seq), x, reversible=False, seed=123)
    got = run(seq, x, reversible=True, seed=123)
    assert_same(got, ref, 1e-10)
    # Without the replay, the masks of the recomputation differ and so do the gradients.
    seq.preserve_rng_state = False
    bad = run(seq, x, reversible=True, seed=123)
    assert rel_err(bad[2][0], ref[2][0]) > 1e-3


def test_backward_leaves_the_callers_rng_untouched():
    seq = make_seq(2, dropout=0.5)
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64, requires_grad=True)
    y = seq(x)
    before = torch.get_rng_state()
    y.sum().backward()
    assert torch.equal(torch.get_rng_state(), before)


def test_bf16_autocast_on_cpu():
    seq = make_seq(4, dtype=torch.float32)
    x = torch.randn(4, 8, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run(seq, x, reversible=True)
        ref = run(copy.deepcopy(seq), x, reversible=False)
    assert got[0].dtype == torch.float32  # the residual stream stays in the input's dtype
    # Tolerance: bf16 keeps 8 mantissa bits (relative step 2^-8 = 3.9e-3); the rebuilt
    # inputs differ from the stored ones by fp32 rounding, amplified through bf16 convs.
    assert_same(got, ref, 2e-2)


def test_autograd_grad_and_hooks():
    seq = make_seq(3)
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64, requires_grad=True)
    params = list(seq.parameters())
    fired = []
    handle = params[0].register_hook(lambda g: fired.append(g.shape))
    grads = torch.autograd.grad(seq(x).square().sum(), [x, *params])
    handle.remove()
    assert fired == [params[0].shape]
    assert all(p.grad is None for p in params)  # nothing written as a side effect
    ref = copy.deepcopy(seq)
    ref.reversible = False
    x2 = x.detach().requires_grad_()
    ref_grads = torch.autograd.grad(ref(x2).square().sum(), [x2, *ref.parameters()])
    for a, b in zip(grads, ref_grads, strict=True):
        assert rel_err(a, b) < 1e-10


def test_gradient_accumulation_over_two_steps():
    seq = make_seq(3)
    ref = copy.deepcopy(seq)
    ref.reversible = False
    xs = [torch.randn(2, 8, 4, 4, dtype=torch.float64) for _ in range(2)]
    for m in (seq, ref):
        for x in xs:
            m(x).square().sum().backward()
    for a, b in zip(seq.parameters(), ref.parameters(), strict=True):
        assert rel_err(a.grad, b.grad) < 1e-10


def test_second_backward():
    seq = make_seq(2)
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64, requires_grad=True)
    loss = seq(x).sum()
    loss.backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()
    # With retain_graph=True a second backward works and adds the same gradients again.
    seq.zero_grad()
    loss = seq(x).sum()
    loss.backward(retain_graph=True)
    first = [p.grad.clone() for p in seq.parameters()]
    loss.backward()
    for g, p in zip(first, seq.parameters(), strict=True):
        assert rel_err(p.grad, 2 * g) < 1e-12


def test_double_backward_is_refused_clearly():
    seq = make_seq(1, bn=False)
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(seq(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|double backward|twice"):
        g.sum().backward()


def test_no_grad_runs_plain_forward():
    seq = make_seq(3)
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        y = seq(x)
    assert y.grad_fn is None
    seq.reversible = False
    with torch.no_grad():
        assert torch.equal(y, seq(x))


def test_frozen_params_and_input_without_grad():
    seq = make_seq(3)
    for p in seq[0].f.parameters():
        p.requires_grad_(False)
    ref = copy.deepcopy(seq)
    ref.reversible = False
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64)  # does not require grad
    for m in (seq, ref):
        m(x).square().sum().backward()
    for a, b in zip(seq.parameters(), ref.parameters(), strict=True):
        if not a.requires_grad:
            assert a.grad is None and b.grad is None
        else:
            assert rel_err(a.grad, b.grad) < 1e-10


def test_shared_weights_accumulate():
    f = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.Tanh())
    g = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.Tanh())
    seq = revnet.ReversibleSequence([revnet.AdditiveCoupling(f, g) for _ in range(3)]).double()
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    ref = run(copy.deepcopy(seq), x, reversible=False)
    assert_same(run(seq, x, reversible=True), ref, 1e-10)


def test_eval_mode_with_grad():
    seq = make_seq(3)
    seq.train()
    seq(torch.randn(4, 8, 4, 4, dtype=torch.float64))  # give BN running stats
    seq.eval()
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    ref = run(copy.deepcopy(seq), x, reversible=False)
    assert_same(run(seq, x, reversible=True), ref, 1e-10)


def test_inverse_rebuilds_input():
    seq = make_seq(5, bn=False)
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        assert (seq.inverse(seq(x)) - x).abs().max().item() < 1e-12


def test_inplace_change_of_output_is_caught():
    seq = make_seq(2)
    y = seq(torch.randn(2, 8, 4, 4, dtype=torch.float64, requires_grad=True))
    y.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_set_reversible_flips_every_sequence():
    model = nn.Sequential(make_seq(1), nn.Identity(), make_seq(2))
    assert revnet.set_reversible(model, False) == 2
    assert not any(m.reversible for m in model if isinstance(m, revnet.ReversibleSequence))
    assert revnet.set_reversible(model, True) == 2
    assert all(m.reversible for m in model if isinstance(m, revnet.ReversibleSequence))


# --- bad input ------------------------------------------------------------------------

def test_non_coupling_rejected():
    with pytest.raises(TypeError, match=r"item 1 is a Conv2d, not a coupling.*AdditiveCoupling"):
        revnet.ReversibleSequence([make_seq(1)[0], nn.Conv2d(2, 2, 1)])


def test_empty_and_mixed_dims_rejected():
    with pytest.raises(ValueError, match="at least one coupling"):
        revnet.ReversibleSequence([])
    a = revnet.AdditiveCoupling(nn.Identity(), nn.Identity(), dim=1)
    b = revnet.AdditiveCoupling(nn.Identity(), nn.Identity(), dim=2)
    with pytest.raises(ValueError, match="different dims"):
        revnet.ReversibleSequence([a, b])


def test_coupling_parameters_outside_branches_rejected():
    c = revnet.AdditiveCoupling(nn.Identity(), nn.Identity())
    c.extra = nn.Parameter(torch.zeros(1))
    with pytest.raises(ValueError, match="outside its F and G"):
        revnet.ReversibleSequence([c])


def test_odd_channels_in_sequence():
    seq = make_seq(1)
    with pytest.raises(ValueError, match=r"ReversibleSequence.*\(2, 7, 4, 4\).*odd"):
        seq(torch.randn(2, 7, 4, 4, dtype=torch.float64, requires_grad=True))


# --- one Function per block: gradients leave as each block finishes --------------------

def test_each_blocks_gradients_leave_before_the_previous_block_is_recomputed():
    seq = make_seq(3)
    events = []
    seq[0].f.register_forward_pre_hook(
        lambda m, a: events.append("recompute block 0") if torch.is_grad_enabled() else None)
    seq[2].g[-1].weight.register_post_accumulate_grad_hook(lambda p: events.append("grad of block 2"))
    seq[0].f[-1].weight.register_post_accumulate_grad_hook(lambda p: events.append("grad of block 0"))
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64, requires_grad=True)
    seq(x).sum().backward()
    assert events == ["grad of block 2", "recompute block 0", "grad of block 0"]


def test_backward_of_a_block_out_of_order_is_refused():
    seq = make_seq(2)
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64, requires_grad=True)
    y = seq(x)
    first_block = y.grad_fn.next_functions[0][0].next_functions[0][0]
    with pytest.raises(RuntimeError, match="Backward must start from the sequence's output"):
        first_block.apply(torch.ones(2, 4, 5, 5, dtype=torch.float64),
                          torch.ones(2, 4, 5, 5, dtype=torch.float64))


# --- Recomputed: a non-invertible unit that keeps only its input ----------------------

class Opener(revnet.Recomputed, nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.3),
                                  nn.Conv2d(4, 8, 3, stride=2, padding=1))

    def forward(self, x):
        return self.body(x) + torch.tanh(x[:, :, ::2, ::2]).repeat(1, 2, 1, 1)


def test_recomputed_unit_equals_plain_and_keeps_only_its_input():
    torch.manual_seed(0)
    unit = Opener().double()
    plain = copy.deepcopy(unit)
    plain.reversible = False
    x = torch.randn(4, 4, 6, 6, dtype=torch.float64)
    hooks = []
    unit.body[-1].weight.register_hook(lambda g: hooks.append(g))
    got = run(unit, x, reversible=True, seed=7)
    ref = run(plain, x, reversible=False, seed=7)
    assert_same(got, ref, 1e-12)  # dropout mask replayed, same gradients
    assert len(hooks) == 1  # the parameter's hook fired once
    for (name, a), b in zip(unit.named_buffers(), plain.buffers(), strict=True):
        assert torch.equal(a, b), name  # BatchNorm statistics updated once
    xi = x.clone().requires_grad_()
    assert saved_bytes(unit, xi) == xi.numel() * xi.element_size()
    assert revnet.set_reversible(unit, False) == 1 and not unit.reversible


def test_revnet_stage_openers_are_recomputed():
    model = revnet.create_model("revnet38", dtype=torch.float64)
    openers = [m for m in model.modules() if isinstance(m, revnet.Recomputed)]
    assert len(openers) == 2 and all(m.reversible for m in openers)
    model.reversible = False
    assert not any(m.reversible for m in openers) and not model.reversible


def test_fsdp_unit_inside_a_sequence_is_refused(monkeypatch):
    import sys
    import types

    class FakeFSDPModule:  # stands for torch.distributed.fsdp.FSDPModule (needs a process group)
        pass

    fake = types.SimpleNamespace(FSDPModule=FakeFSDPModule)
    monkeypatch.setitem(sys.modules, "torch.distributed.fsdp", fake)
    seq = make_seq(2)
    branch = seq[1].g
    branch.__class__ = type("ShardedBranch", (FakeFSDPModule, type(branch)), {})
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"couplings\.1\.g is an FSDP unit"):
        seq(x)
    seq.reversible = False
    seq(x).sum().backward()  # plain autograd is FSDP's own business


def test_bf16_stream_is_kept_in_float32_under_autocast():
    """A bf16 input (a stem under autocast returns bf16) must not make the stream bf16: its
    rebuild would lose ~1% per block and deep stacks would backprop through noise."""
    torch.manual_seed(0)
    seq = make_seq(16, dtype=torch.float32)
    x = torch.randn(4, 8, 6, 6).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run(seq, x, reversible=True)
        ref = run(copy.deepcopy(seq), x, reversible=False)
    assert got[0].dtype == torch.float32
    assert got[1].dtype == torch.bfloat16  # the input's gradient in the input's dtype
    assert_same(got, ref, 2e-2)


def test_branches_take_the_float32_stream_in_the_autocast_dtype():
    seen = []
    seq = make_seq(2, dtype=torch.float32)
    seq[0].f.register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype))
    x = torch.randn(2, 8, 5, 5).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = seq(x)
    assert y.dtype == torch.float32 and seen == [torch.bfloat16]  # stream float32, F's input bf16
    seen.clear()
    seq(torch.randn(2, 8, 5, 5)).sum().backward()  # outside autocast: float32 throughout
    assert seen == [torch.float32, torch.float32]  # forward and the backward's recomputation


# --- per-block mode: stored blocks among rebuilt ones -------------------------------------

@pytest.mark.parametrize("mask", [m for m in range(32)], ids=lambda m: format(m, "05b"))
def test_any_mix_of_stored_and_rebuilt_blocks_equals_plain_autograd(mask):
    """Every subset of 5 blocks stored (BatchNorm, dropout): gradients, output and running
    statistics equal plain autograd's in float64."""
    seq = make_seq(5, dropout=0.2)
    ref = copy.deepcopy(seq)
    for k, c in enumerate(seq.couplings):
        c.stored = bool(mask >> k & 1)
    x = torch.randn(3, 8, 5, 5, dtype=torch.float64)
    got = run(seq, x, reversible=True, seed=4)
    want = run(ref, x, reversible=False, seed=4)
    assert_same(got, want, 1e-12)
    for a, b in zip(seq.buffers(), ref.buffers(), strict=True):
        assert torch.equal(a, b)


def test_stored_blocks_keep_their_activations_and_rebuilt_ones_do_not():
    from revnet.bench.contenders import SavedBytes

    def saved(stored: set[int]) -> int:
        seq = make_seq(6, c=8, dtype=torch.float32)
        for k, c in enumerate(seq.couplings):
            c.stored = k in stored
        with SavedBytes(seq) as s:
            seq(torch.randn(4, 16, 8, 8, requires_grad=True))
        return s.total

    none, two, four, every = saved(set()), saved({1, 4}), saved({0, 1, 4, 5}), saved(set(range(6)))
    assert none < two < four < every
    plain = make_seq(6, c=8, dtype=torch.float32, reversible=False)
    with SavedBytes(plain) as s:
        plain(torch.randn(4, 16, 8, 8, requires_grad=True))
    assert every == s.total  # all stored: exactly plain autograd's graph
