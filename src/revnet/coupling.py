"""Coupling math: invertible two-branch blocks in plain torch.

A coupling splits its input along ``dim`` into halves ``(x1, x2)`` and computes

    y1 = couple(x1, F(x2))        x2 = decouple(y2, G(y1))
    y2 = couple(x2, G(y1))        x1 = decouple(y1, F(x2))

(Gomez et al. 2017, Sec. 3.1, eq. 5-6). ``couple`` is invertible in its first argument,
so the input can be rebuilt from the output. Everything here is ordinary autograd; the
memory trick that uses the inverse lives in :mod:`revnet.autograd`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["AdditiveCoupling", "AffineCoupling", "Coupling", "merge", "split"]


def split(x: torch.Tensor, dim: int, owner: str = "coupling") -> tuple[torch.Tensor, torch.Tensor]:
    """Splits ``x`` into two equal halves along ``dim`` (views, no copy)."""
    if x.dim() == 0 or not -x.dim() <= dim < x.dim():
        raise ValueError(
            f"{owner}: cannot split a tensor of shape {tuple(x.shape)} along dim={dim}; "
            f"pass dim= the channel dimension (1 for (B, C, H, W) images)."
        )
    size = x.shape[dim]
    if size % 2:
        raise ValueError(
            f"{owner}: input of shape {tuple(x.shape)} has an odd size {size} at dim={dim}, "
            f"so it cannot be split into two equal halves; give the layer before it an even "
            f"number of channels (e.g. {size + 1})."
        )
    x1, x2 = x.chunk(2, dim)
    return x1, x2


def merge(x1: torch.Tensor, x2: torch.Tensor, dim: int) -> torch.Tensor:
    """Inverse of :func:`split`."""
    return torch.cat((x1, x2), dim)


def _name(module: nn.Module) -> str:
    return type(module).__name__


class Coupling(nn.Module):
    """Base of the couplings: holds F and G and the split, subclasses give ``couple``.

    Args:
        f: residual function applied to ``x2``; its output feeds ``couple(x1, .)``.
        g: residual function applied to ``y1``; its output feeds ``couple(x2, .)``.
        dim: dimension along which the input is split in two halves.
    """

    def __init__(self, f: nn.Module, g: nn.Module, dim: int = 1) -> None:
        super().__init__()
        for label, fn in (("f", f), ("g", g)):
            if not callable(fn):
                raise TypeError(f"{type(self).__name__}: {label} must be an nn.Module or callable, "
                                f"got {type(fn).__name__}.")
        self.f = f
        self.g = g
        self.dim = dim

    # --- the algebra a subclass defines -------------------------------------------------
    def couple(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Combines a half ``x`` with a branch output ``h``; invertible in ``x``."""
        raise NotImplementedError

    def decouple(self, y: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`couple` in its first argument."""
        raise NotImplementedError

    def couple_backward(
        self, x: torch.Tensor, h: torch.Tensor, dy: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradients ``(dx, dh)`` of ``couple(x, h)`` given the output's gradient ``dy``.

        The default differentiates :meth:`couple` with autograd; a subclass may override it
        with the closed form (the additive coupling passes ``dy`` through).
        """
        with torch.enable_grad():
            x = x.detach().requires_grad_()
            h = h.detach().requires_grad_()
            y = self.couple(x, h)
        dx, dh = torch.autograd.grad(y, (x, h), dy)
        return dx, dh

    def branch_shape(self, half_shape: torch.Size) -> torch.Size:
        """Shape F and G must return for a half of shape ``half_shape``."""
        return half_shape

    # --- running the branches, with the checks that keep the block invertible -----------
    def run_f(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """F(x2), checked to leave ``x2`` untouched and to fit ``x1``."""
        return self._run("F", self.f, x2, x1)

    def run_g(self, x2: torch.Tensor, y1: torch.Tensor) -> torch.Tensor:
        """G(y1), checked to leave ``y1`` untouched and to fit ``x2``."""
        return self._run("G", self.g, y1, x2)

    def _run(self, label: str, fn: nn.Module, inp: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        version = inp._version
        h = fn(inp)
        if inp._version != version:
            # The half is needed again (y2 = x2 + G(y1) reads x2 after F ran), and the
            # reversible backward rebuilds it: a write into it breaks both.
            raise RuntimeError(
                f"{type(self).__name__}: {label} ({_name(fn)}) modified its input of shape "
                f"{tuple(inp.shape)} in place, so the block is no longer invertible and its "
                f"gradients would be wrong. Fix: make the first operation of {label} out-of-place "
                f"(e.g. nn.ReLU(inplace=False))."
            )
        want = self.branch_shape(other.shape)
        if h.shape != want:
            raise ValueError(
                f"{type(self).__name__}: {label} ({_name(fn)}) maps its input of shape "
                f"{tuple(inp.shape)} to {tuple(h.shape)}, but must return {tuple(want)} to be "
                f"coupled with the other half. Fix: keep stride 1 and the channel count inside "
                f"{label}; change resolution or width in a non-reversible unit between sequences."
            )
        return h

    # --- forward / inverse on halves (the engine calls these) and on whole tensors ------
    def forward_halves(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y1 = self.couple(x1, self.run_f(x1, x2))
        y2 = self.couple(x2, self.run_g(x2, y1))
        return y1, y2

    def inverse_halves(self, y1: torch.Tensor, y2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x2 = self.decouple(y2, self.run_g(y2, y1))
        x1 = self.decouple(y1, self.run_f(y1, x2))
        return x1, x2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return merge(*self.forward_halves(*split(x, self.dim, type(self).__name__)), self.dim)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """Rebuilds the input ``x`` from the output ``y = forward(x)``."""
        return merge(*self.inverse_halves(*split(y, self.dim, type(self).__name__)), self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class AdditiveCoupling(Coupling):
    """``y1 = x1 + F(x2)``, ``y2 = x2 + G(y1)``: the RevNet block (paper eq. 5).

    Args:
        f: residual function of ``x2``, returning a tensor shaped like ``x1``.
        g: residual function of ``y1``, returning a tensor shaped like ``x2``.
        dim: split dimension (1 for ``(B, C, H, W)`` feature maps).
    """

    def couple(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return x + h

    def decouple(self, y: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return y - h

    def couple_backward(
        self, x: torch.Tensor, h: torch.Tensor, dy: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return dy, dy  # d(x + h)/dx = d(x + h)/dh = identity


class AffineCoupling(Coupling):
    """``y1 = x1 * s(F(x2)) + t(F(x2))``, likewise for G (paper Sec. 3.1, after NICE/Real NVP).

    F and G return twice the channels of a half: the first half is a raw log-scale, the
    second the shift. The scale is ``exp(clamp * tanh(raw / clamp))``, so it lies in
    ``[e^-clamp, e^clamp]``: bounded away from zero, the inverse stays well conditioned.

    Args:
        f: function of ``x2`` returning ``2 * C/2`` channels (log-scale, shift).
        g: function of ``y1`` returning ``2 * C/2`` channels.
        dim: split dimension.
        clamp: bound on ``|log scale|``.
    """

    def __init__(self, f: nn.Module, g: nn.Module, dim: int = 1, clamp: float = 2.0) -> None:
        super().__init__(f, g, dim)
        if not (math.isfinite(clamp) and clamp > 0):
            raise ValueError(f"AffineCoupling: clamp must be a positive finite number, got {clamp}.")
        self.clamp = float(clamp)

    def branch_shape(self, half_shape: torch.Size) -> torch.Size:
        shape = list(half_shape)
        shape[self.dim] *= 2
        return torch.Size(shape)

    def _scale_shift(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raw, shift = h.chunk(2, self.dim)
        return torch.exp(self.clamp * torch.tanh(raw / self.clamp)), shift

    def couple(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        scale, shift = self._scale_shift(h)
        return x * scale + shift

    def decouple(self, y: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        scale, shift = self._scale_shift(h)
        return (y - shift) / scale

    def extra_repr(self) -> str:
        return f"dim={self.dim}, clamp={self.clamp}"
