"""revnet: memory-free backpropagation for PyTorch (Gomez et al., NeurIPS 2017).

The package in four parts, each importing only the parts below it:

- ``revnet.engine``: reversible couplings and the backward that rebuilds activations;
- ``revnet.models``: the model zoo (RevNets and their ResNet baselines) and its registry;
- ``revnet.training``: ``revnet train`` as a library (``fit(config)``): data, loop, checkpoints;
- ``revnet.bench``: the measurements behind ``revnet bench`` (memory, speed, capacity, drift);

and ``revnet.cli``, the command line. ``import revnet`` loads the engine and the zoo only,
which need nothing but torch.
"""

from ._version import __version__
from .engine import (
    AdditiveCoupling,
    AffineCoupling,
    Coupling,
    Plan,
    Recomputed,
    ReversibleSequence,
    plan,
    set_exact,
    set_reversible,
)
from .engine import compile as compile  # public, but not in __all__: a star import would hide the builtin
from .models import ResNet, RevNet, create_model, list_models, register_model

__all__ = [
    "__version__",
    "AdditiveCoupling",
    "AffineCoupling",
    "Coupling",
    "Plan",
    "Recomputed",
    "ResNet",
    "RevNet",
    "ReversibleSequence",
    "create_model",
    "list_models",
    "plan",
    "register_model",
    "set_exact",
    "set_reversible",
]
