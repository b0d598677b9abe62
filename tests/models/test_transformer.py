"""Reversible transformers: RevTransformer and RevViT against plain autograd, sizes, errors; context
inputs (masks, RoPE, encoder states) with their gradients."""

import copy

import pytest
import torch
from conftest import rel_err

import revnet
from revnet.bench.contenders import SavedBytes
from revnet.models import RevTransformer, RevViT, Transformer, VisionTransformer
from revnet.models.transformer import AttentionBranch, rope_tables

# Parameter counts at 1000 classes, 224px: timm's vit_*_patch16_224 and RevViT's released configs.
PARAMS_M = {"vit_small": 22.05, "vit_base": 86.57, "vit_large": 304.3, "revvit_small": 22.44,
            "revvit_base": 87.34}


@pytest.mark.parametrize("name", sorted(PARAMS_M))
def test_parameter_count_matches_published(name):
    model = revnet.create_model(name, num_classes=1000, device="meta")  # counts without the memory
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(count / PARAMS_M[name] - 1) < 0.02, count


def test_revvit_large_is_vit_large_with_two_streams():
    def count(name):
        return sum(p.numel() for p in revnet.create_model(name, num_classes=1000, device="meta").parameters())

    rev, vit = count("revvit_large"), count("vit_large")
    # No CLS token (-1024), one position less (-1024), head on 2C (+1024 * 1000), LayerNorm(2C) (+2048).
    assert rev - vit == -2 * 1024 + 1024 * 1000 + 2 * 1024


def run(model, x, *, seed=3, causal_weights=True):
    """Forward and backward with a fixed RNG (the same masks in every mode); output and input grad."""
    torch.manual_seed(seed)
    x = x.detach().clone().requires_grad_()
    y = model(x)
    w = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y) if causal_weights else 1
    (y * w).sum().backward()
    return y.detach(), x.grad


def grads_match(a, b, tol):
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"
        assert rel_err(p.grad, q.grad) <= tol, f"{name}: {rel_err(p.grad, q.grad):.2e}"


@pytest.mark.parametrize("depth", [1, 2, 5])  # odd and even: a forward taking the other half shows
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_rev_transformer_float64_gradients_equal_plain_autograd(depth, causal):
    """With dropout, attention dropout and drop path on: the recomputation replays every mask."""
    model = RevTransformer(16, depth, num_heads=4, drop_rate=0.2, attn_drop_rate=0.2, drop_path_rate=0.3,
                           causal=causal, dtype=torch.float64)
    ref = copy.deepcopy(model)
    ref.reversible = False
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    y, gx = run(model, x)
    y_ref, gx_ref = run(ref, x)
    assert y.shape == (3, 7, 32) and model.out_features == 32
    assert rel_err(y, y_ref) == 0  # the same computation forward
    assert rel_err(gx, gx_ref) <= 1e-9
    grads_match(model, ref, 1e-9)


def test_rev_transformer_keeps_the_engine_rules():
    """Reversible mode saves the same bytes at 2 and 8 blocks; the RNG is left as found."""
    saved = []
    for depth in (2, 8):
        model = RevTransformer(32, depth, num_heads=4, drop_rate=0.1)
        x = torch.randn(2, 10, 32, requires_grad=True)
        with SavedBytes(model) as s:
            y = model(x)
        saved.append(s.total)
        state = torch.get_rng_state()
        y.sum().backward()
        assert torch.equal(state, torch.get_rng_state())
    assert saved[0] == saved[1]


def test_causal_mask_hides_the_future():
    model = RevTransformer(8, 2, num_heads=2, causal=True).eval()
    x = torch.randn(1, 6, 8)
    x2 = x.clone()
    x2[:, 4:] += 1.0  # change only the last tokens
    with torch.no_grad():
        a, b = model(x), model(x2)
    assert torch.equal(a[:, :4], b[:, :4]) and not torch.equal(a[:, 4:], b[:, 4:])


def test_inverse_rebuilds_the_input():
    model = RevTransformer(12, 4, num_heads=3, dtype=torch.float64).eval()
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    stream = torch.cat((x, x), -1)
    with torch.no_grad():
        rebuilt = model.blocks.inverse(model.blocks(stream))
    assert rel_err(rebuilt, stream) < 1e-12


def test_odd_widths_work_with_the_duplicated_stream():
    """Each stream is the full width, so an odd embed_dim (divisible by the heads) is fine."""
    model = RevTransformer(9, 2, num_heads=3, dtype=torch.float64)
    ref = copy.deepcopy(model)
    ref.reversible = False
    x = torch.randn(2, 4, 9, dtype=torch.float64)
    run(model, x)
    run(ref, x)
    grads_match(model, ref, 1e-9)


@pytest.mark.parametrize("tokenizer", ["patch", "conv"])
def test_revvit_under_autocast_exact_mode_and_compile(tokenizer):
    kw = {"img_size": 16, "patch_size": 4, "embed_dim": 16, "depth": 2, "num_heads": 2,
          "tokenizer": tokenizer}
    model = revnet.create_model("revvit_small", **kw)
    x = torch.randn(2, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    y.float().sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    # Exact mode: reversible gradients equal plain autograd's bit for bit.
    exact = revnet.create_model("revvit_small", exact=True, **kw)
    ref = copy.deepcopy(exact)
    ref.reversible = False
    run(exact, x)
    run(ref, x)
    for p, q in zip(exact.parameters(), ref.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)
    # revnet.compile (aot_eager: the tracing without inductor's minutes): the same gradients.
    compiled = revnet.compile(copy.deepcopy(model), backend="aot_eager")
    model.zero_grad()
    run(model, x)
    run(compiled, x)
    grads_match(compiled, model, 1e-5)


def test_vit_classes_and_set_reversible():
    vit = revnet.create_model("vit_mini")
    rev = revnet.create_model("revvit_mini")
    assert isinstance(vit, VisionTransformer) and isinstance(vit.transformer, Transformer)
    assert isinstance(rev, RevViT) and rev.reversible
    assert revnet.set_reversible(rev, False) == 1 and not rev.reversible
    assert revnet.set_reversible(vit, True) == 0  # nothing reversible in the residual ViT
    x = torch.randn(2, 3, 28, 28)
    assert vit(x).shape == rev(x).shape == (2, 10)
    assert revnet.create_model("revvit_mini", in_chans=1)(torch.randn(2, 1, 28, 28)).shape == (2, 10)


# --- context: masks, RoPE, encoder states -------------------------------------------

B, T, S, C, HEADS, C_ENC = 3, 7, 5, 16, 4, 12


def make_context(case, dtype=torch.float64):
    """Context tensors for ``case``, fresh leaves (those that take gradients require them)."""
    g = torch.Generator().manual_seed(11)
    if case == "causal_padding":  # sample 0 right-padded, sample 2 left-padded (rows that see nothing)
        pad = torch.zeros(B, T, dtype=torch.bool)
        pad[0, 5:] = True
        pad[2, :2] = True
        return {"key_padding_mask": pad}
    if case == "float_mask":  # a learned additive bias per head (ALiBi-like), causal mask and padding
        pad = torch.zeros(B, T, dtype=torch.bool)
        pad[1, 6:] = True
        bias = (0.3 * torch.randn(HEADS, T, T, generator=g, dtype=dtype)).requires_grad_()
        return {"attn_mask": bias, "key_padding_mask": pad}
    if case == "rope":  # the tables require grad too: they are context tensors like any other
        cos, sin = rope_tables(T, C // HEADS, dtype=dtype)
        return {"rope": (cos.requires_grad_(), sin.requires_grad_()),
                "attn_mask": torch.ones(T, T, dtype=torch.bool).tril()}
    if case == "cross":
        pad = torch.zeros(B, S, dtype=torch.bool)
        pad[1, 3:] = True
        return {"encoder": torch.randn(B, S, C_ENC, generator=g, dtype=dtype).requires_grad_(),
                "encoder_padding_mask": pad}
    raise AssertionError(case)


def context_tensors(ctx):
    out = []
    for v in ctx.values():
        out.extend(v if isinstance(v, tuple) else [v])
    return [t for t in out if t.requires_grad]


def run_with_context(model, x, ctx, seed=3):
    torch.manual_seed(seed)
    x = x.detach().clone().requires_grad_()
    y = model(x, **ctx)
    w = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
    (y * w).sum().backward()
    return y.detach(), x.grad, [t.grad for t in context_tensors(ctx)]


@pytest.mark.parametrize("depth", [1, 2, 3])  # odd and even
@pytest.mark.parametrize("case", ["causal_padding", "float_mask", "rope", "cross"])
def test_context_gradients_equal_plain_autograd(case, depth):
    """Tokens, every parameter and every context tensor: reversible == plain autograd (float64),
    with dropout, attention dropout and drop path on."""
    model = RevTransformer(C, depth, num_heads=HEADS, drop_rate=0.2, attn_drop_rate=0.2, drop_path_rate=0.3,
                           causal=case in ("causal_padding", "float_mask", "cross"),
                           cross_attention=case == "cross", encoder_dim=C_ENC, dtype=torch.float64)
    ref = copy.deepcopy(model)
    ref.reversible = False
    x = torch.randn(B, T, C, dtype=torch.float64)
    y, gx, gctx = run_with_context(model, x, make_context(case))
    y_ref, gx_ref, gctx_ref = run_with_context(ref, x, make_context(case))
    assert torch.isfinite(y).all() and torch.isfinite(gx).all()
    assert rel_err(y, y_ref) == 0
    assert rel_err(gx, gx_ref) <= 1e-10
    grads_match(model, ref, 1e-10)
    assert len(gctx) == len(gctx_ref) == (0 if case == "causal_padding" else len(gctx))
    for g, g_ref in zip(gctx, gctx_ref, strict=True):
        assert g is not None and g.abs().sum() > 0
        assert rel_err(g, g_ref) <= 1e-10


def test_residual_and_reversible_take_the_same_context():
    """Transformer (residual) runs the same branches with the same context; a decoder block is
    x + SA(x), + CA(.), + MLP(.)."""
    torch.manual_seed(0)
    res = Transformer(C, 2, num_heads=HEADS, causal=True, cross_attention=True, encoder_dim=C_ENC,
                      dtype=torch.float64)
    ctx = make_context("cross")
    x = torch.randn(B, T, C, dtype=torch.float64)
    y = res(x, **ctx)
    h = x
    for blk in res.blocks:
        h = h + blk.attn.self_attn(h)
        h = h + blk.attn.cross_attn(h, **ctx)
        h = h + blk.mlp(h)
    assert rel_err(y, res.norm(h)) < 1e-12
    y.sum().backward()
    assert ctx["encoder"].grad is not None
    rev = RevTransformer(C, 2, num_heads=HEADS, causal=True, cross_attention=True, encoder_dim=C_ENC,
                         fuse="mean", dtype=torch.float64)
    assert rev(x, **ctx).shape == (B, T, C) and rev.out_features == C
    assert sum(p.numel() for p in rev.parameters()) == sum(p.numel() for p in res.parameters())


def test_key_padding_hides_padded_tokens():
    torch.manual_seed(0)
    model = RevTransformer(8, 2, num_heads=2).eval()
    x = torch.randn(2, 6, 8)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[:, 4:] = True
    x2 = x.clone()
    x2[:, 4:] += torch.randn(2, 2, 8)  # not a constant: LayerNorm would take a shift of every channel away
    with torch.no_grad():
        a, b = model(x, key_padding_mask=pad), model(x2, key_padding_mask=pad)
    assert torch.allclose(a[:, :4], b[:, :4], atol=1e-6) and not torch.allclose(a[:, 4:], b[:, 4:])


def test_rope_depends_on_relative_positions_only():
    """The same tokens at positions 0.. and 5..: RoPE's scores, hence the outputs, are equal."""
    attn = AttentionBranch(16, 2, dtype=torch.float64).eval()
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    a = attn(x, rope=rope_tables(6, 8, dtype=torch.float64))
    b = attn(x, rope=rope_tables(6, 8, offset=5, dtype=torch.float64))
    assert rel_err(a, b) < 1e-12 and rel_err(a, attn(x)) > 1e-3
    with pytest.raises(ValueError, match="head_dim must be even"):
        rope_tables(6, 7)


def test_autocast_with_context():
    model = RevTransformer(16, 2, num_heads=2, causal=True)
    x = torch.randn(2, 6, 16)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 4:] = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x, key_padding_mask=pad, rope=rope_tables(6, 8))
    y.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# --- bad input ------------------------------------------------------------------------

def test_heads_not_dividing_the_width_named():
    with pytest.raises(ValueError, match=r"embed_dim 100 is not divisible by num_heads 6.*e\.g\. 5"):
        revnet.create_model("revvit_small", embed_dim=100)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        RevTransformer(10, 2, num_heads=4)


def test_image_not_divisible_by_patch_named():
    with pytest.raises(ValueError, match=r"img_size 30 is not divisible by patch_size 16.*resize or crop"):
        revnet.create_model("vit_small", img_size=30)


def test_cls_token_request_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"no CLS token.*class_token=False.*vit_"):
        revnet.create_model("revvit_base", class_token=True, device="meta")
    with pytest.raises(ValueError, match="no CLS token"):
        revnet.create_model("revvit_small", global_pool="token", device="meta")


def test_wrong_image_or_token_shape_named():
    model = revnet.create_model("revvit_mini")
    with pytest.raises(ValueError, match=r"expects images of shape \(B, 3, 28, 28\), got \(2, 3, 32, 32\)"):
        model(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"tokens of shape \(B, T, 16\), got \(2, 5, 12\)"):
        RevTransformer(16, 1, num_heads=2)(torch.randn(2, 5, 12))


def test_bad_context_named_with_shapes_and_fix():
    model = RevTransformer(8, 1, num_heads=2, causal=True)
    x = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match=r"attn_mask has shape \(2, 4, 4\).*"
                                         r"\(B, heads, T, T\) = \(2, 2, 5, 5\).*"
                                         r"Fix: pass \(T, T\) = \(5, 5\)"):
        model(x, attn_mask=torch.ones(2, 4, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"attn_mask must be a bool tensor.*got torch.int64.*mask.bool\(\)"):
        model(x, attn_mask=torch.ones(5, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"key_padding_mask has shape \(2, 4\), "
                                         r"expected \(B, T\) = \(2, 5\)"):
        model(x, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"key_padding_mask must be a bool tensor.*torch.float32"):
        Transformer(8, 1, num_heads=2)(x, key_padding_mask=torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"rope's cos table has shape \(6, 4\).*\(T, head_dim\) = \(5, 4\)"):
        model(x, rope=rope_tables(6, 4))
    with pytest.raises(TypeError, match=r"rope must be the tables \(cos, sin\)"):
        model(x, rope=torch.ones(5, 4))
    with pytest.raises(ValueError, match=r"encoder= was given but the model has no cross-attention.*"
                                         r"cross_attention=True"):
        model(x, encoder=torch.randn(2, 3, 8))
    dec = RevTransformer(8, 1, num_heads=2, cross_attention=True, encoder_dim=6)
    with pytest.raises(ValueError, match=r"encoder has shape \(3, 4, 6\), expected \(B, S, encoder_dim\) = "
                                         r"\(B=2, S, 6\) with the tokens' batch B=2"):
        dec(x, encoder=torch.randn(3, 4, 6))
    with pytest.raises(ValueError, match=r"encoder has shape \(2, 4, 8\).*build with encoder_dim="):
        dec(x, encoder=torch.randn(2, 4, 8))
    with pytest.raises(ValueError, match=r"needs the encoder's states.*\(B, S, 6\)"):
        dec(x)
    with pytest.raises(ValueError, match=r"encoder_padding_mask has shape \(2, 3\), "
                                         r"expected \(B, S\) = \(2, 4\)"):
        dec(x, encoder=torch.randn(2, 4, 6), encoder_padding_mask=torch.zeros(2, 3, dtype=torch.bool))
