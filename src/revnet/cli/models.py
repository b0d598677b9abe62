"""``revnet models``: the registered models, their parameter counts and the published ones."""

from __future__ import annotations

import argparse

from ..models import create_model, list_models

__all__ = ["add_parser"]

# Published parameter counts (millions): Gomez et al. 2017 Table 1 (CIFAR at 10 classes, ImageNet at
# 1000); timm's vit_*_patch16_224 and RevViT's released configs (Mangalam et al. 2022) at 1000, 224px;
# GPT-2 small and medium (Radford et al. 2019) with tied embeddings, vocabulary 50257, context 1024.
PUBLISHED_M = {
    "resnet32": 0.46, "revnet38": 0.46, "resnet110": 1.73, "revnet110": 1.73, "resnet164": 1.70,
    "revnet164": 1.75, "resnet101": 44.5, "revnet104": 45.2, "vit_small": 22.05, "vit_base": 86.57,
    "vit_large": 304.3, "revvit_small": 22.44, "revvit_base": 87.34, "gpt2_small": 124.44,
    "gpt2_medium": 354.82,
}
_AT_1000 = ("revnet104", "resnet101", "vit_small", "vit_base", "vit_large", "revvit_small", "revvit_base",
            "revvit_large")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Registers ``revnet models``."""
    p = sub.add_parser("models", help="list the registered models and their parameter counts")
    p.set_defaults(func=_cmd_models)


def _cmd_models(args: argparse.Namespace) -> int:
    width = max(len(n) for n in list_models())
    print(f"{'model':<{width}} {'params':>10} {'published':>10}   (CIFAR-sized models at 10 classes; "
          "ImageNet models and the 224px transformers at 1000)")
    for name in list_models():
        model = create_model(name, num_classes=1000 if name in _AT_1000 else 10, device="meta")
        count = sum(p.numel() for p in model.parameters())
        paper = f"{PUBLISHED_M[name]:.2f}M" if name in PUBLISHED_M else "-"
        print(f"{name:<{width}} {count / 1e6:>9.3f}M {paper:>10}")
    return 0
