"""Parameter gradients of a recomputation, returned rather than accumulated (DESIGN.md, rule 1).

In backward the engine runs F and G (or a recomputed unit) again with a graph. Their
parameters must not collect gradients through ``.grad`` there: the custom Function
returns them, so that ``torch.autograd.grad``, hooks, accumulation and DDP see each
gradient once. So the recomputation runs on detached aliases put in the parameters'
places (:func:`swapped`), and the backprop through it is held by graph edges, not by
the values of the branch outputs (:func:`grad_edge`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

__all__ = ["Slot", "add_into", "grad_edge", "param_slots", "swapped"]

Slot = tuple[nn.Module, str, int]  # (owning module, attribute name, index into the params)


def add_into(fresh: torch.Tensor, other: torch.Tensor, *live: torch.Tensor) -> torch.Tensor:
    """``fresh + other``, written into ``fresh`` when that is a buffer of its own.

    ``fresh`` comes from ``autograd.grad``; a branch that passes its gradient through (an
    identity, a view) may hand back a tensor sharing memory with ``other`` or with one of
    the ``live`` gradients still to be returned, and then a new tensor is made. In place,
    one (B, C/2, ...) buffer fewer is alive at the step's peak.
    """
    if fresh._base is not None or fresh.dtype != torch.promote_types(fresh.dtype, other.dtype):
        return fresh + other
    mine = fresh.untyped_storage().data_ptr()
    if any(t.untyped_storage().data_ptr() == mine for t in (other, *live)):
        return fresh + other
    return fresh.add_(other)


def grad_edge(h: torch.Tensor) -> torch.Tensor | GradientEdge:
    """Where ``h`` enters the graph, so that backprop needs ``h``'s graph but not its values.

    Handing ``autograd.grad`` the edge instead of the tensor lets the caller drop ``h``
    (a (B, C/2, ...) buffer) before the backprop; an ``h`` without a graph is kept.
    """
    return get_gradient_edge(h) if h.grad_fn is not None else h


def param_slots(branch: nn.Module, index: dict[int, int]) -> list[Slot]:
    """Where each trainable parameter of ``branch`` sits, found by one walk of its modules.

    Cheaper than ``named_parameters`` plus ``torch.func.functional_call`` (which re-walks
    the tree, builds dotted names and checks ties on every call): on a small RevNet that
    walk was a third of the backward's Python time.
    """
    return [(m, name, index[id(p)])
            for m in branch.modules()
            for name, p in m._parameters.items()
            if p is not None and id(p) in index]


@contextlib.contextmanager
def swapped(slots: list[Slot], aliases: list[torch.Tensor]) -> Iterator[None]:
    """Puts the aliases in the parameters' places for the duration of a recomputation."""
    saved = [(m, name, m._parameters[name]) for m, name, _ in slots]
    try:
        for m, name, i in slots:
            m._parameters[name] = aliases[i]
        yield
    finally:
        for m, name, p in saved:
            m._parameters[name] = p
