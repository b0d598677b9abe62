"""Every registered model: the paper's parameter counts, reversible == plain autograd."""

import copy

import pytest
import torch
from conftest import rel_err
from torch import nn

import revnet
from revnet.models import model_accepts, register_model

IMAGE_MODELS = [n for n in revnet.list_models() if not model_accepts(n, "vocab_size")]  # not the LMs

PAPER_PARAMS_M = {  # Gomez et al. 2017, Table 1 (CIFAR at 10 classes, ImageNet at 1000)
    "resnet32": 0.46, "revnet38": 0.46, "resnet110": 1.73, "revnet110": 1.73,
    "resnet164": 1.70, "revnet164": 1.75, "resnet101": 44.5, "revnet104": 45.2,
}
IMAGENET = {"resnet101", "revnet104"}
# The transformers at 224px are too big for a CPU test in float64: the same classes at a small
# width, an odd depth (3) and every random layer on, so the replay of their masks is tested too.
SMALL_VIT = {"img_size": 16, "patch_size": 4, "embed_dim": 24, "depth": 3, "num_heads": 2,
             "drop_rate": 0.1, "attn_drop_rate": 0.1, "drop_path_rate": 0.2}
CPU_VIT = {"drop_rate": 0.1, "attn_drop_rate": 0.1, "drop_path_rate": 0.2}  # the *_mini models, as they are


def small(name: str, **kw):
    """A registered model at a size a float64 CPU test can run, and its input's side."""
    if name.endswith("_mini"):
        return revnet.create_model(name, in_chans=3, **CPU_VIT, **kw), 28
    if "vit" in name:
        return revnet.create_model(name, **SMALL_VIT, **kw), 16
    return revnet.create_model(name, **kw), 32 if name in IMAGENET else 16


def test_registry_has_the_papers_models():
    assert set(PAPER_PARAMS_M) <= set(revnet.list_models())


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS_M))
def test_parameter_count_matches_paper(name):
    model = revnet.create_model(name, num_classes=1000 if name in IMAGENET else 10)
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(count / PAPER_PARAMS_M[name] - 1) < 0.02, count


def step(model: nn.Module, x: torch.Tensor, reversible: bool):
    revnet.set_reversible(model, reversible)
    model.train()
    torch.manual_seed(1)  # the same dropout and drop-path masks in every run
    x = x.detach().clone().requires_grad_()
    y = model(x)
    # A loss that weighs every logit differently, so no gradient is trivially symmetric.
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
    return y.detach(), x.grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_reversible_equals_plain_autograd(name, dtype):
    """float64: reversible == plain autograd to 1e-10. float32: both are compared with the
    float64 truth, and the reversible path must be about as accurate as plain autograd (at
    batch 4 and tiny resolutions a deep bottleneck net is ill-conditioned: plain float32
    itself can be 1% off there, so a fixed reversible-vs-plain tolerance tests luck; and a
    rebuilt ReLU input within rounding of 0 may flip, see below)."""
    model, size = small(name, dtype=torch.float64)
    x = torch.randn(4, 3, size, size, dtype=torch.float64)
    truth = copy.deepcopy(model)
    y_t, gx_t = step(truth, x, reversible=False)
    model, ref = model.to(dtype), copy.deepcopy(model).to(dtype)
    units = revnet.set_reversible(model, True)
    assert (units > 0) == name.startswith("rev")
    y, gx = step(model, x.to(dtype), reversible=True)
    y_ref, gx_ref = step(ref, x.to(dtype), reversible=False)
    named = list(zip(model.named_parameters(), ref.parameters(), truth.parameters(), strict=True))
    for (pname, p), *_ in named:
        assert p.grad is not None, f"{name}: {pname} got no gradient"
        assert p.grad.abs().sum() > 0, f"{name}: {pname} got a zero gradient"
    if dtype == torch.float64:
        pairs = [(y, y_ref), (gx, gx_ref), *((p.grad, q.grad) for (_, p), q, _ in named)]
        assert max(rel_err(a, b) for a, b in pairs) < 1e-10
    else:
        assert rel_err(y, y_ref) == 0  # the forward is the same computation
        rev = [rel_err(gx, gx_t), *(rel_err(p.grad, t.grad) for (_, p), _, t in named)]
        plain = [rel_err(gx_ref, gx_t), *(rel_err(q.grad, t.grad) for _, q, t in named)]
        labels = ["input", *(n for (n, _), *_ in named)]
        # The rebuilt activations differ from the forward's by float32 rounding (~1e-6), so a ReLU
        # input that close to 0 can change sign: that one element's gradient passes or stops, and
        # the few tensors behind it move by ~1e-2 (seen on RevNet-38 here: one flip at a BatchNorm
        # output of -5e-7 forward, +6e-7 rebuilt). So: the typical tensor as accurate as plain
        # float32 (drift would move them all), at most a tenth of them off, none by over 5% more.
        off = [(r - 3 * p_, f"{lab}: reversible {r:.1e} vs plain float32 {p_:.1e}")
               for r, p_, lab in zip(rev, plain, labels, strict=True) if r > 3 * p_ + 1e-5]
        assert len(off) <= len(rev) // 10, f"{name}: {len(off)} of {len(rev)} tensors: {off}"
        assert all(excess < 0.05 for excess, _ in off), f"{name}: {off}"
    for (bname, a), b in zip(model.named_buffers(), ref.buffers(), strict=True):
        assert torch.equal(a, b), f"{name}: buffer {bname} differs after one step"


def test_fashion_mnist_shape_and_model_property():
    model = revnet.create_model("revnet38", in_chans=1)
    assert model.reversible
    model.reversible = False
    assert not model.reversible
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_revnet_sequences_hold_the_reversible_units():
    model = revnet.create_model("revnet38")
    sequences = [m for m in model.modules() if isinstance(m, revnet.ReversibleSequence)]
    # Stage 1 keeps its width (32 -> 32): all 3 units reversible; stages 2-3 open with a
    # non-reversible downsampling unit, then 2 reversible units each.
    assert [len(s) for s in sequences] == [3, 2, 2]


# --- bad input ------------------------------------------------------------------------

def test_unknown_model_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown model 'revnet39'.*revnet38"):
        revnet.create_model("revnet39")


def test_duplicate_registration_raises():
    with pytest.raises(ValueError, match="already registered"):
        @register_model
        def revnet38(**kw):  # noqa: F811
            return nn.Identity()


def test_wrong_input_channels_named():
    model = revnet.create_model("revnet38", in_chans=1)
    with pytest.raises(ValueError, match=r"input has 3 channels.*in_chans=1.*in_chans=3"):
        model(torch.randn(2, 3, 28, 28))


def test_bad_config_errors():
    with pytest.raises(ValueError, match="even widths"):
        revnet.RevNet(units=(1,), channels=(32, 33))
    with pytest.raises(ValueError, match="unknown block"):
        revnet.RevNet(units=(1,), channels=(32, 32), block="wide")
    with pytest.raises(ValueError, match="one width per stage"):
        revnet.ResNet(units=(1, 1), channels=(16, 16))
