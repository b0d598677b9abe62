"""revnet: memory-free backpropagation for PyTorch (Gomez et al., NeurIPS 2017)."""

from .autograd import ReversibleSequence, set_reversible
from .coupling import AdditiveCoupling, AffineCoupling, Coupling, set_exact
from .models import ResNet, RevNet, create_model, list_models, register_model

__version__ = "0.1.0"

__all__ = [
    "AdditiveCoupling",
    "AffineCoupling",
    "Coupling",
    "ResNet",
    "RevNet",
    "ReversibleSequence",
    "create_model",
    "list_models",
    "register_model",
    "set_exact",
    "set_reversible",
]
