"""Recomputed units: modules that cannot be inverted keep only their input for backward.

A RevNet stage opens with a unit that changes resolution or width, so its input cannot
be rebuilt from its output. The paper stores its activations; here, in reversible mode,
it keeps only its input (which the stage before keeps anyway) and runs again in backward
under the engine's rules: parameter gradients returned, BatchNorm statistics updated
once, RNG and autocast replayed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .context import NO_CONTEXT, Context
from .replay import ParamGrads, Replay, grad_edge

__all__ = ["Recomputed", "apply_recomputed"]


class Recomputed:
    """Mixin for a unit that cannot be inverted (a RevNet stage opener) to store no activations.

    While ``reversible`` is True and grad is enabled, calling the module keeps only its
    input for backward, and backward runs it again under the engine's rules (parameter
    gradients returned, BatchNorm statistics updated once, RNG and autocast replayed).
    Put it first among the bases; the module's own ``forward`` is left as it is::

        class MyOpener(Recomputed, nn.Module):
            def forward(self, x): ...

    Its input is usually kept anyway (as the output of the reversible sequence before it),
    so the unit then costs no memory beyond the transient of its own recomputation.
    """

    reversible: bool = True
    preserve_rng_state: bool = True

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        module: nn.Module = self  # type: ignore[assignment]
        if self.reversible and torch.is_grad_enabled():
            params = [p for p in module.parameters() if p.requires_grad]
            context = Context(args, kwargs)
            if x.requires_grad or params or any(t.requires_grad for t in context.tensors):
                return apply_recomputed(x, module, self.preserve_rng_state, params, context)
        return nn.Module.__call__(module, x, *args, **kwargs)  # plain mode: ordinary code, traceable


# Dynamo cannot trace the engine's Functions (they record RNG state, and recompute in backward);
# a graph break inside one splits the caller into frames that recompile per stage. Under
# torch.compile the engine is one opaque call instead, and revnet.compile compiles what runs inside.
@torch.compiler.disable
def apply_recomputed(x: torch.Tensor, module: nn.Module, keep_rng: bool, params: list[torch.Tensor],
                     context: Context = NO_CONTEXT) -> torch.Tensor:
    """``module(x, *context)`` keeping only ``x`` (and the context) for backward: what a
    :class:`Recomputed` unit runs."""
    return _Recompute.apply(x, module, keep_rng, context, *context.tensors, *params)


def _call(module: nn.Module) -> Any:
    return lambda h, *args, **kwargs: nn.Module.__call__(module, h, *args, **kwargs)


class _Recompute(torch.autograd.Function):
    """``y = module(x, *context)`` keeping only ``x``; backward runs the module again with a graph."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, module: nn.Module, keep_rng: bool, context: Context,
                *tensors: torch.Tensor) -> torch.Tensor:
        ctx.replay = Replay(x, keep_rng)
        ctx.replay.mark()
        y = context.call(_call(module), x)  # grad mode is off here: no graph
        n = len(context.tensors)
        ctx.save_for_backward(x, *tensors[:n])
        ctx.module, ctx.context, ctx.params = module, context, tensors[n:]
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, *saved = ctx.saved_tensors
        grads = ParamGrads(ctx.params, tuple(saved), ctx.needs_input_grad[4:4 + len(saved)])
        context = ctx.context.replaced(grads.context)
        with ctx.replay.rerun(ctx.module), grads.swapped(ctx.module), torch.enable_grad():
            ctx.replay.rewind(0)
            xd = x.detach().requires_grad_(ctx.needs_input_grad[0])
            y = context.call(_call(ctx.module), xd)
        y = grad_edge(y)  # the output's values are not needed for backprop: drop them
        dx = grads.backprop(y, xd if ctx.needs_input_grad[0] else None, dy)
        return (dx, None, None, None, *grads.context_grads, *grads.grads)
