"""revnet: memory-free backpropagation for PyTorch (Gomez et al., NeurIPS 2017).

The package in parts, each importing only the parts below it (docs/DESIGN.md):

- ``revnet.engine``: reversible couplings and the backward that rebuilds activations;
- ``revnet.memory``: measuring a step's activation memory, and the memory-budget planner;
- ``revnet.fidelity``: reconstruction error, gradient angle and the drift guard;
- ``revnet.models``: the model zoo (RevNets, ResNets, RevViT, ViT, GPTs) and its registry;
- ``revnet.conversion``: ``revnet.convert``, existing models (Hugging Face, the zoo's) made reversible;
- ``revnet.training``: ``revnet train`` as a library (``fit(config)``): data, loop, checkpoints;
- ``revnet.bench``: the measurements behind ``revnet bench`` (memory, speed, capacity, drift);

and ``revnet.cli``, the command line. ``import revnet`` loads the engine, the planner and the
zoo only, which need nothing but torch.
"""

from ._version import __version__
from .conversion import convert, register_adapter
from .engine import (
    AdditiveCoupling,
    AffineCoupling,
    Coupling,
    MomentumCoupling,
    Recomputed,
    ReversibleSequence,
    TwoStreamCoupling,
    has_reversible_units,
    set_exact,
    set_reversible,
)
from .engine import compile as compile  # public, but not in __all__: a star import would hide the builtin
from .memory import OptimizerInBackward, Plan, optimizer_in_backward, plan
from .models import ResNet, RevNet, create_model, list_models, register_model

__all__ = [
    "__version__",
    "AdditiveCoupling",
    "AffineCoupling",
    "Coupling",
    "MomentumCoupling",
    "OptimizerInBackward",
    "Plan",
    "Recomputed",
    "ResNet",
    "RevNet",
    "ReversibleSequence",
    "TwoStreamCoupling",
    "convert",
    "create_model",
    "has_reversible_units",
    "list_models",
    "optimizer_in_backward",
    "plan",
    "register_adapter",
    "register_model",
    "set_exact",
    "set_reversible",
]
