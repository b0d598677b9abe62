"""Transformer blocks over tokens ``(B, T, C)``, residual and reversible.

- :class:`AttentionBranch` (``LayerNorm -> multi-head self-attention``) and
  :class:`MlpBranch` (``LayerNorm -> MLP``) are the two residual functions of a
  transformer block, each ending in per-sample drop path (stochastic depth).
- :class:`TransformerBlock`: the ordinary pre-norm residual block (ViT, Dosovitskiy et al.
  2021): ``x + F(x)``, then ``+ G(.)``. :class:`Transformer` stacks them.
- :class:`RevTransformer`: the reversible arrangement of RevViT (Mangalam et al., CVPR 2022)
  and Reformer (Kitaev et al. 2020): the tokens are duplicated into two full-width streams,
  ``y1 = x1 + F(x2)``, ``y2 = x2 + G(y1)`` with F the attention and G the MLP branch,
  and the two streams are fused at the end by concatenation and ``LayerNorm(2C)``.
  Its couplings run in one :class:`revnet.ReversibleSequence`, so dropout, attention dropout
  and drop path are replayed in the recomputation by the engine's RNG rules.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..engine import AdditiveCoupling, ReversibleSequence, set_exact
from ..engine.modes import ReversibleSwitch

__all__ = ["AttentionBranch", "DropPath", "MlpBranch", "RevTransformer", "Transformer", "TransformerBlock",
           "check_heads", "drop_path_rates"]

NormLayer = Callable[..., nn.Module]
ActLayer = Callable[[], nn.Module]


def check_heads(owner: str, embed_dim: int, num_heads: int) -> None:
    """Refuses widths that multi-head attention cannot split into equal heads."""
    if embed_dim < 1 or num_heads < 1:
        raise ValueError(f"{owner}: embed_dim ({embed_dim}) and num_heads ({num_heads}) must be >= 1.")
    if embed_dim % num_heads:
        fits = [h for h in range(1, embed_dim + 1) if embed_dim % h == 0 and abs(h - num_heads) <= num_heads]
        near = min(fits, key=lambda h: abs(h - num_heads))
        raise ValueError(
            f"{owner}: embed_dim {embed_dim} is not divisible by num_heads {num_heads}, so the heads "
            f"cannot have equal widths. Fix: pick num_heads dividing embed_dim (e.g. {near}) or "
            f"embed_dim a multiple of num_heads (e.g. {embed_dim + num_heads - embed_dim % num_heads}).")


def drop_path_rates(drop_path_rate: float, depth: int) -> list[float]:
    """Stochastic depth growing linearly from 0 to ``drop_path_rate`` over the blocks (as timm)."""
    if not 0.0 <= drop_path_rate < 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}.")
    return [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]


class DropPath(nn.Module):
    """Per-sample stochastic depth (Huang et al. 2016): zeroes a branch for a random subset of samples.

    The mask is drawn from the global generator, so a reversible sequence's recomputation,
    which replays the RNG state, draws the same one.
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"DropPath: p must be in [0, 1), got {p}.")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)  # (B, 1, 1)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class AttentionBranch(nn.Module):
    """``drop_path(dropout(proj(attention(LayerNorm(x)))))`` over tokens ``(B, T, C)``.

    Attention is ``F.scaled_dot_product_attention`` (fused kernels where the device has
    them); ``attn_drop`` drops attention weights in training, ``causal`` masks the future.
    """

    def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, drop_path: float = 0.0, causal: bool = False,
                 norm_layer: NormLayer = nn.LayerNorm, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        check_heads(type(self).__name__, dim, num_heads)
        factory = {"device": device, "dtype": dtype}
        self.num_heads, self.attn_drop, self.causal = num_heads, attn_drop, causal
        self.norm = norm_layer(dim, **factory)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **factory)
        self.proj = nn.Linear(dim, dim, **factory)
        self.proj_drop = nn.Dropout(proj_drop)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, t, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, T, C/heads)
        dtype, cpu = q.dtype, q.device.type == "cpu"
        if cpu and (dtype == torch.bfloat16 or torch.is_autocast_enabled("cpu")):
            # PyTorch's CPU attention kernels are slower in bf16 than in float32: forward + backward
            # of 128 x 4 heads x 49 tokens x 32 took 85 ms in bf16 (flash), 18 ms (math), 13.5 ms
            # in float32 (flash). So attention runs in float32 here, outside autocast (which would
            # cast it back); a fixed function of q, k, v, so the recomputation is the same.
            with torch.autocast("cpu", enabled=False):
                o = self._attend(q.float(), k.float(), v.float())
        else:
            o = self._attend(q, k, v)
        o = o.to(dtype).transpose(1, 2).reshape(b, t, c)
        return self.drop_path(self.proj_drop(self.proj(o)))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0,
                                              is_causal=self.causal)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, attn_drop={self.attn_drop}, causal={self.causal}"


class MlpBranch(nn.Module):
    """``drop_path(dropout(fc2(dropout(act(fc1(LayerNorm(x)))))))``, hidden width ``mlp_ratio * C``."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0, *, drop: float = 0.0, drop_path: float = 0.0,
                 norm_layer: NormLayer = nn.LayerNorm, act_layer: ActLayer = nn.GELU,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        hidden = int(dim * mlp_ratio)
        if hidden < 1:
            raise ValueError(f"MlpBranch: mlp_ratio {mlp_ratio} leaves no hidden units at width {dim}.")
        self.norm = norm_layer(dim, **factory)
        self.fc1 = nn.Linear(dim, hidden, **factory)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim, **factory)
        self.drop2 = nn.Dropout(drop)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop_path(self.drop2(self.fc2(self.drop1(self.act(self.fc1(self.norm(x)))))))


def _branches(embed_dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, drop_rate: float,
              attn_drop_rate: float, drop_path: float, causal: bool,
              factory: dict[str, Any]) -> tuple[AttentionBranch, MlpBranch]:
    return (AttentionBranch(embed_dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop_rate,
                            proj_drop=drop_rate, drop_path=drop_path, causal=causal, **factory),
            MlpBranch(embed_dim, mlp_ratio, drop=drop_rate, drop_path=drop_path, **factory))


def _check_tokens(owner: str, x: torch.Tensor, embed_dim: int) -> None:
    if x.dim() != 3 or x.shape[-1] != embed_dim:
        raise ValueError(f"{owner}: expects tokens of shape (B, T, {embed_dim}), got {tuple(x.shape)}. "
                         f"Fix: build it with embed_dim={x.shape[-1] if x.dim() == 3 else 'C'} or project "
                         f"the tokens to {embed_dim} features first.")


class TransformerBlock(nn.Module):
    """The pre-norm residual block: ``x = x + F(x)``; ``x = x + G(x)`` (F attention, G MLP)."""

    def __init__(self, embed_dim: int, num_heads: int, mlp_ratio: float = 4.0, *, qkv_bias: bool = True,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path: float = 0.0,
                 causal: bool = False, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.attn, self.mlp = _branches(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate,
                                        drop_path, causal, {"device": device, "dtype": dtype})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.mlp(x)


class Transformer(nn.Module):
    """``depth`` residual :class:`TransformerBlock` s and a final LayerNorm: ``(B, T, C) -> (B, T, C)``.

    The baseline of :class:`RevTransformer`: the same branches, every activation stored.
    """

    def __init__(self, embed_dim: int, depth: int, num_heads: int, mlp_ratio: float = 4.0, *,
                 qkv_bias: bool = True, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, causal: bool = False, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"Transformer: depth must be >= 1, got {depth}.")
        check_heads("Transformer", embed_dim, num_heads)
        self.embed_dim, self.out_features = embed_dim, embed_dim
        self.blocks = nn.Sequential(*(
            TransformerBlock(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, drop_rate=drop_rate,
                             attn_drop_rate=attn_drop_rate, drop_path=dp, causal=causal, device=device,
                             dtype=dtype)
            for dp in drop_path_rates(drop_path_rate, depth)))
        self.norm = nn.LayerNorm(embed_dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_tokens("Transformer", x, self.embed_dim)
        return self.norm(self.blocks(x))


class RevTransformer(ReversibleSwitch, nn.Module):
    """A reversible transformer over tokens: ``(B, T, C) -> (B, T, 2C)``; stores no block activations.

    The tokens are duplicated into two streams of width ``C`` (RevViT, Mangalam et al.
    2022, Sec. 3); block ``i`` is the coupling ``y1 = x1 + F_i(x2)``, ``y2 = x2 + G_i(y1)``
    with ``F_i`` = LayerNorm + multi-head self-attention and ``G_i`` = LayerNorm + MLP; the
    streams leave concatenated and normalised by ``LayerNorm(2C)``. ``out_features`` is
    ``2 * embed_dim``.

    Args:
        embed_dim: token width ``C`` (each stream's width).
        depth: blocks (couplings).
        num_heads: attention heads; must divide ``embed_dim``.
        mlp_ratio: MLP hidden width over ``embed_dim``.
        qkv_bias: bias in the query/key/value projection.
        drop_rate: dropout after the attention projection and in the MLP.
        attn_drop_rate: dropout on the attention weights.
        drop_path_rate: stochastic depth of the last block (linear from 0 over the blocks).
        causal: mask attention to earlier tokens (language models).
        reversible: start with reversible backprop (flip with ``.reversible`` or
            :func:`revnet.set_reversible`; False is the same modules under plain autograd).
        exact: fixed-point couplings (:class:`revnet.AdditiveCoupling`, ``exact=True``).
    """

    def __init__(self, embed_dim: int, depth: int, num_heads: int, mlp_ratio: float = 4.0, *,
                 qkv_bias: bool = True, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, causal: bool = False, reversible: bool = True,
                 exact: bool = False, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"RevTransformer: depth must be >= 1, got {depth}.")
        check_heads("RevTransformer", embed_dim, num_heads)
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.out_features = embed_dim, 2 * embed_dim
        self.blocks = ReversibleSequence(
            [AdditiveCoupling(*_branches(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate,
                                         dp, causal, factory), dim=-1)
             for dp in drop_path_rates(drop_path_rate, depth)],
            reversible=reversible)
        self.norm = nn.LayerNorm(2 * embed_dim, **factory)  # the fusion of the two streams
        set_exact(self, exact)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_tokens("RevTransformer", x, self.embed_dim)
        return self.norm(self.blocks(torch.cat((x, x), dim=-1)))  # (B, T, 2C): both streams
