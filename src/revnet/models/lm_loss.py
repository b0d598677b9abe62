"""The language-model head and its cross-entropy in one step that never holds all the logits.

A language model's last layer maps every position to ``vocab_size`` logits; for training, the
cross-entropy of those against the next tokens. Computed as usual, autograd keeps the logits
(``B x T x V``) and their log-softmax for backward, and backward makes a gradient of the same size:
at GPT-2's vocabulary (50257) and context (1024), 0.4 GB per sample in float32 each, more than the
activations of all twelve blocks of a reversible GPT-2 small together. Reversibility cannot
remove it (the head is not a coupling); not keeping it can.

:func:`linear_cross_entropy` is one autograd Function: the forward computes the logits a chunk
of rows at a time, keeps only each row's log-sum-exp, and returns the mean loss; the backward
computes the chunk's logits again and turns them into the gradients of the hidden states and
the head's weight at once (``softmax - one_hot``). Peak extra memory: one chunk of logits
(``chunk_bytes``) instead of three full-size tensors; cost: the head's matmul once more. The idea
is the one of Wijmans et al. 2024 ("Cut Your Losses in Large-Vocabulary Language Models") and of
Liger Kernel's fused linear cross-entropy, written here for any device in plain PyTorch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["linear_cross_entropy"]

CHUNK_BYTES = 64 * 2**20  # float32 logits of one chunk of rows


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype | None]:
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return True, torch.get_autocast_dtype(device_type)
    return False, None


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A chunk's logits, at least in float32 (float64 stays float64)."""
    out = nn.functional.linear(h, weight, bias)
    return out if out.dtype in (torch.float32, torch.float64) else out.float()


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, ignore_index: int, rows: int) -> torch.Tensor:
        # hidden (N, C), weight (V, C), targets (N,); runs under the caller's autocast, if any.
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        lse = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
        picked = torch.empty_like(lse)
        safe = targets.clamp(min=0)  # ignored rows pick token 0 and are masked out below
        for lo in range(0, hidden.shape[0], rows):
            logits = _logits(hidden[lo:lo + rows], weight, bias)
            lse[lo:lo + rows] = torch.logsumexp(logits, dim=-1)
            picked[lo:lo + rows] = logits.gather(1, safe[lo:lo + rows, None])[:, 0]
        valid = targets != ignore_index
        count = valid.sum().clamp(min=1)
        loss = torch.where(valid, lse - picked, 0).sum() / count
        ctx.save_for_backward(hidden, weight, bias, targets, lse, count)
        ctx.ignore_index, ctx.rows = ignore_index, rows
        ctx.autocast = _autocast_state(hidden.device.type)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, bias, targets, lse, count = ctx.saved_tensors
        enabled, dtype = ctx.autocast
        device = hidden.device.type
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=lse.dtype) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=lse.dtype) if need_b and bias is not None else None
        valid = targets != ctx.ignore_index
        scale = torch.where(valid, grad_loss.to(lse.dtype) / count, 0)  # (N,): 0 on ignored rows
        safe = targets.clamp(min=0)
        for lo in range(0, hidden.shape[0], ctx.rows):
            rows = slice(lo, lo + ctx.rows)
            h = hidden[rows]
            with torch.autocast(device, dtype=dtype, enabled=enabled):
                logits = _logits(h, weight, bias)
            # d loss / d logits = (softmax - one_hot(target)) * scale, row by row
            g = logits.sub_(lse[rows, None]).exp_()
            g.scatter_add_(1, safe[rows, None], torch.full_like(g[:, :1], -1.0))
            g.mul_(scale[rows, None])
            with torch.autocast(device, dtype=dtype, enabled=enabled):  # the head's precision
                gw = g if enabled else g.to(weight.dtype)
                if grad_h is not None:
                    grad_h[rows] = gw @ weight
                if grad_w is not None:
                    grad_w += gw.t() @ h
            if grad_b is not None:
                grad_b += g.sum(0)
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         bias: torch.Tensor | None = None, *, ignore_index: int = -100,
                         chunk_bytes: int = CHUNK_BYTES) -> torch.Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias), targets)`` (mean over the targets that are
    not ``ignore_index``), without keeping the logits.

    Args:
        hidden: ``(..., C)`` states entering the head.
        weight: ``(V, C)`` the head's weight (a tied embedding's, for GPT-2).
        targets: ``(...)`` int64 token ids in ``[0, V)``, or ``ignore_index``.
        bias: ``(V,)`` or None.
        ignore_index: targets that count for nothing (padding).
        chunk_bytes: float32 logits computed at a time (rows = ``chunk_bytes / (4 V)``).

    Returns:
        The mean cross-entropy in nats, a float32 scalar. Gradients reach ``hidden``, ``weight``
        and ``bias``; the backward computes the logits once more, a chunk at a time, under the
        autocast state of the forward.
    """
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"linear_cross_entropy: hidden {tuple(hidden.shape)} and targets "
                         f"{tuple(targets.shape)} must agree on every dimension but the last (one target "
                         f"per position).")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"linear_cross_entropy: weight must be (vocab, {hidden.shape[-1]}), got "
                         f"{tuple(weight.shape)}.")
    rows = max(1, chunk_bytes // (4 * weight.shape[0]))
    return _LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, bias,
                                     targets.reshape(-1), ignore_index, rows)
