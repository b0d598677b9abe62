"""The model zoo: the paper's RevNets and their ResNet baselines."""

from ._registry import create_model, list_models, register_model
from .resnet import ResNet
from .revnet import RevNet

__all__ = ["ResNet", "RevNet", "create_model", "list_models", "register_model"]
