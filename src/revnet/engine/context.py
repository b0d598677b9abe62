"""Context: the extra arguments every F and G of a sequence receives (masks, positions, encoder states).

``seq(x, *args, **kwargs)`` calls every F and G as ``f(half, *args, **kwargs)``. A
:class:`Context` holds those arguments once per call: the tensors among them (also inside
tuples, lists and dicts) apart, so that the reversible Functions can take them as inputs,
keep them for backward once per sequence (the same storage, not a copy per block) and
return their gradients, which autograd sums over every block that used them; anything else
(a flag, a number, None) passes through untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["NO_CONTEXT", "Context"]


class _Slot:
    __slots__ = ("i",)

    def __init__(self, i: int) -> None:
        self.i = i


def _pull(obj: Any, tensors: list[torch.Tensor]) -> Any:
    """``obj`` with each tensor replaced by a slot into ``tensors`` (where it is appended)."""
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return _Slot(len(tensors) - 1)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a named tuple
        return type(obj)(*(_pull(v, tensors) for v in obj))
    if isinstance(obj, tuple | list):
        return type(obj)(_pull(v, tensors) for v in obj)
    if isinstance(obj, dict):
        return {k: _pull(v, tensors) for k, v in obj.items()}
    return obj


def _put(obj: Any, tensors: Sequence[torch.Tensor]) -> Any:
    """Inverse of :func:`_pull`: the slots filled from ``tensors``."""
    if isinstance(obj, _Slot):
        return tensors[obj.i]
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_put(v, tensors) for v in obj))
    if isinstance(obj, tuple | list):
        return type(obj)(_put(v, tensors) for v in obj)
    if isinstance(obj, dict):
        return {k: _put(v, tensors) for k, v in obj.items()}
    return obj


class Context:
    """The extra positional and keyword arguments of a sequence call, tensors held apart.

    Args:
        args: extra positional arguments for every F and G (after the half).
        kwargs: keyword arguments for every F and G.

    Attributes:
        tensors: the tensors among them, in a fixed order.
    """

    __slots__ = ("_template", "tensors")

    def __init__(self, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> None:
        self.tensors: list[torch.Tensor] = []
        self._template = _pull((tuple(args), dict(kwargs or {})), self.tensors)

    def __bool__(self) -> bool:
        return bool(self._template[0] or self._template[1])

    def replaced(self, tensors: Sequence[torch.Tensor]) -> Context:
        """The same arguments with ``tensors`` in place of the context's own (the recomputation
        in backward differentiates leaves standing in for them)."""
        new = Context.__new__(Context)
        new._template, new.tensors = self._template, list(tensors)
        return new

    def arguments(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The call's extra ``(args, kwargs)``, tensors in their places."""
        return _put(self._template, self.tensors)

    def call(self, fn: Callable[..., torch.Tensor], half: torch.Tensor) -> torch.Tensor:
        """``fn(half, *args, **kwargs)``."""
        if not self:
            return fn(half)
        args, kwargs = _put(self._template, self.tensors)
        return fn(half, *args, **kwargs)

    def versions(self) -> list[int]:
        """The version counters of the context's tensors, to detect writes into them."""
        return [t._version for t in self.tensors]

    def changed(self, before: list[int]) -> torch.Tensor | None:
        """The first context tensor written since :meth:`versions` gave ``before``, or None."""
        return next((t for t, v in zip(self.tensors, before, strict=True) if t._version != v), None)


NO_CONTEXT = Context()
