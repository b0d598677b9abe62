"""revnet.convert on the zoo's transformers and a user's own block: the same function at gamma = 0,
reversible gradients equal plain autograd's on the same weights, the original state-dict keys, and
the errors a user meets."""

import copy

import pytest
import torch
from conftest import rel_err
from torch import nn

import revnet
from revnet.conversion import ConvertedStack, converted_stacks, reconstruction_error, set_gamma


def grads_of(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss_fn(model).backward()
    return [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def grad_error(a, b):
    """Relative error of all gradients as one vector, and the worst per-tensor error among tensors
    whose gradient is not negligible (a key projection's bias has a gradient of zero up to rounding)."""
    flat = rel_err(torch.cat([g.flatten() for g in a]), torch.cat([g.flatten() for g in b]))
    scale = max(float(g.norm()) for g in b)
    worst = max(float((x - y).norm()) / max(float(y.norm()), 1e-6 * scale) for x, y in zip(a, b, strict=True))
    return max(flat, worst)


def lm(kind="gpt_mini"):
    torch.manual_seed(0)
    return revnet.create_model(kind, vocab_size=64, context_length=16, embed_dim=32, depth=3, num_heads=4,
                               dtype=torch.float64)


def tokens(b=2, t=12):
    return torch.randint(0, 64, (b, t), generator=torch.Generator().manual_seed(1))


def test_gamma_zero_is_the_original_model_and_the_report_says_what_moved():
    model, x = lm(), tokens()
    ref = model(x)
    converted = revnet.convert(copy.deepcopy(model), gamma=0.0, example=x)
    assert rel_err(converted(x), ref) <= 1e-12
    report = converted.revnet_conversion
    assert report.stacks == [("transformer.blocks", "TransformerBlock", 3, 6)]
    assert report.output_difference <= 1e-12 and report.reconstruction_error is None
    moved = revnet.convert(copy.deepcopy(model), gamma=0.9, example=x).revnet_conversion
    assert moved.output_difference > 1e-3 and moved.reconstruction_error <= 1e-12
    assert "momentum (gamma=0.9)" in str(moved)
    # two-stream: one coupling per two branches; gamma 0 the original too; exact mode rebuilds exactly
    zero = revnet.convert(copy.deepcopy(model), method="two-stream", gamma=0.0, example=x).revnet_conversion
    assert zero.stacks == [("transformer.blocks", "TransformerBlock", 3, 3)]
    assert zero.output_difference <= 1e-12
    exact = revnet.convert(copy.deepcopy(model), method="two-stream", gamma=0.25, exact=True,
                           example=x).revnet_conversion
    assert exact.reconstruction_error == 0.0 and "two-stream (gamma=0.25, exact)" in str(exact)


@pytest.mark.parametrize("method,exact", [("momentum", False), ("two-stream", False), ("two-stream", True)])
@pytest.mark.parametrize("kind", ["gpt_mini", "vit_mini"])
def test_reversible_gradients_equal_plain_autograd_float64(kind, method, exact):
    if kind == "gpt_mini":
        model, x = lm(), tokens()
        loss_fn = lambda m: m(x, targets=x)  # noqa: E731
        mask = torch.zeros(2, 12, dtype=torch.bool)
        mask[1, 9:] = True
        loss_fns = [loss_fn, lambda m: m(x, key_padding_mask=mask).square().mean()]
    else:
        torch.manual_seed(0)
        model = revnet.create_model("vit_mini", num_classes=5, embed_dim=32, depth=2, num_heads=4).double()
        img = torch.randn(2, 3, 28, 28, dtype=torch.float64)
        loss_fns = [lambda m: m(img).square().sum()]
    revnet.convert(model, method=method, gamma=0.9, exact=exact)
    plain = copy.deepcopy(model)
    assert revnet.set_reversible(plain, False) == 1
    for loss_fn in loss_fns:
        assert grad_error(grads_of(model, loss_fn), grads_of(plain, loss_fn)) <= (0.0 if exact else 1e-10)


def test_the_state_dict_keeps_the_original_keys_both_ways():
    model = lm()
    original = copy.deepcopy(model)
    revnet.convert(model, gamma=0.5)
    assert sorted(model.state_dict()) == sorted(original.state_dict())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    original.load_state_dict(model.state_dict())  # converted -> unconverted
    fresh = revnet.convert(lm(), gamma=0.5)
    fresh.load_state_dict(original.state_dict())  # unconverted -> converted, strict
    x = tokens()
    assert torch.equal(fresh(x), model(x))
    stack = model.transformer.blocks
    assert isinstance(stack, ConvertedStack) and len(stack) == 3
    assert stack[1].attn is stack.sequence[2].f  # the sequence runs the blocks' own modules


def test_set_gamma_and_reconstruction_error():
    model, x = lm(), tokens()
    revnet.convert(model, gamma=0.9)
    assert set_gamma(model, 0.5) == 6
    assert all(c.gamma == 0.5 for c in model.transformer.blocks.sequence)
    assert model.transformer.blocks.gamma == 0.5 and "gamma=0.5" in repr(model.transformer.blocks)
    assert reconstruction_error(model, x) <= 1e-12
    with pytest.raises(ValueError, match="exact mode cannot rebuild at gamma = 0"):
        revnet.set_exact(model, True) and set_gamma(model, 0.0)


def test_gamma_auto_follows_the_depth():
    """'auto': the smallest gamma whose float rebuild stays near 1e-4 over the stack's branches
    (1000^(-1/N), not below 0.5); 0.25 in exact mode, whose rebuild is exact at any gamma."""
    from revnet.conversion import auto_gamma

    assert [auto_gamma(n) for n in (8, 12, 24, 48)] == [0.5, 0.57, 0.75, 0.87]
    assert auto_gamma(48, exact=True) == 0.25
    model, x = lm(), tokens()
    report = revnet.convert(model, gamma="auto", example=x).revnet_conversion
    assert report.gamma == 0.5 and report.auto and "gamma=auto: 0.5" in str(report)
    assert report.reconstruction_error <= 1e-12  # float64: 6 branches at 0.5
    assert revnet.convert(lm(), gamma="auto", exact=True).transformer.blocks.gamma == 0.25
    with pytest.raises(ValueError, match=r"gamma must be in \[0, 1\) or 'auto', got 'fast'"):
        revnet.convert(lm(), gamma="fast")


class ScaledBlock(nn.Module):
    """A block with a layer scale on the residual: x + s * f(x)."""

    def __init__(self, c=8):
        super().__init__()
        self.f = nn.Linear(c, c)
        self.scale = nn.Parameter(torch.full((c,), 0.5))

    def forward(self, x):
        return x + self.scale * self.f(x)


class Stack(nn.Module):
    def __init__(self, block=ScaledBlock, n=3):
        super().__init__()
        self.blocks = nn.ModuleList(block() for _ in range(n))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


class _Scaled(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block.scale * self.block.f(x)


def test_a_users_block_converts_once_registered_and_parameters_outside_the_branches_are_refused():
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"found no residual block stack .* blocks \(3 x ScaledBlock\).*"
                                         r"register_adapter"):
        revnet.convert(Stack())
    revnet.register_adapter(ScaledBlock, lambda b: [b.f])  # forgets the layer scale
    with pytest.raises(ValueError, match=r"parameters outside its residual branches \(scale\)"):
        revnet.convert(Stack())
    revnet.register_adapter(ScaledBlock, lambda b: [_Scaled(b)])  # carries it
    model = Stack().double()
    x = torch.randn(4, 8, dtype=torch.float64)
    ref = model(x)
    assert rel_err(revnet.convert(copy.deepcopy(model), gamma=0.0)(x), ref) <= 1e-12
    revnet.convert(model, gamma=0.8)
    plain = copy.deepcopy(model)
    revnet.set_reversible(plain, False)
    loss_fn = lambda m: m(x).square().sum()  # noqa: E731
    assert grad_error(grads_of(model, loss_fn), grads_of(plain, loss_fn)) <= 1e-10


def test_converting_twice_a_compiled_model_or_nothing_is_a_clear_error():
    model = revnet.convert(lm())
    with pytest.raises(ValueError, match="converted already"):
        revnet.convert(model)
    with pytest.raises(ValueError, match="found no residual block stack .* RevNet"):
        revnet.convert(revnet.create_model("revnet38"))
    with pytest.raises(TypeError, match="torch.compile'd model"):
        revnet.convert(torch.compile(lm()))
    with pytest.raises(ValueError, match=r"gamma must be in \[0, 1\)"):
        revnet.convert(lm(), gamma=1.0)
    with pytest.raises(ValueError, match="unknown method"):
        revnet.convert(lm(), method="magic")
    with pytest.raises(ValueError, match="exact mode rebuilds, and gamma = 0 cannot"):
        revnet.convert(lm(), gamma=0.0, exact=True)
    stack = model.transformer.blocks
    with pytest.raises(IndexError, match="runs its 3 blocks as a whole"):
        stack[:2]
    assert converted_stacks(model)[0][0] == "transformer.blocks"


def test_a_converted_gpt_generates_and_trains_under_autocast():
    torch.manual_seed(0)
    model = revnet.create_model("gpt_mini", vocab_size=64, context_length=16, embed_dim=32, depth=2,
                                num_heads=4)
    reference = copy.deepcopy(model)
    revnet.convert(model, gamma=0.0)
    prompt = tokens(1, 4)
    assert torch.equal(model.generate(prompt, 6, temperature=0), reference.generate(prompt, 6, temperature=0))
    revnet.convert(reference, gamma=0.9)
    x = tokens()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = reference(x, targets=x)
    loss.backward()
    assert all(p.grad is not None for p in reference.parameters())


class EncoderDecoder(nn.Module):
    """PyTorch's own nn.Transformer pieces, batch first."""

    def __init__(self, norm_first):
        super().__init__()
        kw = {"d_model": 16, "nhead": 4, "dim_feedforward": 32, "dropout": 0.0, "batch_first": True,
              "norm_first": norm_first, "dtype": torch.float64}
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(**kw), 2, enable_nested_tensor=False)
        self.decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(activation="gelu", **kw), 2)

    def forward(self, src, tgt, pad):
        memory = self.encoder(src, src_key_padding_mask=pad)
        causal = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1], dtype=torch.float64)
        return self.decoder(tgt, memory, tgt_mask=causal, tgt_is_causal=True, memory_key_padding_mask=pad)


@pytest.mark.parametrize("norm_first", [True, False])
def test_pytorch_transformer_encoder_and_decoder_convert(norm_first):
    torch.manual_seed(0)
    model = EncoderDecoder(norm_first)
    src = torch.randn(2, 7, 16, dtype=torch.float64)
    tgt = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 5:] = True
    ref = model(src, tgt, pad)
    zero = revnet.convert(copy.deepcopy(model), gamma=0.0)
    assert rel_err(zero(src, tgt, pad), ref) <= 1e-12
    assert [c for _, c, _, _ in zero.revnet_conversion.stacks] == ["TransformerEncoderLayer",
                                                                   "TransformerDecoderLayer"]
    assert [n for _, _, _, n in zero.revnet_conversion.stacks] == [4, 6]  # 2 and 3 branches per layer
    revnet.convert(model, gamma=0.9)
    plain = copy.deepcopy(model)
    revnet.set_reversible(plain, False)
    loss_fn = lambda m: m(src, tgt, pad).square().sum()  # noqa: E731
    assert grad_error(grads_of(model, loss_fn), grads_of(plain, loss_fn)) <= 1e-10
    model.eval()  # the encoder's nested-tensor fast path is off after conversion
    with torch.no_grad():
        assert torch.isfinite(model(src, tgt, pad)).all()


def test_a_resnets_stages_convert_after_their_downsampling_units():
    torch.manual_seed(0)
    model = revnet.create_model("resnet32", num_classes=4, in_chans=1).double()
    x = torch.randn(3, 1, 12, 12, dtype=torch.float64)
    model.eval()
    ref = model(x)
    zero = revnet.convert(copy.deepcopy(model), gamma=0.0)
    assert rel_err(zero(x), ref) <= 1e-12
    # stage 0's units are all x + f(x); stages 1 and 2 open with a unit whose shortcut downsamples
    assert [(p, n) for p, _, n, _ in zero.revnet_conversion.stacks] == [
        ("stages.0", 5), ("stages.1", 4), ("stages.2", 4)]
    assert sorted(zero.state_dict()) == sorted(model.state_dict())
    model.train()
    revnet.convert(model, gamma=0.9)
    plain = copy.deepcopy(model)
    revnet.set_reversible(plain, False)
    loss_fn = lambda m: m(x).square().sum()  # noqa: E731
    assert grad_error(grads_of(model, loss_fn), grads_of(plain, loss_fn)) <= 1e-10
    # BatchNorm's running statistics move once per step, as under plain autograd (engine rule 2)
    bn = [b for b in model.modules() if isinstance(b, nn.BatchNorm2d)]
    bn_plain = [b for b in plain.modules() if isinstance(b, nn.BatchNorm2d)]
    assert all(torch.allclose(a.running_mean, b.running_mean)
               and a.num_batches_tracked == b.num_batches_tracked for a, b in zip(bn, bn_plain, strict=True))
