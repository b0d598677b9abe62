"""Pieces shared by the RevNet and ResNet builders."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .layers import Head, ImageNetStem, cifar_stem

BLOCKS = ("basic", "bottleneck")
STEMS = ("cifar", "imagenet")
EXPANSION = 4  # bottleneck output channels per unit of width (He et al. 2016)


def check_config(owner: str, units: Sequence[int], channels: Sequence[int], block: str, stem: str) -> None:
    if block not in BLOCKS:
        raise ValueError(f"{owner}: unknown block {block!r}; expected one of {BLOCKS}.")
    if stem not in STEMS:
        raise ValueError(f"{owner}: unknown stem {stem!r}; expected one of {STEMS}.")
    if len(channels) != len(units) + 1:
        raise ValueError(
            f"{owner}: channels {tuple(channels)} must hold the stem's width and then one width per "
            f"stage ({len(units)} stages from units={tuple(units)}), i.e. {len(units) + 1} numbers."
        )
    if any(u < 1 for u in units) or any(c < 1 for c in channels):
        raise ValueError(f"{owner}: units {tuple(units)} and channels {tuple(channels)} must be >= 1.")


def make_stem(stem: str, in_chans: int, out_chans: int, **layer_kw: Any) -> nn.Module:
    if stem == "imagenet":
        return ImageNetStem(in_chans, out_chans, **layer_kw)
    factory = {k: layer_kw[k] for k in ("device", "dtype") if k in layer_kw}
    return cifar_stem(in_chans, out_chans, **factory)


class Classifier(nn.Module):
    """``stem -> stages -> head``; the common frame of RevNet and ResNet."""

    def __init__(self, stem: nn.Module, stages: nn.Sequential, head: Head) -> None:
        super().__init__()
        self.stem, self.stages, self.head = stem, stages, head
        # Convolution weights channels-last: the convolutions then run channels-last whatever the
        # batch's layout (faster on CPU, and for tensor cores), so a plain NCHW batch takes the fast
        # path too, for one conversion in the stem. model.to(memory_format=...) changes it.
        self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"{type(self).__name__}: expects images of shape (B, C, H, W), "
                             f"got {tuple(x.shape)}.")
        expected = self.in_chans
        if x.shape[1] != expected:
            raise ValueError(
                f"{type(self).__name__}: input has {x.shape[1]} channels {tuple(x.shape)} but the "
                f"model was built with in_chans={expected}; pass in_chans={x.shape[1]} to create_model."
            )
        return self.head(self.stages(self.stem(x)))

    @property
    def in_chans(self) -> int:
        first = next(m for m in self.stem.modules() if isinstance(m, nn.Conv2d))
        return first.in_channels
