"""Transformer blocks over tokens ``(B, T, C)``, residual and reversible, with context inputs.

- :class:`AttentionBranch` (``LayerNorm -> multi-head self-attention``) and
  :class:`MlpBranch` (``LayerNorm -> MLP``) are the two residual functions of a
  transformer block, each ending in per-sample drop path (stochastic depth).
  :class:`CrossAttentionBranch` attends from the tokens to an encoder's states, and
  :class:`DecoderAttentionBranch` is the decoder's ``self-attention -> cross-attention``.
- :class:`TransformerBlock`: the ordinary pre-norm residual block (ViT, Dosovitskiy et al.
  2021): ``x + F(x)``, then ``+ G(.)``. :class:`Transformer` stacks them.
- :class:`RevTransformer`: the reversible arrangement of RevViT (Mangalam et al., CVPR 2022)
  and Reformer (Kitaev et al. 2020): the tokens are duplicated into two full-width streams,
  ``y1 = x1 + F(x2)``, ``y2 = x2 + G(y1)`` with F the attention and G the MLP branch,
  and the two streams are fused at the end by concatenation and ``LayerNorm(2C)`` (or, with
  ``fuse="mean"``, their mean and ``LayerNorm(C)``).
  Its couplings run in one :class:`revnet.ReversibleSequence`, so dropout, attention dropout
  and drop path are replayed in the recomputation by the engine's RNG rules.

Context. Both transformers take keyword-only context arguments that reach every branch (the
reversible one passes them to its sequence, which hands them to every F and G and returns
the gradients of the tensors among them, summed over the blocks); a branch ignores those it
does not use:

- ``attn_mask``: bool (True = may attend) or float (added to the attention scores; it gets
  a gradient if it requires one), broadcastable to ``(B, heads, T, T)``. With ``causal=True``
  it is combined with the causal mask.
- ``key_padding_mask``: ``(B, T)`` bool, True = padding (a key no token attends to). A query
  left with no visible key (a padding token under a causal mask) attends to every key instead:
  finite junk at a padding position rather than NaN, which would leak into the gradients.
- ``rope``: rotary position embedding (RoPE, Su et al. 2021) as the precomputed tables
  ``(cos, sin)``, each ``(T, head_dim)``, from :func:`rope_tables`; rotated into the queries
  and keys of self-attention in the rotate-half form (GPT-NeoX, LLaMA): channel ``i`` pairs
  with ``i + head_dim/2``.
- ``encoder``: the encoder's states ``(B, S, C_enc)`` for cross-attention (models built with
  ``cross_attention=True``), and ``encoder_padding_mask``: ``(B, S)`` bool, True = padding.

A decoder block is self-attention, cross-attention and MLP. In the reversible coupling F is
:class:`DecoderAttentionBranch`, a residual sub-stack ``h = SA(x); F(x) = h + CA(x + h)``, and
G the MLP: one coupling per decoder block, the same three sub-layers in the same order as the
residual block (whose ``x + F(x)`` is exactly ``x + SA(x)``, then ``+ CA(.)``), so both share
the branch modules and the depth keeps its meaning; splitting them into couplings (SA|CA, MLP|SA,
...) would need an odd number of branches per block and pair unrelated sub-layers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..engine import AdditiveCoupling, ReversibleSequence, set_exact
from ..engine.modes import ReversibleSwitch

__all__ = ["CONTEXT_KEYS", "AttentionBranch", "CrossAttentionBranch", "DecoderAttentionBranch", "DropPath",
           "MlpBranch", "RevTransformer", "Transformer", "TransformerBlock", "apply_rope", "check_heads",
           "drop_path_rates", "rope_tables"]

NormLayer = Callable[..., nn.Module]
ActLayer = Callable[[], nn.Module]
Rope = tuple[torch.Tensor, torch.Tensor]

CONTEXT_KEYS = ("attn_mask", "key_padding_mask", "rope", "encoder", "encoder_padding_mask")
FUSES = ("concat", "mean")


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


# --------------------------------------------------------------------------------------
# Rotary position embedding and attention masks
# --------------------------------------------------------------------------------------

def rope_tables(length: int, head_dim: int, *, base: float = 10000.0, offset: int = 0,
                device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Rope:
    """RoPE's ``(cos, sin)`` tables, each ``(length, head_dim)``, for positions ``offset .. offset+length-1``.

    Channel pair ``(i, i + head_dim/2)`` turns by ``position * base ** (-2i / head_dim)`` (Su et
    al. 2021, in the rotate-half layout of GPT-NeoX and LLaMA). Computed in float64 (float32 on
    devices without it) and cast to ``dtype`` (default float32).
    """
    if head_dim < 2 or head_dim % 2:
        raise ValueError(f"rope_tables: head_dim must be even and >= 2 (channels rotate in pairs), got "
                         f"{head_dim}. Fix: pick embed_dim / num_heads even.")
    wide = torch.float32 if torch.device(device or "cpu").type == "mps" else torch.float64
    inv = base ** (-torch.arange(0, head_dim, 2, device=device, dtype=wide) / head_dim)  # (head_dim/2,)
    angle = torch.arange(offset, offset + length, device=device, dtype=wide)[:, None] * inv  # (T, d/2)
    angle = torch.cat((angle, angle), dim=-1)  # (T, d)
    out = dtype or torch.float32
    return angle.cos().to(out), angle.sin().to(out)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates ``x`` (``(..., T, head_dim)``) by the tables of :func:`rope_tables`."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat((-x2, x1), dim=-1) * sin.to(x.dtype)


def _combine_masks(q_len: int, k_len: int, *, causal: bool, attn_mask: torch.Tensor | None,
                   key_padding_mask: torch.Tensor | None, dtype: torch.dtype,
                   device: torch.device) -> tuple[torch.Tensor | None, bool]:
    """One mask for ``F.scaled_dot_product_attention``: ``(mask, is_causal)``; writes into no input."""
    if attn_mask is None and key_padding_mask is None:
        return None, causal
    allowed = None  # bool, True = may attend
    if causal:
        allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril()
    if key_padding_mask is not None:
        keep = ~key_padding_mask[:, None, None, :]  # (B, 1, 1, S)
        allowed = keep if allowed is None else allowed & keep
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        allowed = attn_mask if allowed is None else allowed & attn_mask
    elif attn_mask is not None:  # additive
        bias = attn_mask.to(dtype)
        if allowed is None:
            return bias, False
        # The most negative finite number, not -inf: a row with no visible key stays finite.
        return torch.where(allowed, bias, torch.finfo(dtype).min), False  # broadcasts both ways
    assert allowed is not None
    return allowed | ~allowed.any(dim=-1, keepdim=True), False  # rows seeing nothing see everything


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, dropout_p: float, causal: bool = False,
               attn_mask: torch.Tensor | None = None,
               key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` over ``(B, heads, T, head_dim)``, masks combined."""
    dtype = q.dtype
    if q.device.type == "cpu" and (dtype == torch.bfloat16 or torch.is_autocast_enabled("cpu")):
        # PyTorch's CPU attention kernels are slower in bf16 than in float32: forward + backward
        # of 128 x 4 heads x 49 tokens x 32 took 85 ms in bf16 (flash), 18 ms (math), 13.5 ms
        # in float32 (flash). So attention runs in float32 here, outside autocast (which would
        # cast it back); a fixed function of q, k, v, so the recomputation is the same.
        with torch.autocast("cpu", enabled=False):
            o = _attention(q.float(), k.float(), v.float(), dropout_p=dropout_p, causal=causal,
                           attn_mask=attn_mask, key_padding_mask=key_padding_mask)
        return o.to(dtype)
    mask, is_causal = _combine_masks(q.shape[-2], k.shape[-2], causal=causal, attn_mask=attn_mask,
                                     key_padding_mask=key_padding_mask, dtype=dtype, device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal)


# --------------------------------------------------------------------------------------
# Branches
# --------------------------------------------------------------------------------------

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
    ``forward`` uses the context ``attn_mask``, ``key_padding_mask`` and ``rope`` (see the
    module's docstring) and ignores any other keyword.
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

    def forward(self, x: torch.Tensor, *, attn_mask: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None, rope: Rope | None = None,
                **_: Any) -> torch.Tensor:
        b, t, c = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, t, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, T, C/heads)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        o = _attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0, causal=self.causal,
                       attn_mask=attn_mask, key_padding_mask=key_padding_mask)
        o = o.transpose(1, 2).reshape(b, t, c)
        return self.drop_path(self.proj_drop(self.proj(o)))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, attn_drop={self.attn_drop}, causal={self.causal}"


class CrossAttentionBranch(nn.Module):
    """``drop_path(dropout(proj(attention(q = LayerNorm(x), k, v = encoder))))``: tokens ``(B, T, C)``
    attend to the encoder's states ``(B, S, encoder_dim)`` (the context ``encoder``, masked by
    ``encoder_padding_mask``, True = padding). No causal mask and no RoPE (the two sequences'
    positions are unrelated); other keywords are ignored. The encoder's states enter as they are
    (normalise them in the encoder, as the original Transformer's final LayerNorm does).
    """

    def __init__(self, dim: int, num_heads: int, encoder_dim: int | None = None, *, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, drop_path: float = 0.0,
                 norm_layer: NormLayer = nn.LayerNorm, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        check_heads(type(self).__name__, dim, num_heads)
        factory = {"device": device, "dtype": dtype}
        self.num_heads, self.attn_drop = num_heads, attn_drop
        self.encoder_dim = dim if encoder_dim is None else encoder_dim
        self.norm = norm_layer(dim, **factory)
        self.q = nn.Linear(dim, dim, bias=qkv_bias, **factory)
        self.kv = nn.Linear(self.encoder_dim, 2 * dim, bias=qkv_bias, **factory)
        self.proj = nn.Linear(dim, dim, **factory)
        self.proj_drop = nn.Dropout(proj_drop)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, *, encoder: torch.Tensor | None = None,
                encoder_padding_mask: torch.Tensor | None = None, **_: Any) -> torch.Tensor:
        if encoder is None:
            raise ValueError(f"{type(self).__name__}: needs the encoder's states: call with encoder= of "
                             f"shape (B, S, {self.encoder_dim}).")
        b, t, c = x.shape
        s, h = encoder.shape[1], self.num_heads
        q = self.q(self.norm(x)).reshape(b, t, h, c // h).transpose(1, 2)  # (B, heads, T, C/heads)
        k, v = self.kv(encoder).reshape(b, s, 2, h, c // h).permute(2, 0, 3, 1, 4).unbind(0)  # (B, h, S, .)
        o = _attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0,
                       key_padding_mask=encoder_padding_mask)
        o = o.transpose(1, 2).reshape(b, t, c)
        return self.drop_path(self.proj_drop(self.proj(o)))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, encoder_dim={self.encoder_dim}, attn_drop={self.attn_drop}"


class DecoderAttentionBranch(nn.Module):
    """The decoder's attention as one residual function: ``h = SA(x)``; ``F(x) = h + CA(x + h)``.

    So ``x + F(x)`` is the decoder's ``x + SA(x)``, then ``+ CA(.)``: a small residual
    sub-stack inside one branch (the reversible coupling's F; see the module's docstring).
    """

    def __init__(self, self_attn: AttentionBranch, cross_attn: CrossAttentionBranch) -> None:
        super().__init__()
        self.self_attn, self.cross_attn = self_attn, cross_attn

    def forward(self, x: torch.Tensor, **context: Any) -> torch.Tensor:
        h = self.self_attn(x, **context)
        return h + self.cross_attn(x + h, **context)


class MlpBranch(nn.Module):
    """``drop_path(dropout(fc2(dropout(act(fc1(LayerNorm(x)))))))``, hidden width ``mlp_ratio * C``.

    Ignores context keywords (masks, positions, encoder states): it acts per token.
    """

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

    def forward(self, x: torch.Tensor, **_: Any) -> torch.Tensor:
        return self.drop_path(self.drop2(self.fc2(self.drop1(self.act(self.fc1(self.norm(x)))))))


def _branches(embed_dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, drop_rate: float,
              attn_drop_rate: float, drop_path: float, causal: bool, factory: dict[str, Any], *,
              cross_attention: bool = False,
              encoder_dim: int | None = None) -> tuple[AttentionBranch | DecoderAttentionBranch, MlpBranch]:
    attn = AttentionBranch(embed_dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop_rate,
                           proj_drop=drop_rate, drop_path=drop_path, causal=causal, **factory)
    mlp = MlpBranch(embed_dim, mlp_ratio, drop=drop_rate, drop_path=drop_path, **factory)
    if not cross_attention:
        return attn, mlp
    cross = CrossAttentionBranch(embed_dim, num_heads, encoder_dim, qkv_bias=qkv_bias,
                                 attn_drop=attn_drop_rate, proj_drop=drop_rate, drop_path=drop_path,
                                 **factory)
    return DecoderAttentionBranch(attn, cross), mlp


# --------------------------------------------------------------------------------------
# Input checks (named argument, the shape got, the shape expected, the fix)
# --------------------------------------------------------------------------------------

def _check_tokens(owner: str, x: torch.Tensor, embed_dim: int) -> None:
    if x.dim() != 3 or x.shape[-1] != embed_dim:
        raise ValueError(f"{owner}: expects tokens of shape (B, T, {embed_dim}), got {tuple(x.shape)}. "
                         f"Fix: build it with embed_dim={x.shape[-1] if x.dim() == 3 else 'C'} or project "
                         f"the tokens to {embed_dim} features first.")


def _check_padding(owner: str, name: str, mask: Any, b: int, n: int, what: str) -> None:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"{owner}: {name} must be a bool tensor (True = padding), got {got}. Fix: pass "
                        f"(ids == pad_id) or mask.bool() (True where the {what} is padding).")
    if tuple(mask.shape) != (b, n):
        raise ValueError(f"{owner}: {name} has shape {tuple(mask.shape)}, expected (B, {what[0].upper()}) = "
                         f"{(b, n)}: one flag per sample and {what}. Fix: pass a (batch, length) mask of "
                         f"the {what}s, True = padding.")


def _check_context(owner: str, x: torch.Tensor, num_heads: int, cross_attention: bool,
                   encoder_dim: int, context: dict[str, Any]) -> None:
    """Refuses context arguments of the wrong type, dtype or shape, or a batch other than the tokens'."""
    b, t, c = x.shape
    full = (b, num_heads, t, t)
    mask = context.get("attn_mask")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or not (mask.dtype == torch.bool or mask.is_floating_point()):
            got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise TypeError(f"{owner}: attn_mask must be a bool tensor (True = may attend) or a float one "
                            f"(added to the attention scores), got {got}. Fix: mask.bool() for a 0/1 mask "
                            f"with 1 = may attend, or mask.float() for an additive bias.")
        try:
            fits = torch.broadcast_shapes(tuple(mask.shape), full) == full
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"{owner}: attn_mask has shape {tuple(mask.shape)}, expected a shape "
                             f"broadcastable to (B, heads, T, T) = {full}. Fix: pass (T, T) = {(t, t)} for "
                             f"all samples, or (B, 1, T, T) = {(b, 1, t, t)} for one mask per sample.")
    if context.get("key_padding_mask") is not None:
        _check_padding(owner, "key_padding_mask", context["key_padding_mask"], b, t, "token")
    rope = context.get("rope")
    if rope is not None:
        d = c // num_heads
        if (not isinstance(rope, tuple | list) or len(rope) != 2
                or not all(isinstance(r, torch.Tensor) for r in rope)):
            raise TypeError(f"{owner}: rope must be the tables (cos, sin), a tuple of two tensors of shape "
                            f"(T, head_dim) = {(t, d)}, got {type(rope).__name__}. Fix: pass "
                            f"rope=revnet.models.transformer.rope_tables({t}, {d}).")
        for name, r in zip(("cos", "sin"), rope, strict=True):
            if tuple(r.shape) != (t, d) or not r.is_floating_point():
                raise ValueError(f"{owner}: rope's {name} table has shape {tuple(r.shape)} ({r.dtype}), "
                                 f"expected float (T, head_dim) = {(t, d)}. Fix: rope_tables({t}, {d}), or "
                                 f"slice longer tables to the first {t} positions.")
    enc = context.get("encoder")
    if enc is not None and not cross_attention:
        raise ValueError(f"{owner}: encoder= was given but the model has no cross-attention, so it would "
                         f"be ignored. Fix: build it with cross_attention=True (and encoder_dim=), or drop "
                         f"encoder=.")
    if cross_attention and enc is None:
        raise ValueError(f"{owner}: built with cross_attention=True, so it needs the encoder's states: pass "
                         f"encoder= of shape (B, S, {encoder_dim}).")
    if enc is not None and (not isinstance(enc, torch.Tensor) or enc.dim() != 3 or enc.shape[0] != b
                            or enc.shape[-1] != encoder_dim):
        got = tuple(enc.shape) if isinstance(enc, torch.Tensor) else type(enc).__name__
        raise ValueError(f"{owner}: encoder has shape {got}, expected (B, S, encoder_dim) = (B={b}, S, "
                         f"{encoder_dim}) with the tokens' batch B={b}. Fix: pass the encoder output of the "
                         f"same samples as the tokens, or build with encoder_dim= its width.")
    pad = context.get("encoder_padding_mask")
    if pad is not None:
        if enc is None:
            raise ValueError(f"{owner}: encoder_padding_mask was given without encoder=. Fix: pass both.")
        _check_padding(owner, "encoder_padding_mask", pad, b, enc.shape[1], "source")


def _context(attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, rope: Rope | None,
             encoder: torch.Tensor | None, encoder_padding_mask: torch.Tensor | None) -> dict[str, Any]:
    given = {"attn_mask": attn_mask, "key_padding_mask": key_padding_mask, "rope": rope, "encoder": encoder,
             "encoder_padding_mask": encoder_padding_mask}
    return {k: v for k, v in given.items() if v is not None}


# --------------------------------------------------------------------------------------
# The transformers
# --------------------------------------------------------------------------------------

class TransformerBlock(nn.Module):
    """The pre-norm residual block: ``x = x + F(x)``; ``x = x + G(x)`` (F attention, G MLP).

    With ``cross_attention`` F is :class:`DecoderAttentionBranch`, so the block is the
    decoder's ``x + SA(x)``, ``+ CA(.)``, ``+ MLP(.)``. Context keywords reach both branches.
    """

    def __init__(self, embed_dim: int, num_heads: int, mlp_ratio: float = 4.0, *, qkv_bias: bool = True,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path: float = 0.0,
                 causal: bool = False, cross_attention: bool = False, encoder_dim: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.attn, self.mlp = _branches(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate,
                                        drop_path, causal, {"device": device, "dtype": dtype},
                                        cross_attention=cross_attention, encoder_dim=encoder_dim)

    def forward(self, x: torch.Tensor, **context: Any) -> torch.Tensor:
        x = x + self.attn(x, **context)
        return x + self.mlp(x, **context)


class Transformer(nn.Module):
    """``depth`` residual :class:`TransformerBlock` s and a final LayerNorm: ``(B, T, C) -> (B, T, C)``.

    The baseline of :class:`RevTransformer`: the same branches, every activation stored.
    Arguments as :class:`RevTransformer` (without ``reversible``, ``exact`` and ``fuse``);
    ``forward`` takes the same context keywords.
    """

    def __init__(self, embed_dim: int, depth: int, num_heads: int, mlp_ratio: float = 4.0, *,
                 qkv_bias: bool = True, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, causal: bool = False, cross_attention: bool = False,
                 encoder_dim: int | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"Transformer: depth must be >= 1, got {depth}.")
        check_heads("Transformer", embed_dim, num_heads)
        self.embed_dim, self.out_features, self.num_heads = embed_dim, embed_dim, num_heads
        self.cross_attention = cross_attention
        self.encoder_dim = embed_dim if encoder_dim is None else encoder_dim
        self.blocks = nn.ModuleList(
            TransformerBlock(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, drop_rate=drop_rate,
                             attn_drop_rate=attn_drop_rate, drop_path=dp, causal=causal,
                             cross_attention=cross_attention, encoder_dim=encoder_dim, device=device,
                             dtype=dtype)
            for dp in drop_path_rates(drop_path_rate, depth))
        self.norm = nn.LayerNorm(embed_dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, *, attn_mask: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None, rope: Rope | None = None,
                encoder: torch.Tensor | None = None,
                encoder_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        _check_tokens("Transformer", x, self.embed_dim)
        context = _context(attn_mask, key_padding_mask, rope, encoder, encoder_padding_mask)
        _check_context("Transformer", x, self.num_heads, self.cross_attention, self.encoder_dim, context)
        for block in self.blocks:
            x = block(x, **context)
        return self.norm(x)


class RevTransformer(ReversibleSwitch, nn.Module):
    """A reversible transformer over tokens: ``(B, T, C) -> (B, T, 2C)``; stores no block activations.

    The tokens are duplicated into two streams of width ``C`` (RevViT, Mangalam et al.
    2022, Sec. 3); block ``i`` is the coupling ``y1 = x1 + F_i(x2)``, ``y2 = x2 + G_i(y1)``
    with ``F_i`` = LayerNorm + multi-head self-attention (with ``cross_attention``:
    :class:`DecoderAttentionBranch`, self- then cross-attention) and ``G_i`` = LayerNorm + MLP;
    the streams leave concatenated and normalised by ``LayerNorm(2C)`` (``out_features`` is
    ``2 * embed_dim``), or with ``fuse="mean"`` averaged and normalised by ``LayerNorm(C)``
    (``out_features`` is ``embed_dim``: a language model's head can then tie to its embedding,
    and the parameters are exactly :class:`Transformer`'s). ``forward`` takes the context
    keywords of the module's docstring and passes them to every F and G; the tensors among them
    get their gradients in reversible mode too.

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
        cross_attention: decoder blocks, attending also to ``encoder=`` states.
        encoder_dim: width of the encoder's states (default ``embed_dim``).
        fuse: ``"concat"`` (RevViT) or ``"mean"``: how the two streams leave.
        reversible: start with reversible backprop (flip with ``.reversible`` or
            :func:`revnet.set_reversible`; False is the same modules under plain autograd).
        exact: fixed-point couplings (:class:`revnet.AdditiveCoupling`, ``exact=True``).
    """

    def __init__(self, embed_dim: int, depth: int, num_heads: int, mlp_ratio: float = 4.0, *,
                 qkv_bias: bool = True, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, causal: bool = False, cross_attention: bool = False,
                 encoder_dim: int | None = None, fuse: str = "concat", reversible: bool = True,
                 exact: bool = False, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"RevTransformer: depth must be >= 1, got {depth}.")
        if fuse not in FUSES:
            raise ValueError(f"RevTransformer: unknown fuse {fuse!r}; expected one of {FUSES}.")
        check_heads("RevTransformer", embed_dim, num_heads)
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.fuse = embed_dim, num_heads, fuse
        self.out_features = 2 * embed_dim if fuse == "concat" else embed_dim
        self.cross_attention = cross_attention
        self.encoder_dim = embed_dim if encoder_dim is None else encoder_dim
        self.blocks = ReversibleSequence(
            [AdditiveCoupling(*_branches(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate,
                                         dp, causal, factory, cross_attention=cross_attention,
                                         encoder_dim=encoder_dim), dim=-1)
             for dp in drop_path_rates(drop_path_rate, depth)],
            reversible=reversible)
        self.norm = nn.LayerNorm(self.out_features, **factory)  # the fusion of the two streams
        set_exact(self, exact)

    def forward(self, x: torch.Tensor, *, attn_mask: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None, rope: Rope | None = None,
                encoder: torch.Tensor | None = None,
                encoder_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        _check_tokens("RevTransformer", x, self.embed_dim)
        context = _context(attn_mask, key_padding_mask, rope, encoder, encoder_padding_mask)
        _check_context("RevTransformer", x, self.num_heads, self.cross_attention, self.encoder_dim, context)
        y = self.blocks(torch.cat((x, x), dim=-1), **context)  # (B, T, 2C): both streams
        if self.fuse == "mean":
            y1, y2 = y.chunk(2, dim=-1)
            y = (y1 + y2) / 2
        return self.norm(y)
