"""The model zoo: the paper's RevNets and their ResNet baselines, RevViT and ViT, RevGPT and GPT,
and the registry.

- :mod:`.layers`: residual functions, stage openers, stems and the head;
- :mod:`.classifier`: the ``stem -> stages -> head`` frame both families share;
- :mod:`.resnet`, :mod:`.revnet`: the builders and their registered constructors;
- :mod:`.transformer`: attention and MLP branches, the residual and the reversible transformer;
- :mod:`.vit`: the residual ViT and the reversible RevViT, and their registered sizes;
- :mod:`.gpt`: the residual GPT (GPT-2) and the reversible RevGPT language models, and their sizes;
- :mod:`.registry`: ``register_model``, ``create_model``, ``list_models``, ``model_accepts``.
"""

from .gpt import GPT, RevGPT
from .registry import create_model, list_models, model_accepts, register_model
from .resnet import ResNet
from .revnet import RevNet
from .transformer import RevTransformer, Transformer
from .vit import RevViT, VisionTransformer

__all__ = ["GPT", "ResNet", "RevGPT", "RevNet", "RevTransformer", "RevViT", "Transformer",
           "VisionTransformer", "create_model", "list_models", "model_accepts", "register_model"]
