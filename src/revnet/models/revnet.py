"""RevNet builders (Gomez et al. 2017, Table 1 and Sec. 5)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..engine import AdditiveCoupling, Recomputed, ReversibleSequence, set_exact
from ..engine.modes import ReversibleSwitch
from .convnet import EXPANSION, Classifier, check_config, make_stem
from .layers import BasicResidual, BottleneckResidual, Head, RevDownsample, shortcut
from .registry import register_model

__all__ = ["RevNet"]


class _StageOpener(Recomputed, RevDownsample):
    """A :class:`RevDownsample` that, in reversible mode, keeps only its input for backward.

    Its input is the previous stage's output, which that stage's reversible sequence keeps
    anyway, so the openers add no stored activations (the paper stores them); at RevNet-164
    they were most of what a step kept (``revnet bench memory`` shows the result).
    """


class RevNet(ReversibleSwitch, Classifier):
    """A reversible residual network: per stage, an opening unit then a reversible sequence.

    Each unit is an additive coupling with F and G acting on half the channels. A stage
    whose first unit changes resolution or width opens with a non-reversible
    :class:`RevDownsample`, which cannot be inverted: in reversible mode it keeps only its
    input (stored anyway) and is recomputed in backward; every other unit is a coupling
    inside one :class:`ReversibleSequence` per stage.

    Args:
        units: units per stage, the opening unit included (e.g. ``(3, 3, 3)``).
        channels: the stem's width, then each stage's width: output channels for
            ``basic``; bottleneck width for ``bottleneck`` (output is 4x).
        block: ``"basic"`` (two 3x3) or ``"bottleneck"`` (1x1-3x3-1x1) residual functions.
        stem: ``"cifar"`` (3x3 conv) or ``"imagenet"`` (7x7/2 conv + max-pool).
        num_classes: classifier outputs.
        in_chans: input image channels.
        reversible: start with reversible backprop (flip later with ``.reversible``).
        preserve_rng_state: see :class:`ReversibleSequence`.
        exact: fixed-point couplings whose reconstruction is bit-exact (see
            :class:`AdditiveCoupling`; flip later with :func:`revnet.set_exact`).
        norm_layer: normalisation class for every layer.
        act_layer: activation class for every layer.
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
        reversible: bool = True,
        preserve_rng_state: bool = True,
        exact: bool = False,
        norm_layer: Any = nn.BatchNorm2d,
        act_layer: Any = nn.ReLU,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        check_config("RevNet", units, channels, block, stem)
        layer_kw = {"norm_layer": norm_layer, "act_layer": act_layer, "device": device, "dtype": dtype}
        factory = {"device": device, "dtype": dtype}
        expansion = EXPANSION if block == "bottleneck" else 1
        if any(c * expansion % 2 for c in channels[1:]) or channels[0] % 2:
            raise ValueError(f"RevNet: channels {tuple(channels)} must give even widths to split.")

        def residual(cin: int, cout: int, stride: int) -> nn.Module:
            if block == "basic":
                return BasicResidual(cin, cout, stride, **layer_kw)
            # Each half of a bottleneck unit gets half of the stage's width (paper Table 1).
            return BottleneckResidual(cin, max(cout // EXPANSION, 1), cout, stride, **layer_kw)

        stages = []
        c_in = channels[0]
        for i, (n, width) in enumerate(zip(units, channels[1:], strict=True)):
            c_out = width * expansion
            stride = 1 if i == 0 else 2
            h_in, h_out = c_in // 2, c_out // 2  # channels of one half
            stage: list[nn.Module] = []
            couplings = []
            if stride == 1 and c_in == c_out:
                couplings.append(AdditiveCoupling(residual(h_in, h_out, 1), residual(h_out, h_out, 1)))
            else:
                kind = "project" if block == "bottleneck" else "pad"
                opener = _StageOpener(
                    residual(h_in, h_out, stride), residual(h_out, h_out, 1),
                    shortcut(kind, h_in, h_out, stride, **factory),
                    shortcut(kind, h_in, h_out, stride, **factory),
                )
                opener.reversible, opener.preserve_rng_state = reversible, preserve_rng_state
                stage.append(opener)
            couplings += [AdditiveCoupling(residual(h_out, h_out, 1), residual(h_out, h_out, 1))
                          for _ in range(n - 1)]
            if couplings:
                stage.append(ReversibleSequence(
                    couplings, reversible=reversible, preserve_rng_state=preserve_rng_state))
            stages.append(nn.Sequential(*stage))
            c_in = c_out
        super().__init__(
            make_stem(stem, in_chans, channels[0], **layer_kw),
            nn.Sequential(*stages),
            Head(c_in, num_classes, **layer_kw),
        )
        set_exact(self, exact)  # also names every coupling by its path, for range errors


@register_model
def revnet38(**kw: Any) -> RevNet:
    """RevNet-38, CIFAR (paper Table 1: 0.46M parameters)."""
    return RevNet(units=(3, 3, 3), channels=(32, 32, 64, 112), block="basic", **kw)


@register_model
def revnet110(**kw: Any) -> RevNet:
    """RevNet-110, CIFAR (paper Table 1: 1.73M parameters)."""
    return RevNet(units=(9, 9, 9), channels=(32, 32, 64, 128), block="basic", **kw)


@register_model
def revnet164(**kw: Any) -> RevNet:
    """RevNet-164, CIFAR, bottleneck (paper Table 1: 1.75M parameters)."""
    return RevNet(units=(9, 9, 9), channels=(32, 32, 64, 128), block="bottleneck", **kw)


@register_model
def revnet104(**kw: Any) -> RevNet:
    """RevNet-104, ImageNet, bottleneck (paper Table 1: 45.2M parameters at 1000 classes)."""
    return RevNet(units=(2, 2, 11, 2), channels=(128, 128, 256, 512, 832), block="bottleneck",
                  stem="imagenet", **kw)
