"""Running a module a second time, in backward, as the same computation (the engine's rules 1-4).

The engine runs F and G (or a recomputed unit) twice: once in the forward without a graph,
and again in backward with one. For the second run to be the same computation it must see
the same random numbers (dropout masks), the same autocast state, and BatchNorm must
normalise with the batch's statistics without updating the running ones again. Its
parameter gradients must be returned by the custom Function, not accumulated into
``.grad``, so that ``torch.autograd.grad``, hooks, accumulation and DDP each see them once.

- :class:`Replay`: recorded at forward, entered at recomputation (RNG, autocast, BatchNorm);
- :class:`ParamGrads`: runs the recomputation on detached aliases of the parameters and
  collects their gradients, for the Function to return.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["ParamGrads", "Replay", "add_into", "autocast_state", "batchnorm_stats_frozen", "grad_edge",
           "replay_autocast"]

RngState = tuple[torch.Tensor, list[torch.Tensor]]  # (CPU generator state, one per CUDA device)


def autocast_state(device_type: str) -> dict[str, tuple[bool, torch.dtype]]:
    """Whether autocast is on, and in which dtype, on the CPU and on ``device_type``."""
    return {d: (torch.is_autocast_enabled(d), torch.get_autocast_dtype(d))
            for d in dict.fromkeys(("cpu", device_type)) if torch.amp.is_autocast_available(d)}


@contextlib.contextmanager
def replay_autocast(state: dict[str, tuple[bool, torch.dtype]]) -> Iterator[None]:
    """Enters the autocast state that :func:`autocast_state` recorded."""
    with contextlib.ExitStack() as stack:
        for device, (enabled, dtype) in state.items():
            stack.enter_context(torch.autocast(device, dtype=dtype, enabled=enabled))
        yield


@contextlib.contextmanager
def batchnorm_stats_frozen(module: nn.Module) -> Iterator[None]:
    """Recomputation normalises with batch statistics but must not update running ones.

    With ``track_running_stats=False`` a training-mode BatchNorm (and SyncBatchNorm) uses
    the batch's statistics exactly as in the forward, and touches neither
    ``running_mean``/``running_var`` nor ``num_batches_tracked``.
    """
    frozen = [m for m in module.modules()
              if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]
    for m in frozen:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in frozen:
            m.track_running_stats = True


class Replay:
    """What a forward records so that its recomputation in backward is the same computation.

    Made at forward on the input ``x``; :meth:`mark` records the RNG state before each
    branch (F, G), :meth:`rerun` enters the recorded autocast state with BatchNorm's running
    statistics frozen and the caller's RNG state kept aside (``torch.random.fork_rng``), and
    :meth:`rewind` puts the RNG back where mark ``i`` found it.
    """

    __slots__ = ("autocast", "devices", "keep_rng", "rng")

    def __init__(self, x: torch.Tensor, keep_rng: bool) -> None:
        self.devices = [x.device] if x.is_cuda else []  # whose RNG a computation on x draws from
        self.keep_rng = keep_rng
        self.rng: list[RngState] = []
        self.autocast = autocast_state(x.device.type)

    def mark(self) -> None:
        if self.keep_rng:
            self.rng.append((torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in self.devices]))

    def rewind(self, i: int) -> None:
        if self.keep_rng:
            cpu, cuda = self.rng[i]
            torch.set_rng_state(cpu)
            for d, s in zip(self.devices, cuda, strict=True):
                torch.cuda.set_rng_state(s, d)

    @contextlib.contextmanager
    def rerun(self, module: nn.Module) -> Iterator[None]:
        with (torch.random.fork_rng(self.devices, enabled=self.keep_rng), replay_autocast(self.autocast),
              batchnorm_stats_frozen(module)):
            yield


def add_into(fresh: torch.Tensor, other: torch.Tensor, *live: torch.Tensor) -> torch.Tensor:
    """``fresh + other``, written into ``fresh`` when that is a buffer of its own.

    ``fresh`` comes from ``autograd.grad``; a branch that passes its gradient through (an
    identity, a view) may hand back a tensor sharing memory with ``other`` or with one of
    the ``live`` gradients still to be returned, and then a new tensor is made. In place,
    one (B, C/2, ...) buffer fewer is alive at the step's peak.
    """
    if fresh._base is not None or fresh.dtype != torch.promote_types(fresh.dtype, other.dtype):
        return fresh + other
    mine = fresh.untyped_storage().data_ptr()
    if any(t.untyped_storage().data_ptr() == mine for t in (other, *live)):
        return fresh + other
    return fresh.add_(other)


def grad_edge(h: torch.Tensor) -> torch.Tensor | GradientEdge:
    """Where ``h`` enters the graph, so that backprop needs ``h``'s graph but not its values.

    Handing ``autograd.grad`` the edge instead of the tensor lets the caller drop ``h``
    (a (B, C/2, ...) buffer) before the backprop; an ``h`` without a graph is kept.
    """
    return get_gradient_edge(h) if h.grad_fn is not None else h


class ParamGrads:
    """The parameter gradients of one recomputation, returned rather than accumulated (rule 1).

    The recomputation runs on detached aliases put in the parameters' places
    (:meth:`swapped`), so hooks on a parameter fire once, when the Function returns its
    gradient; :meth:`backprop` differentiates a branch output and adds each parameter's
    share into :attr:`grads` (a tied weight counts once per branch). Context tensors
    (masks, encoder states) are stood in for by :attr:`context`, detached leaves of which
    those in ``needs`` require grad; theirs collect in :attr:`context_grads`.
    """

    __slots__ = ("_aliases", "_index", "_slots", "_wanted", "context", "context_grads", "grads")

    def __init__(self, params: tuple[torch.Tensor, ...], context: tuple[torch.Tensor, ...] = (),
                 needs: tuple[bool, ...] = ()) -> None:
        self._index = {id(p): i for i, p in enumerate(params)}
        self._aliases = [p.detach().requires_grad_() for p in params]
        self._slots: list[tuple[nn.Module, str, int]] = []
        self.grads: list[torch.Tensor | None] = [None] * len(params)
        self.context = [t.detach().requires_grad_(bool(need) and t.is_floating_point())
                        for t, need in zip(context, needs, strict=True)]
        self._wanted = [i for i, t in enumerate(self.context) if t.requires_grad]
        self.context_grads: list[torch.Tensor | None] = [None] * len(context)

    @contextlib.contextmanager
    def swapped(self, module: nn.Module) -> Iterator[None]:
        """Puts the aliases in the places of ``module``'s parameters while the body runs.

        One walk of ``module._parameters`` (not ``named_parameters`` plus
        ``torch.func.functional_call``, which re-walk the tree and build dotted names: on a
        small RevNet that was a third of the backward's Python time).
        """
        self._slots = [(m, name, self._index[id(p)]) for m in module.modules()
                       for name, p in m._parameters.items() if p is not None and id(p) in self._index]
        saved = [(m, name, m._parameters[name]) for m, name, _ in self._slots]
        try:
            for m, name, i in self._slots:
                m._parameters[name] = self._aliases[i]
            yield
        finally:
            for m, name, p in saved:
                m._parameters[name] = p

    def backprop(self, h: torch.Tensor | GradientEdge, inp: torch.Tensor | None,
                 dh: torch.Tensor) -> torch.Tensor | None:
        """Backprops ``dh`` through the output ``h`` (or its :func:`grad_edge`) of the last
        :meth:`swapped` run; returns the gradient of ``inp`` (None if ``inp`` is None or unused)."""
        used = list(dict.fromkeys(i for _, _, i in self._slots))
        wrt = (([] if inp is None else [inp]) + [self._aliases[i] for i in used]
               + [self.context[i] for i in self._wanted])
        if not wrt:
            return None
        got = list(torch.autograd.grad(h, wrt, dh, allow_unused=True))
        d_inp = None if inp is None else got.pop(0)
        for sink, index in ((self.grads, used), (self.context_grads, self._wanted)):
            for i, g in zip(index, got[:len(index)], strict=True):
                if g is not None:
                    sink[i] = g if sink[i] is None else sink[i] + g
            got = got[len(index):]
        return d_inp
