"""The engine: reversible blocks whose backward rebuilds their inputs instead of storing them.

- :mod:`.coupling`: the math of a block (additive and affine couplings), plain autograd;
- :mod:`.lattice`: exact mode's fixed-point lattice (bit-exact inverses);
- :mod:`.reversible`: :class:`ReversibleSequence` and its per-block autograd Functions
  (the paper's Algorithm 1);
- :mod:`.recompute`: units that cannot be inverted keep only their input (:class:`Recomputed`);
- :mod:`.replay` and :mod:`.grads`: what a recomputation replays (RNG, autocast, BatchNorm)
  and how it returns parameter gradients;
- :mod:`.fidelity`: reconstruction error, gradient angle and the drift guard;
- :mod:`.compile`: ``revnet.compile``, torch.compile of what runs inside the engine;
- :mod:`.planner`: ``revnet.plan``, which blocks to store and which to rebuild under a memory
  budget; :mod:`.peak` and :mod:`.sizes`, the measurements and sizes it works in.

Imports nothing else of revnet: a user who only wants the engine reads this folder.
"""

from .compile import compile
from .coupling import AdditiveCoupling, AffineCoupling, Coupling, set_exact
from .planner import Plan, plan
from .recompute import Recomputed
from .reversible import ReversibleSequence, set_reversible

__all__ = [
    "AdditiveCoupling",
    "AffineCoupling",
    "Coupling",
    "Plan",
    "Recomputed",
    "ReversibleSequence",
    "compile",
    "plan",
    "set_exact",
    "set_reversible",
]
