"""Building blocks: residual functions F/G, stage-opening units, stems and the head.

All residual functions are pre-activation (He et al. 2016, "Identity Mappings"), as in
the RevNet paper's official code: ``BN-ReLU-conv`` repeated. Layer classes are passed in
(``norm_layer``, ``act_layer``) and ``device``/``dtype`` flow through to every weight.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BasicResidual",
    "BottleneckResidual",
    "Head",
    "ImageNetStem",
    "PadShortcut",
    "ResidualUnit",
    "RevDownsample",
    "cifar_stem",
    "conv1x1",
    "conv3x3",
    "shortcut",
]

NormLayer = Callable[..., nn.Module]
ActLayer = Callable[[], nn.Module]


def conv3x3(in_chans: int, out_chans: int, stride: int = 1, **factory: Any) -> nn.Conv2d:
    return nn.Conv2d(in_chans, out_chans, 3, stride=stride, padding=1, bias=False, **factory)


def conv1x1(in_chans: int, out_chans: int, stride: int = 1, **factory: Any) -> nn.Conv2d:
    return nn.Conv2d(in_chans, out_chans, 1, stride=stride, bias=False, **factory)


class BasicResidual(nn.Sequential):
    """``BN-ReLU-conv3x3(stride)-BN-ReLU-conv3x3``: the basic residual function.

    Args:
        in_chans: input channels.
        out_chans: output channels.
        stride: stride of the first convolution.
        norm_layer: normalisation class, called as ``norm_layer(channels, **factory)``.
        act_layer: activation class, called with no arguments.
    """

    def __init__(
        self,
        in_chans: int,
        out_chans: int,
        stride: int = 1,
        *,
        norm_layer: NormLayer = nn.BatchNorm2d,
        act_layer: ActLayer = nn.ReLU,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        factory = {"device": device, "dtype": dtype}
        super().__init__(
            norm_layer(in_chans, **factory), act_layer(),
            conv3x3(in_chans, out_chans, stride, **factory),
            norm_layer(out_chans, **factory), act_layer(),
            conv3x3(out_chans, out_chans, **factory),
        )


class BottleneckResidual(nn.Sequential):
    """``BN-ReLU-conv1x1-BN-ReLU-conv3x3(stride)-BN-ReLU-conv1x1``: the bottleneck function.

    Args:
        in_chans: input channels.
        width: channels of the inner 3x3 convolution.
        out_chans: output channels.
        stride: stride of the 3x3 convolution.
    """

    def __init__(
        self,
        in_chans: int,
        width: int,
        out_chans: int,
        stride: int = 1,
        *,
        norm_layer: NormLayer = nn.BatchNorm2d,
        act_layer: ActLayer = nn.ReLU,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        factory = {"device": device, "dtype": dtype}
        super().__init__(
            norm_layer(in_chans, **factory), act_layer(),
            conv1x1(in_chans, width, **factory),
            norm_layer(width, **factory), act_layer(),
            conv3x3(width, width, stride, **factory),
            norm_layer(width, **factory), act_layer(),
            conv1x1(width, out_chans, **factory),
        )


class PadShortcut(nn.Module):
    """Parameter-free shortcut: average-pool by ``stride``, zero-pad the new channels.

    The basic-block shortcut of the paper's official code (and of He et al.'s CIFAR
    "option A"): it keeps the parameter counts of the paper's table.
    """

    def __init__(self, in_chans: int, out_chans: int, stride: int = 1) -> None:
        super().__init__()
        if out_chans < in_chans:
            raise ValueError(f"PadShortcut: cannot shrink {in_chans} to {out_chans} channels; "
                             f"use a projection shortcut.")
        self.in_chans, self.out_chans, self.stride = in_chans, out_chans, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = F.avg_pool2d(x, self.stride, ceil_mode=True)
        extra = self.out_chans - self.in_chans
        return F.pad(x, (0, 0, 0, 0, 0, extra)) if extra else x  # (B, C_out, H/s, W/s)

    def extra_repr(self) -> str:
        return f"{self.in_chans}, {self.out_chans}, stride={self.stride}"


def shortcut(
    kind: str, in_chans: int, out_chans: int, stride: int, **factory: Any
) -> nn.Module:
    """Identity when shapes agree, else ``pad`` (parameter-free) or ``project`` (1x1 conv)."""
    if in_chans == out_chans and stride == 1:
        return nn.Identity()
    if kind == "pad":
        return PadShortcut(in_chans, out_chans, stride)
    if kind == "project":
        return conv1x1(in_chans, out_chans, stride, **factory)
    raise ValueError(f"shortcut: unknown kind {kind!r}; expected 'pad' or 'project'.")


class ResidualUnit(nn.Module):
    """``y = shortcut(x) + residual(x)``: one unit of an ordinary ResNet."""

    def __init__(self, residual: nn.Module, shortcut: nn.Module) -> None:
        super().__init__()
        self.residual = residual
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.residual(x)


class RevDownsample(nn.Module):
    """The non-reversible unit opening a RevNet stage (paper Sec. 3.2).

    Same two-branch form as a coupling, with shortcuts that change resolution or width:
    ``y1 = s1(x1) + F(x2)``, ``y2 = s2(x2) + G(y1)``. It cannot be inverted, so it runs
    under ordinary autograd and its activations are stored; there is one per stage, so
    their memory does not grow with depth.
    """

    def __init__(self, f: nn.Module, g: nn.Module, s1: nn.Module, s2: nn.Module) -> None:
        super().__init__()
        self.f, self.g, self.s1, self.s2 = f, g, s1, s2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] % 2:
            raise ValueError(f"RevDownsample: input of shape {tuple(x.shape)} has an odd channel "
                             f"count; the stem must produce an even number of channels.")
        x1, x2 = x.chunk(2, 1)  # (B, C/2, H, W) each
        y1 = self.s1(x1) + self.f(x2)
        y2 = self.s2(x2) + self.g(y1)
        return torch.cat((y1, y2), 1)


def cifar_stem(in_chans: int, out_chans: int, **factory: Any) -> nn.Module:
    """3x3 convolution at full resolution (CIFAR, Fashion-MNIST)."""
    return conv3x3(in_chans, out_chans, **factory)


class ImageNetStem(nn.Sequential):
    """7x7 stride-2 convolution, BN, ReLU, 3x3 stride-2 max-pool: resolution / 4."""

    def __init__(
        self,
        in_chans: int,
        out_chans: int,
        *,
        norm_layer: NormLayer = nn.BatchNorm2d,
        act_layer: ActLayer = nn.ReLU,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        factory = {"device": device, "dtype": dtype}
        super().__init__(
            nn.Conv2d(in_chans, out_chans, 7, stride=2, padding=3, bias=False, **factory),
            norm_layer(out_chans, **factory), act_layer(),
            nn.MaxPool2d(3, stride=2, padding=1),
        )


class Head(nn.Sequential):
    """Final pre-activation ``BN-ReLU``, global average pool and the classifier."""

    def __init__(
        self,
        in_chans: int,
        num_classes: int,
        *,
        norm_layer: NormLayer = nn.BatchNorm2d,
        act_layer: ActLayer = nn.ReLU,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        factory = {"device": device, "dtype": dtype}
        super().__init__(
            norm_layer(in_chans, **factory), act_layer(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(in_chans, num_classes, **factory),
        )
