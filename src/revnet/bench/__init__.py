"""Benchmarks: what a RevNet saves in memory, what it costs in time, and what that buys.

Every measurement returns a plain, JSON-able dict that holds its own configuration. Import
them from their modules (``from revnet.bench.memory import step_memory``).

- :mod:`.contenders`: the networks and the four ways to train them (``KINDS``), shared pieces;
- :mod:`.memory`: activation memory of one step, each point in a fresh process (:mod:`.worker`);
- :mod:`.breakdown`: parameters, gradients, optimizer state and activations per process under DDP
  and FSDP (run under ``torchrun``);
- :mod:`.speed`: step time, alternated in one process; :mod:`.capacity`: what fits a budget;
- :mod:`.drift`: reconstruction error against depth, exact mode's cost;
- :mod:`.data`: the data path against the training step (needs the ``train`` extra);
- :mod:`.tables`, :mod:`.plots`, :mod:`.report`, :mod:`.environment`: presenting results.
"""
