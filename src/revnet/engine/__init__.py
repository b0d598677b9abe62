"""The engine: reversible blocks whose backward rebuilds their inputs instead of storing them.

- :mod:`.coupling`: the math of a block (additive, affine, momentum, two-stream couplings), plain autograd;
- :mod:`.exact`: exact mode's arithmetic on a fixed-point lattice (bit-exact inverses), and the
  tape that keeps what a scaling by gamma loses;
- :mod:`.reversible`: :class:`ReversibleSequence` and its per-block autograd Functions
  (the paper's Algorithm 1);
- :mod:`.recompute`: units that cannot be inverted keep only their input (:class:`Recomputed`);
- :mod:`.replay`: what a recomputation replays (RNG, autocast, BatchNorm) and how it
  returns parameter gradients;
- :mod:`.modes`: the engine's switches (reversible, stored, exact), read, set and saved;
- :mod:`.compiler`: ``revnet.compile``, torch.compile of what runs inside the engine.

Imports nothing else of revnet, and nothing here measures memory or time: a user who only
wants the algorithm reads this folder. The tools around it live beside it
(:mod:`revnet.memory`, :mod:`revnet.fidelity`).
"""

from .compiler import compile
from .coupling import AdditiveCoupling, AffineCoupling, Coupling, MomentumCoupling, TwoStreamCoupling
from .modes import has_reversible_units, set_exact, set_reversible
from .recompute import Recomputed
from .reversible import ReversibleSequence

__all__ = [
    "AdditiveCoupling",
    "AffineCoupling",
    "MomentumCoupling",
    "Coupling",
    "Recomputed",
    "ReversibleSequence",
    "TwoStreamCoupling",
    "compile",
    "has_reversible_units",
    "set_exact",
    "set_reversible",
]
