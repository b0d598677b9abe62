"""GPT and RevGPT: GPT-2's parameter counts, reversible == plain autograd, training, errors."""

import copy

import pytest
import torch
from conftest import rel_err

import revnet
from revnet.models import GPT, RevGPT, model_accepts

GPT2_PARAMS = {"gpt2_small": 124_439_808, "gpt2_medium": 354_823_168}


def count(model):
    return sum(p.numel() for p in model.parameters())  # a tied head counts once


@pytest.mark.parametrize("name", sorted(GPT2_PARAMS))
def test_parameter_counts_are_gpt2s(name):
    gpt = revnet.create_model(name, device="meta")
    rev = revnet.create_model("rev" + name, device="meta")
    assert isinstance(gpt, GPT) and isinstance(rev, RevGPT)
    assert count(gpt) == count(rev) == GPT2_PARAMS[name]  # the mean readout: the same parameters
    assert gpt.head.weight is gpt.tok_embed.weight and rev.head.weight is rev.tok_embed.weight


def test_registered_sizes_and_overrides():
    mini = revnet.create_model("revgpt_mini", num_classes=1000, in_chans=1)  # image arguments ignored
    assert count(mini) == 842_496 and mini.vocab_size == 256 and mini.context_length == 128
    small = revnet.create_model("gpt_mini", vocab_size=100, context_length=16, pos_embed="rope")
    assert small.pos_embed is None and small.head.out_features == 100
    assert small(torch.randint(0, 100, (2, 16))).shape == (2, 16, 100)
    assert not model_accepts("gpt_mini", "img_size")
    untied = RevGPT(50, 8, 16, 2, 2, fuse="concat", tie_weights=False)
    assert untied.head.in_features == 32 and untied(torch.randint(0, 50, (1, 8))).shape == (1, 8, 50)


def run(model, tokens, pad=None, seed=6):
    torch.manual_seed(seed)
    y = model(tokens, key_padding_mask=pad)
    w = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
    (y * w).sum().backward()
    return y.detach()


@pytest.mark.parametrize("depth", [1, 2])  # odd and even
@pytest.mark.parametrize("pos_embed", ["learned", "rope"])
def test_revgpt_float64_gradients_equal_plain_autograd(pos_embed, depth):
    """Causal + key padding, dropout and drop path on: every parameter (the token embedding is the
    input path, tied to the head) equals plain autograd's."""
    model = RevGPT(vocab_size=40, context_length=12, embed_dim=16, depth=depth, num_heads=4, drop_rate=0.2,
                   attn_drop_rate=0.2, drop_path_rate=0.3, pos_embed=pos_embed, dtype=torch.float64)
    ref = copy.deepcopy(model)
    ref.reversible = False
    tokens = torch.randint(0, 40, (3, 10), generator=torch.Generator().manual_seed(0))
    pad = torch.zeros(3, 10, dtype=torch.bool)
    pad[0, 7:] = True
    y, y_ref = run(model, tokens, pad), run(ref, tokens, pad)
    assert y.shape == (3, 10, 40) and torch.isfinite(y).all()
    assert rel_err(y, y_ref) == 0
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"
        assert rel_err(p.grad, q.grad) <= 1e-10, f"{name}: {rel_err(p.grad, q.grad):.2e}"


@pytest.mark.parametrize("cls", [GPT, RevGPT])
def test_causal_and_inference(cls):
    model = cls(vocab_size=30, context_length=8, embed_dim=16, depth=2, num_heads=2).eval()
    a = torch.randint(0, 30, (2, 8))
    b = a.clone()
    b[:, 5:] = (b[:, 5:] + 1) % 30  # change only the last tokens
    with torch.no_grad():
        ya, yb = model(a), model(b)
    assert torch.allclose(ya[:, :5], yb[:, :5], atol=1e-6) and not torch.allclose(ya[:, 5:], yb[:, 5:])
    if cls is RevGPT:  # without grad the reversible model runs the plain forward: the same logits
        plain = copy.deepcopy(model)
        plain.reversible = False
        with torch.no_grad():
            assert torch.equal(plain(a), ya)


def test_revgpt_mini_learns_a_repeated_byte_sequence():
    torch.manual_seed(0)
    model = revnet.create_model("revgpt_mini")
    data = torch.tensor(list(b"reversible! " * 6), dtype=torch.long)[:65]
    x, y = data[:-1][None].repeat(4, 1), data[1:][None].repeat(4, 1)  # (4, 64)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


# --- bad input ------------------------------------------------------------------------

def test_bad_tokens_named():
    model = GPT(vocab_size=20, context_length=6, embed_dim=8, depth=1, num_heads=2)
    with pytest.raises(ValueError, match=r"token ids of shape \(B, T\), int64, "
                                         r"got \(2, 6, 8\) torch.float32"):
        model(torch.randn(2, 6, 8))
    with pytest.raises(ValueError, match=r"7 tokens exceed context_length 6.*crop"):
        model(torch.zeros(1, 7, dtype=torch.long))
    with pytest.raises(ValueError, match=r"key_padding_mask has shape \(1, 4\), "
                                         r"expected \(B, T\) = \(1, 6\)"):
        model(torch.zeros(1, 6, dtype=torch.long), key_padding_mask=torch.zeros(1, 4, dtype=torch.bool))


def test_bad_configurations_named():
    with pytest.raises(ValueError, match=r"head width.*= 3 must be even.*pos_embed='learned'"):
        GPT(20, 6, 6, 1, 2, pos_embed="rope")
    with pytest.raises(ValueError, match=r"tie_weights needs a head on 8 features.*fuse='mean'"):
        RevGPT(20, 6, 8, 1, 2, fuse="concat")
    with pytest.raises(ValueError, match="unknown pos_embed 'sin'"):
        GPT(20, 6, 8, 1, 2, pos_embed="sin")


def test_generate_greedy_slides_over_the_context_and_runs_the_plain_forward():
    torch.manual_seed(0)
    net = revnet.create_model("revgpt_mini", context_length=8).double()
    prompt = torch.randint(0, 256, (2, 5))
    out = net.generate(prompt, 6, temperature=0)
    assert out.shape == (2, 11) and torch.equal(out[:, :5], prompt) and net.training
    tokens = prompt  # by hand: the likeliest next byte given the last 8
    for _ in range(6):
        with torch.no_grad():
            tokens = torch.cat([tokens, net.eval()(tokens[:, -8:])[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, tokens)
    g = torch.Generator().manual_seed(3)
    a = net.generate(prompt, 4, temperature=0.7, top_k=5, generator=g)
    b = net.generate(prompt, 4, temperature=0.7, top_k=5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    for bad, match in (({"temperature": -0.5}, "temperature"), ({"top_k": 0}, "top_k")):
        with pytest.raises(ValueError, match=match):
            net.generate(prompt, 1, **bad)


def test_token_ids_outside_the_vocabulary_are_named():
    net = revnet.create_model("gpt_mini", depth=1)
    for bad in (torch.tensor([[3, 256]]), torch.tensor([[-1, 2]])):
        with pytest.raises(ValueError, match=r"token ids must be in \[0, 256\)"):
            net(bad)
