"""Model registry: ``@register_model`` constructors, ``create_model`` and ``list_models``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["create_model", "list_models", "register_model"]

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Registers ``fn`` under its own name; a second model of the same name raises."""
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"register_model: a model named {name!r} is already registered.")
    _MODELS[name] = fn
    return fn


def create_model(name: str, *, num_classes: int = 10, in_chans: int = 3, **kwargs: Any) -> nn.Module:
    """Builds a registered model.

    Args:
        name: one of :func:`list_models`.
        num_classes: size of the classifier's output.
        in_chans: channels of the input images (1 for Fashion-MNIST, 3 for CIFAR).
        **kwargs: passed to the model's class (e.g. ``reversible=False``, ``norm_layer=``).
    """
    try:
        fn = _MODELS[name]
    except KeyError:
        raise ValueError(
            f"create_model: unknown model {name!r}; known models: {', '.join(list_models())}."
        ) from None
    return fn(num_classes=num_classes, in_chans=in_chans, **kwargs)


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_MODELS)
