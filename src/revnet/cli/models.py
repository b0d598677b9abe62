"""``revnet models``: the registered models and their parameter counts."""

from __future__ import annotations

import argparse

from ..models import create_model, list_models

__all__ = ["add_parser"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Registers ``revnet models``."""
    p = sub.add_parser("models", help="list the registered models and their parameter counts")
    p.set_defaults(func=_cmd_models)


def _cmd_models(args: argparse.Namespace) -> int:
    print(f"{'model':<11} {'params':>10}   (CIFAR models at 10 classes, ImageNet models at 1000)")
    for name in list_models():
        imagenet = name in ("revnet104", "resnet101")
        model = create_model(name, num_classes=1000 if imagenet else 10)
        count = sum(p.numel() for p in model.parameters())
        print(f"{name:<11} {count / 1e6:>9.3f}M")
    return 0
