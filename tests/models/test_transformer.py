"""Reversible transformers: RevTransformer and RevViT against plain autograd, sizes, errors."""

import copy

import pytest
import torch
from conftest import rel_err

import revnet
from revnet.bench.contenders import SavedBytes
from revnet.models import RevTransformer, RevViT, Transformer, VisionTransformer

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
