"""Vision transformers: the residual ViT baseline and the reversible RevViT.

- :class:`VisionTransformer`: ViT / DeiT (Dosovitskiy et al. 2021; Touvron et al. 2021):
  patch embedding, a CLS token, learned position embeddings, pre-norm residual blocks, the
  CLS token's features into the classifier. Parameter counts match timm's ``vit_*_patch16_224``.
- :class:`RevViT`: Rev-ViT (Mangalam et al., CVPR 2022): the same patch embedding and
  position embeddings, no CLS token, a :class:`RevTransformer` (two streams, fused by
  concatenation and ``LayerNorm(2C)``), mean pooling over tokens, the classifier on ``2C``.

Both take timm's keyword names (``img_size, patch_size, in_chans, num_classes, embed_dim,
depth, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, drop_path_rate``) and a
``tokenizer``: ``"patch"`` (a ``patch_size`` convolution, the papers') or ``"conv"``, a small
convolutional tokenizer (CCT, Hassani et al. 2021: two 3x3 convolutions and a max-pool, one
token per ``4x4`` pixels) that learns faster on small images.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..engine.modes import ReversibleSwitch
from .layers import NormLayer
from .registry import register_model
from .transformer import RevTransformer, Transformer

__all__ = ["ConvTokenizer", "PatchEmbed", "RevViT", "VisionTransformer"]

TOKENIZERS = ("patch", "conv")


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch_size`` patches, linearly embedded: ``(B, C_in, H, W) -> (B, T, C)``."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, *,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if patch_size < 1 or img_size % patch_size:
            fit = max(patch_size, img_size // max(patch_size, 1) * max(patch_size, 1))
            raise ValueError(
                f"PatchEmbed: img_size {img_size} is not divisible by patch_size {patch_size}, so the "
                f"patches would not tile the image. Fix: resize or crop the images to {fit} (or pad to "
                f"{fit + patch_size}), or pick a patch_size dividing {img_size}.")
        self.img_size, self.patch_size = img_size, patch_size
        self.grid = img_size // patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, T, C), T = (H/p)(W/p)


class ConvTokenizer(nn.Module):
    """Two 3x3 convolutions (the second stride 2) with BatchNorm and GELU, then 2x2 max-pool.

    One token per 4x4 pixels, each seeing 10x10 (CCT, Hassani et al. 2021, Sec. 3): local
    features a patch embedding must otherwise learn from few images.
    """

    def __init__(self, img_size: int, in_chans: int, embed_dim: int, *,
                 norm_layer: NormLayer = nn.BatchNorm2d, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if img_size % 4:
            raise ValueError(f"ConvTokenizer: img_size {img_size} must be divisible by 4 (one token per 4x4 "
                             f"pixels). Fix: pad or resize the images to {img_size + 4 - img_size % 4}.")
        factory = {"device": device, "dtype": dtype}
        mid = max(embed_dim // 2, 1)
        self.img_size, self.patch_size, self.grid = img_size, 4, img_size // 4
        self.body = nn.Sequential(
            nn.Conv2d(in_chans, mid, 3, padding=1, bias=False, **factory), norm_layer(mid, **factory),
            nn.GELU(),
            nn.Conv2d(mid, embed_dim, 3, stride=2, padding=1, bias=False, **factory),
            norm_layer(embed_dim, **factory), nn.GELU(),
            nn.MaxPool2d(2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).flatten(2).transpose(1, 2)  # (B, T, C), T = (H/4)(W/4)


def _tokenizer(owner: str, tokenizer: str, img_size: int, patch_size: int, in_chans: int, embed_dim: int,
               norm_layer: NormLayer, factory: dict[str, Any]) -> PatchEmbed | ConvTokenizer:
    if tokenizer == "patch":
        return PatchEmbed(img_size, patch_size, in_chans, embed_dim, **factory)
    if tokenizer == "conv":
        return ConvTokenizer(img_size, in_chans, embed_dim, norm_layer=norm_layer, **factory)
    raise ValueError(f"{owner}: unknown tokenizer {tokenizer!r}; expected one of {TOKENIZERS}.")


class _ViTBase(nn.Module):
    """Tokenizer, position embeddings and the input check the two ViTs share."""

    tokens: PatchEmbed | ConvTokenizer

    def _check_input(self, x: torch.Tensor) -> None:
        size, chans = self.tokens.img_size, self.in_chans
        if x.dim() != 4 or x.shape[1] != chans or tuple(x.shape[2:]) != (size, size):
            raise ValueError(
                f"{type(self).__name__}: expects images of shape (B, {chans}, {size}, {size}), got "
                f"{tuple(x.shape)}. Fix: build it with img_size= and in_chans= of your images "
                f"(position embeddings are learned per token, so the size is fixed).")

    @property
    def in_chans(self) -> int:
        return next(m for m in self.tokens.modules() if isinstance(m, nn.Conv2d)).in_channels

    def _init_weights(self) -> None:
        # ViT's initialisation (timm): truncated normal 0.02 for linear weights and embeddings.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)


class VisionTransformer(_ViTBase):
    """ViT / DeiT with a CLS token: the residual baseline (every block's activations stored).

    Args:
        img_size: side of the square input images.
        patch_size: side of a patch (``tokenizer="patch"``).
        in_chans: image channels.
        num_classes: classifier outputs.
        embed_dim: token width.
        depth: transformer blocks.
        num_heads: attention heads; must divide ``embed_dim``.
        mlp_ratio: MLP hidden width over ``embed_dim``.
        qkv_bias: bias in the query/key/value projection.
        drop_rate: dropout after the position embedding, the attention projection and in the MLP.
        attn_drop_rate: dropout on the attention weights.
        drop_path_rate: stochastic depth of the last block (linear from 0 over the blocks).
        class_token: classify from a CLS token (True, ViT) or the mean of the tokens.
        tokenizer: ``"patch"`` or ``"conv"`` (see the module's docstring).
        norm_layer: normalisation of the convolutional tokenizer (the transformer's own is
            LayerNorm).
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, *, class_token: bool = True, tokenizer: str = "patch",
                 norm_layer: NormLayer = nn.BatchNorm2d, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.tokens = _tokenizer(type(self).__name__, tokenizer, img_size, patch_size, in_chans, embed_dim,
                                 norm_layer, factory)
        n = self.tokens.grid ** 2 + (1 if class_token else 0)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim, **factory)) if class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, n, embed_dim, **factory))
        self.pos_drop = nn.Dropout(drop_rate)
        self.transformer = Transformer(embed_dim, depth, num_heads, mlp_ratio, qkv_bias=qkv_bias,
                                       drop_rate=drop_rate, attn_drop_rate=attn_drop_rate,
                                       drop_path_rate=drop_path_rate, **factory)
        self.head = nn.Linear(embed_dim, num_classes, **factory)
        self._init_weights()
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        t = self.tokens(x)  # (B, T, C)
        if self.cls_token is not None:
            t = torch.cat((self.cls_token.expand(t.shape[0], -1, -1), t), dim=1)
        t = self.transformer(self.pos_drop(t + self.pos_embed))
        return self.head(t[:, 0] if self.cls_token is not None else t.mean(dim=1))


class RevViT(ReversibleSwitch, _ViTBase):
    """Rev-ViT (Mangalam et al. 2022): reversible blocks, no CLS token, mean pooling.

    Arguments as :class:`VisionTransformer`, plus ``reversible`` and ``exact`` (see
    :class:`RevTransformer`). A CLS token is refused: with two streams rebuilt from each
    other there is no single token to read, so the classifier reads the mean of the fused
    tokens (as RevViT).
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, *, class_token: bool = False, global_pool: str = "avg",
                 tokenizer: str = "patch", norm_layer: NormLayer = nn.BatchNorm2d, reversible: bool = True,
                 exact: bool = False, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if class_token or global_pool != "avg":
            raise ValueError(
                "RevViT: has no CLS token (class_token=True / global_pool='token' was asked): its two "
                "streams are fused and mean-pooled as in RevViT. Fix: leave class_token=False and "
                "global_pool='avg', or use vit_* (VisionTransformer) for a CLS-token classifier.")
        factory = {"device": device, "dtype": dtype}
        self.tokens = _tokenizer(type(self).__name__, tokenizer, img_size, patch_size, in_chans, embed_dim,
                                 norm_layer, factory)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.tokens.grid ** 2, embed_dim, **factory))
        self.pos_drop = nn.Dropout(drop_rate)
        self.transformer = RevTransformer(embed_dim, depth, num_heads, mlp_ratio, qkv_bias=qkv_bias,
                                          drop_rate=drop_rate, attn_drop_rate=attn_drop_rate,
                                          drop_path_rate=drop_path_rate, reversible=reversible, exact=exact,
                                          **factory)
        self.head = nn.Linear(2 * embed_dim, num_classes, **factory)
        self._init_weights()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        t = self.pos_drop(self.tokens(x) + self.pos_embed)  # (B, T, C)
        return self.head(self.transformer(t).mean(dim=1))  # (B, T, 2C) -> (B, 2C) -> classes


# --------------------------------------------------------------------------------------
# Registered models (timm's names for the keyword arguments; img_size=224 unless given)
# --------------------------------------------------------------------------------------

def _vit(cls: type[nn.Module], defaults: dict[str, Any], kw: dict[str, Any]) -> nn.Module:
    return cls(**{**defaults, **kw})


_SMALL = {"patch_size": 16, "embed_dim": 384, "depth": 12, "num_heads": 6}   # DeiT-S
_BASE = {"patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12}   # DeiT-B / ViT-B/16
_LARGE = {"patch_size": 16, "embed_dim": 1024, "depth": 24, "num_heads": 16}  # ViT-L/16
# CPU-sized for 28x28 Fashion-MNIST (the fashion-mnist-vit recipe): conv tokenizer, 7x7 tokens.
_MINI = {"img_size": 28, "tokenizer": "conv", "embed_dim": 128, "depth": 6, "num_heads": 4, "mlp_ratio": 2.0}


@register_model
def vit_small(**kw: Any) -> nn.Module:
    """ViT-S/16 (DeiT-S): 22.05M parameters at 1000 classes, 224px."""
    return _vit(VisionTransformer, _SMALL, kw)


@register_model
def vit_base(**kw: Any) -> nn.Module:
    """ViT-B/16 (DeiT-B): 86.57M parameters at 1000 classes, 224px."""
    return _vit(VisionTransformer, _BASE, kw)


@register_model
def vit_large(**kw: Any) -> nn.Module:
    """ViT-L/16: 304.3M parameters at 1000 classes, 224px."""
    return _vit(VisionTransformer, _LARGE, kw)


@register_model
def revvit_small(**kw: Any) -> nn.Module:
    """Rev-ViT-S (Mangalam et al. 2022): 22.44M parameters at 1000 classes, 224px."""
    return _vit(RevViT, _SMALL, kw)


@register_model
def revvit_base(**kw: Any) -> nn.Module:
    """Rev-ViT-B (Mangalam et al. 2022): 87.34M parameters at 1000 classes, 224px."""
    return _vit(RevViT, _BASE, kw)


@register_model
def revvit_large(**kw: Any) -> nn.Module:
    """Rev-ViT at ViT-L/16 size, where RevViT's 15.5x memory figure was measured."""
    return _vit(RevViT, _LARGE, kw)


@register_model
def vit_mini(**kw: Any) -> nn.Module:
    """CPU-sized residual ViT for 28x28 images: conv tokenizer, 49 tokens of 128, 6 blocks, mean pool."""
    return _vit(VisionTransformer, {**_MINI, "class_token": False}, kw)


@register_model
def revvit_mini(**kw: Any) -> nn.Module:
    """CPU-sized Rev-ViT for 28x28 images (the ``fashion-mnist-vit`` recipe): as ``vit_mini``, reversible."""
    return _vit(RevViT, _MINI, kw)

