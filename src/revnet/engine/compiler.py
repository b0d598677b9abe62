"""Compilation of what runs inside the engine: F and G, recomputed units, and the rest of a model.

``torch.compile(model)`` treats the engine as an opaque call (dynamo cannot trace its
Functions), so in reversible mode only the code around the sequences gets compiled.
:func:`compile` compiles what the engine runs instead: each coupling's F and G (both the
forward without grad and the recomputation with grad in backward), each :class:`Recomputed`
unit, and every submodule that holds no engine part (a stem, a head). The engine's own
Python stays eager, so its rules (returned gradients, BatchNorm statistics once, RNG and
autocast replay) hold unchanged.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from .coupling import Coupling
from .recompute import Recomputed
from .reversible import ReversibleSequence

__all__ = ["compile", "compiled_modules"]

_DEFAULTS = {
    # Blocks of one shape share a graph; torch's automatic dynamic shapes would instead turn
    # the many same-code, different-shape calls into symbolic graphs (slower, and some fail in
    # inductor). A new batch size compiles anew, once.
    "dynamic": False,
    # One entry per shape, grad mode (forward vs recomputation) and train/eval: a few batch
    # sizes of a RevNet need a few dozen; past the limit torch would fall back to eager.
    "recompile_limit": 256,
}


def _call(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    # A frame of revnet's own for dynamo to start from: it does not trace from torch.nn's frames,
    # so nn.Module.compile() on an nn.Sequential (most F and G) would compile nothing.
    return module._call_impl(*args, **kwargs)


def _holds_engine(module: nn.Module) -> bool:
    return any(isinstance(m, ReversibleSequence | Recomputed | Coupling) for m in module.modules())


def compile(model: nn.Module, **compile_kwargs: Any) -> nn.Module:
    """Compiles, in place, what runs inside the reversible engine, and the rest of ``model``.

    Module structure and ``state_dict`` keys do not change, so checkpoints load either way;
    a deep copy or an unpickled copy is uncompiled (and correct). ``set_reversible``,
    ``set_exact``, autocast, channels_last and DDP work as before: a new mode compiles its
    graphs once, on first use.

    Args:
        model: the model, changed in place and returned.
        **compile_kwargs: passed to ``torch.compile``; defaults ``dynamic=False`` (blocks of
            one shape share a graph) and ``recompile_limit=256``.

    Returns:
        ``model``.
    """
    compiled = torch.compile(_call, **{**_DEFAULTS, **compile_kwargs})

    def run(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        # Under DDP dynamo would split each graph at DDP's bucket boundaries, so that all-reduce
        # overlaps the graph's backward. These graphs are single branches whose gradients the
        # engine's Functions hand to DDP block by block anyway; splitting them only costs (and
        # with small buckets dynamo refuses the split outright).
        with torch._dynamo.config.patch(optimize_ddp=False):
            return compiled(module, *args, **kwargs)

    def visit(m: nn.Module) -> None:
        if isinstance(m, Coupling):
            for branch in (m.f, m.g):
                branch._compiled_call_impl = functools.partial(run, branch)
        elif isinstance(m, Recomputed) or not _holds_engine(m):
            m._compiled_call_impl = functools.partial(run, m)
        else:
            for child in m.children():
                visit(child)

    visit(model)
    return model


def compiled_modules(model: nn.Module) -> list[str]:
    """Names of the submodules of ``model`` that :func:`compile` gave a compiled call."""
    return [name for name, m in model.named_modules() if getattr(m, "_compiled_call_impl", None) is not None]
