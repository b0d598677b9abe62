"""The engine's switches, owned here: how to read them, set them, save them and restore them.

A model's engine parts carry four switches, plain attributes that may be flipped between
training steps (never between a forward and its backward):

- ``reversible`` on a :class:`ReversibleSequence` and a :class:`Recomputed` unit: rebuild
  (True) or run under ordinary autograd, storing activations (False);
- ``stored`` on a coupling inside a reversible sequence: this block keeps its activations
  (a memory-budget plan sets it), the blocks before it rebuild from its input;
- ``exact`` (and ``exact_bits``) on a coupling with an exact mode (additive, momentum, two-stream):
  fixed-point arithmetic;
- ``preserve_rng_state`` on a sequence and a recomputed unit: record and replay RNG state.

Everything else in revnet asks these functions instead of walking modules itself:
:func:`units` lists what can be switched, :func:`has_reversible_units` answers "does this
model rebuild anything", :func:`get_modes`/:func:`set_modes` carry the switches through a
checkpoint, and :func:`kept_modes` puts them back after a trial pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from .coupling import Coupling, ExactMode
from .exact import check_bits
from .recompute import Recomputed
from .reversible import ReversibleSequence

__all__ = ["ReversibleSwitch", "Unit", "get_modes", "has_reversible_units", "kept_modes", "kept_state",
           "set_exact", "set_modes", "set_reversible", "set_stored", "units"]

Unit = tuple[str, str, nn.Module]  # (path in the model, "block" or "opener", the module)


def units(model: nn.Module) -> list[Unit]:
    """What can be rebuilt or stored, in forward order: the couplings of every reversible
    sequence (``"block"``, path ``seq.couplings.k``) and every recomputed unit (``"opener"``)."""
    found: list[Unit] = []
    for name, m in model.named_modules():
        if isinstance(m, ReversibleSequence):
            prefix = f"{name}.couplings" if name else "couplings"
            found += [(f"{prefix}.{k}", "block", c) for k, c in enumerate(m.couplings)]
        elif isinstance(m, Recomputed):
            found.append((name, "opener", m))
    return found


def has_reversible_units(model: nn.Module) -> bool:
    """Whether ``model`` holds any engine part that can rebuild (a sequence or a recomputed unit).

    The one test of "is this model reversible" in revnet: a residual baseline (ResNet, ViT)
    answers False whatever its name, a user's model with a ``ReversibleSequence`` True.
    Works on a model built on the meta device.
    """
    return any(isinstance(m, ReversibleSequence | Recomputed) for m in model.modules())


def set_reversible(module: nn.Module, enabled: bool) -> int:
    """Sets ``.reversible`` on every :class:`ReversibleSequence` and :class:`Recomputed` unit.

    Off, the whole model trains under ordinary autograd (the baseline); on, the sequences
    rebuild their activations and the recomputed units keep only their inputs.

    Example:
        >>> import revnet
        >>> model = revnet.create_model("revnet38")
        >>> revnet.set_reversible(model, False)  # the same weights under plain autograd
        12

    Returns:
        How many modules were set.
    """
    count = 0
    for m in module.modules():
        if isinstance(m, ReversibleSequence | Recomputed):
            m.reversible = bool(enabled)
            count += 1
    return count


class ReversibleSwitch:
    """A ``reversible`` property for a model class (mix it in before ``nn.Module``): True when
    every sequence and recomputed unit inside rebuilds; setting it calls :func:`set_reversible`.
    RevNet, RevViT and RevTransformer have it, so ``model.reversible = False`` trains the same
    weights under plain autograd."""

    @property
    def reversible(self) -> bool:
        module: nn.Module = self  # type: ignore[assignment]
        return all(m.reversible for m in module.modules() if isinstance(m, ReversibleSequence | Recomputed))

    @reversible.setter
    def reversible(self, enabled: bool) -> None:
        set_reversible(self, enabled)  # type: ignore[arg-type]


def set_exact(module: nn.Module, enabled: bool, *, bits: int | None = None, prefix: str = "") -> int:
    """Turns exact mode on or off for every coupling inside ``module`` that has one
    (:class:`AdditiveCoupling`, :class:`MomentumCoupling`, :class:`TwoStreamCoupling`).

    Also names each coupling by its path in ``module`` (after ``prefix``), so that a range
    error says which one left the range. Call it between training steps, never between a
    forward and its backward.

    Example:
        >>> import revnet
        >>> model = revnet.create_model("revnet38")
        >>> revnet.set_exact(model, True)  # bit-exact rebuilds on the 2^-12 lattice
        9

    Args:
        module: a model, a sequence or a coupling.
        enabled: exact mode on (True) or off.
        bits: fraction bits of the lattice; None keeps each coupling's own.
        prefix: name of ``module`` inside its model (e.g. ``"stages.0.0"``).

    Returns:
        How many couplings were set.
    """
    count = 0
    for path, m in module.named_modules():
        if isinstance(m, ExactMode):
            if bits is not None:
                m.exact_bits = check_bits("set_exact: bits", bits)
            m.exact = bool(enabled)
            m.name = ".".join(p for p in (prefix, path) if p)
            count += 1
    return count


def set_stored(model: nn.Module, stored: Iterable[str]) -> None:
    """Every sequence reversible; the units named in ``stored`` (paths from :func:`units`)
    stored, all others rebuilt. What a memory-budget plan applies."""
    stored = set(stored)
    for m in model.modules():
        if isinstance(m, ReversibleSequence):
            m.reversible = True
    for name, kind, m in units(model):
        if kind == "block":
            m.stored = name in stored
        else:
            m.reversible = name not in stored


def get_modes(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Every switch of ``model`` by module path: ``{"reversible": {...}, "stored": {...},
    "exact": {...}, "exact_bits": {...}}``, plain JSON-able values.

    They live outside the state dict, so a checkpoint carries them apart: a resumed run must
    not fall back to the float rebuild a drift guard switched away from.
    """
    out: dict[str, dict[str, Any]] = {"reversible": {}, "stored": {}, "exact": {}, "exact_bits": {}}
    for name, m in model.named_modules():
        if isinstance(m, ReversibleSequence | Recomputed):
            out["reversible"][name] = bool(m.reversible)
        if isinstance(m, Coupling):
            out["stored"][name] = bool(m.stored)
        if isinstance(m, ExactMode):
            out["exact"][name] = bool(m.exact)
            out["exact_bits"][name] = m.exact_bits
    return out


def set_modes(model: nn.Module, modes: dict[str, dict[str, Any]]) -> None:
    """Applies switches recorded by :func:`get_modes` (any subset of its keys).

    Raises:
        ValueError: ``modes`` names a module ``model`` does not have.
    """
    found = dict(model.named_modules())
    missing = sorted({n for table in modes.values() for n in table if n not in found})
    if missing:
        raise ValueError(f"set_modes: the model has no module {', '.join(map(repr, missing[:3]))}; "
                         f"switches apply to the model they were read from (or a copy of it).")
    for name, flag in modes.get("reversible", {}).items():
        found[name].reversible = bool(flag)
    for name, flag in modes.get("stored", {}).items():
        found[name].stored = bool(flag)
    bits = modes.get("exact_bits", {})
    for name, flag in modes.get("exact", {}).items():
        set_exact(found[name], flag, bits=bits.get(name), prefix=name)


@contextlib.contextmanager
def kept_modes(model: nn.Module) -> Iterator[None]:
    """Runs the body, then puts every switch of ``model`` back as it was (also on error)."""
    saved = get_modes(model)
    try:
        yield
    finally:
        set_modes(model, saved)


@contextlib.contextmanager
def kept_state(model: nn.Module) -> Iterator[Callable[[], None]]:
    """Trial passes leave no trace: switches, buffers (BatchNorm statistics), ``.grad`` and the
    RNG streams (CPU, and every CUDA device in use) come back as they were, also on error.

    Yields a function that restores that state on demand (to run a second pass from the same
    state, as a gradient-angle check does); the state is restored again on exit.
    """
    modes = get_modes(model)
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    grads = [(p, p.grad) for p in model.parameters()]
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def restore() -> None:
        set_modes(model, modes)
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        for p, g in grads:
            p.grad = g
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)

    try:
        yield restore
    finally:
        restore()
