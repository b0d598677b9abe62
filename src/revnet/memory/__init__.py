"""Memory: measuring the activation memory of a training step, and planning what to store.

- :mod:`.planner`: ``revnet.plan``, which units to store and which to rebuild under a memory
  budget (:class:`Plan`);
- :mod:`.measure`: the peak of a step (CUDA allocator, CPU allocation events, resident set),
  and the allocator settings that make it readable on CPU;
- :mod:`.sizes`: sizes in bytes, read from text and written for tables;
- :mod:`.in_backward`: ``revnet.optimizer_in_backward``, the optimizer step inside backward, so the
  gradients of the whole model never exist at once.

Imports the engine (it plans the engine's switches), nothing above it.
"""

from .in_backward import OptimizerInBackward, optimizer_in_backward
from .planner import Plan, PlanUnit, plan

__all__ = ["OptimizerInBackward", "Plan", "PlanUnit", "optimizer_in_backward", "plan"]
