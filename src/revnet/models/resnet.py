"""Pre-activation ResNet baselines matching the paper's comparisons (He et al. 2016)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .convnet import EXPANSION, Classifier, check_config, make_stem
from .layers import BasicResidual, BottleneckResidual, Head, ResidualUnit, shortcut
from .registry import register_model

__all__ = ["ResNet"]


class ResNet(Classifier):
    """An ordinary pre-activation ResNet: every activation is stored for backward.

    Args:
        units: residual units per stage.
        channels: the stem's width, then each stage's width (bottleneck: inner width,
            output 4x).
        block: ``"basic"`` (pad shortcuts, as the paper's CIFAR baselines) or
            ``"bottleneck"`` (1x1 projection shortcuts).
        stem: ``"cifar"`` or ``"imagenet"``.
        num_classes: classifier outputs.
        in_chans: input image channels.
        norm_layer: normalisation class.
        act_layer: activation class.
    """

    def __init__(
        self,
        units: Sequence[int],
        channels: Sequence[int],
        *,
        block: str = "basic",
        stem: str = "cifar",
        num_classes: int = 10,
        in_chans: int = 3,
        norm_layer: Any = nn.BatchNorm2d,
        act_layer: Any = nn.ReLU,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        check_config("ResNet", units, channels, block, stem)
        layer_kw = {"norm_layer": norm_layer, "act_layer": act_layer, "device": device, "dtype": dtype}
        factory = {"device": device, "dtype": dtype}
        stages = []
        c_in = channels[0]
        for i, (n, width) in enumerate(zip(units, channels[1:], strict=True)):
            stage = []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                if block == "basic":
                    c_out = width
                    res = BasicResidual(c_in, c_out, stride, **layer_kw)
                    sc = shortcut("pad", c_in, c_out, stride)
                else:
                    c_out = width * EXPANSION
                    res = BottleneckResidual(c_in, width, c_out, stride, **layer_kw)
                    sc = shortcut("project", c_in, c_out, stride, **factory)
                stage.append(ResidualUnit(res, sc))
                c_in = c_out
            stages.append(nn.Sequential(*stage))
        super().__init__(
            make_stem(stem, in_chans, channels[0], **layer_kw),
            nn.Sequential(*stages),
            Head(c_in, num_classes, **layer_kw),
        )


@register_model
def resnet32(**kw: Any) -> ResNet:
    """ResNet-32, CIFAR (paper Table 1: 0.46M parameters)."""
    return ResNet(units=(5, 5, 5), channels=(16, 16, 32, 64), block="basic", **kw)


@register_model
def resnet110(**kw: Any) -> ResNet:
    """ResNet-110, CIFAR (paper Table 1: 1.73M parameters)."""
    return ResNet(units=(18, 18, 18), channels=(16, 16, 32, 64), block="basic", **kw)


@register_model
def resnet164(**kw: Any) -> ResNet:
    """ResNet-164, CIFAR, bottleneck (paper Table 1: 1.70M parameters)."""
    return ResNet(units=(18, 18, 18), channels=(16, 16, 32, 64), block="bottleneck", **kw)


@register_model
def resnet101(**kw: Any) -> ResNet:
    """ResNet-101, ImageNet, bottleneck (paper Table 1: 44.5M parameters at 1000 classes)."""
    return ResNet(units=(3, 4, 23, 3), channels=(64, 64, 128, 256, 512), block="bottleneck",
                  stem="imagenet", **kw)
