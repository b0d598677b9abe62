"""Model registry: ``@register_model`` constructors, ``create_model``, ``list_models`` and
``model_accepts``."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["create_model", "list_models", "model_accepts", "register_model"]

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


def model_accepts(name: str, keyword: str) -> bool:
    """Whether registered model ``name`` takes ``keyword`` (e.g. ``"img_size"``: a transformer's
    position embeddings are sized to the images, a CNN takes any size).

    Asked of the model, not read from its name: its class's constructor names the keyword. The
    model is built once on the meta device (no memory, no initialisation) to learn its class.

    Raises:
        ValueError: ``name`` is not a registered model.
    """
    if name not in _MODELS:
        create_model(name)  # raises: the unknown model, and the known ones
    return _accepts(name, keyword)


@functools.cache
def _accepts(name: str, keyword: str) -> bool:  # a name is registered once: its answer never changes
    cls = type(create_model(name, device="meta"))
    return keyword in inspect.signature(cls).parameters
