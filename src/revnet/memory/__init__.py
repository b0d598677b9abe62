"""Memory: measuring the activation memory of a training step, and planning what to store.

- :mod:`.planner`: ``revnet.plan``, which units to store and which to rebuild under a memory
  budget (:class:`Plan`);
- :mod:`.measure`: the peak of a step (CUDA allocator, CPU allocation events, resident set),
  and the allocator settings that make it readable on CPU;
- :mod:`.sizes`: sizes in bytes, read from text and written for tables.

Imports the engine (it plans the engine's switches), nothing above it.
"""

from .planner import Plan, PlanUnit, plan

__all__ = ["Plan", "PlanUnit", "plan"]
