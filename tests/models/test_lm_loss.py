"""linear_cross_entropy: the head and its loss without the logits, against plain autograd."""

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err

import revnet
from revnet.memory.measure import saved_bytes
from revnet.models.lm_loss import linear_cross_entropy


@pytest.mark.parametrize("chunk_rows", [1, 5, 64])
def test_loss_and_gradients_equal_plain_cross_entropy_float64(chunk_rows):
    torch.manual_seed(0)
    h = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    b = torch.randn(50, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 50, (3, 7))
    t[0, :2] = -100  # ignored positions (padding)
    ours = linear_cross_entropy(h, w, t, b, chunk_bytes=chunk_rows * 50 * 4)
    ref = F.cross_entropy(F.linear(h, w, b).flatten(0, 1), t.flatten())
    assert rel_err(ours, ref) <= 1e-12
    for a, r in zip(torch.autograd.grad(ours * 1.7, [h, w, b]), torch.autograd.grad(ref * 1.7, [h, w, b]),
                    strict=True):
        assert rel_err(a, r) <= 1e-12


def test_bf16_autocast_matches_the_plain_loss_in_its_precision():
    torch.manual_seed(0)
    h = torch.randn(64, 32, requires_grad=True)
    w = torch.randn(300, 32, requires_grad=True)
    t = torch.randint(0, 300, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = linear_cross_entropy(h, w, t, chunk_bytes=16 * 300 * 4)
        ref = F.cross_entropy(F.linear(h, w).float(), t)
    assert ours.dtype == torch.float32 and rel_err(ours, ref) <= 1e-5
    for a, r in zip(torch.autograd.grad(ours, [h, w]), torch.autograd.grad(ref, [h, w]), strict=True):
        assert a.dtype == r.dtype and rel_err(a, r) <= 2e-2  # bf16 matmuls, recomputed alike


def test_gpt_with_targets_returns_the_loss_without_keeping_the_logits():
    torch.manual_seed(0)
    for name in ("gpt_mini", "revgpt_mini"):
        net = revnet.create_model(name, vocab_size=4096, context_length=32, depth=2).double()
        x, y = torch.randint(0, 4096, (2, 32)), torch.randint(0, 4096, (2, 32))
        loss = net(x, targets=y)
        ref = F.cross_entropy(net(x).flatten(0, 1), y.flatten())
        assert rel_err(loss, ref) <= 1e-12
        grads = torch.autograd.grad(loss, list(net.parameters()))
        refs = torch.autograd.grad(ref, list(net.parameters()))
        assert max(rel_err(a, r) for a, r in zip(grads, refs, strict=True)) <= 1e-10
        logits_bytes = 2 * 32 * 4096 * 8
        fused = saved_bytes(net, x, lambda loss: loss, forward_kwargs={"targets": y})
        plain = saved_bytes(net, x, lambda out, y=y: F.cross_entropy(out.flatten(0, 1), y.flatten()))
        assert plain - fused >= 0.99 * logits_bytes  # the log-softmax of the logits is not kept
    with pytest.raises(ValueError, match="targets .* must have the tokens' shape"):
        net(x, targets=y[:, :5])


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="agree on every dimension"):
        linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"weight must be \(vocab, 8\)"):
        linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 7), torch.zeros(4, dtype=torch.long))
