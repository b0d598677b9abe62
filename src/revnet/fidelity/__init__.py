"""Numerical fidelity of reversible backprop: reconstruction error, gradient angle, drift guard.

- :mod:`.drift`: a sequence's input rebuilt from its output as the engine does it
  (:func:`roundtrip`, :func:`reconstruction_error`), and :class:`DriftGuard`, which checks
  it on the real batch every few steps and warns, switches to exact mode or stores;
- :mod:`.angle`: :func:`gradient_angle`, the angle between the reversible gradient and
  plain autograd's on the same batch and weights (Gomez et al. 2017, Sec. 6).

Every check leaves the training state as it found it: parameters, BatchNorm buffers,
RNG streams, ``.grad`` and the engine's switches (:func:`revnet.engine.modes.kept_state`).
Imports the engine only.
"""

from .angle import gradient_angle, stage_of
from .drift import DRIFT_ACTIONS, DriftGuard, reconstruction_error, roundtrip, sequence_inputs

__all__ = ["DRIFT_ACTIONS", "DriftGuard", "gradient_angle", "reconstruction_error", "roundtrip",
           "sequence_inputs", "stage_of"]
