"""The model zoo: the paper's RevNets and their ResNet baselines, and the registry.

- :mod:`.layers`: residual functions, stage openers, stems and the head;
- :mod:`.classifier`: the ``stem -> stages -> head`` frame both families share;
- :mod:`.resnet`, :mod:`.revnet`: the builders and their registered constructors;
- :mod:`.registry`: ``register_model``, ``create_model``, ``list_models``.
"""

from .registry import create_model, list_models, register_model
from .resnet import ResNet
from .revnet import RevNet

__all__ = ["ResNet", "RevNet", "create_model", "list_models", "register_model"]
