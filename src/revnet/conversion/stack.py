"""The converted stack: a model's list of residual blocks, run as one reversible sequence.

A residual block stack ``for block in blocks: x = block(x, ...)`` in which every block is a
chain of residual steps ``x = x + f_k(x)`` (attention, then MLP) becomes one
:class:`~revnet.engine.ReversibleSequence` over the branches ``f_1, f_2, ...``, by one of two
methods:

- ``"momentum"``: the momentum steps of Sander et al. (ICML 2021, "Momentum Residual Neural
  Networks"), ``v = gamma * v + (1 - gamma) * f_k(x)``, ``x = x + v``, on the stream ``(v, x)``
  with ``v`` starting at zero: one :class:`~revnet.engine.MomentumCoupling` per branch;
- ``"two-stream"``: the stream holds the last two states ``(x_{k-1}, x_k)``, both starting at the
  input, and ``x_{k+1} = gamma x_{k-1} + (1 - gamma) x_k + f_{k+1}(x_k)``: one
  :class:`~revnet.engine.TwoStreamCoupling` per two branches (RevViT/MEFT's form).

At ``gamma = 0`` either is the original stack exactly; for ``gamma > 0`` every step inverts, so
training stores no block activations; in exact mode the rebuild is bit-exact at any gamma.

:class:`ConvertedStack` takes the list's place in the model **without changing how the model
calls it or names its weights**:

- iterating over it (the model's own ``for block in self.h`` loop) gives a runner that runs the
  whole reversible sequence on the loop's first call, with the block's call arguments (masks,
  rotary tables, position ids) passed to every branch as context, and pass-throughs for the
  other blocks; so the model's forward, ``generate()`` and its cache keep working;
- ``stack[i]`` is still the ``i``-th original block, and the state dict has the original keys
  (``h.3.attn.c_attn.weight``): the sequence shares the blocks' modules, its own keys are
  dropped on saving and filled from the originals on loading, so a checkpoint of the converted
  model loads into the unconverted one (``save_pretrained`` / ``from_pretrained``) and back.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..engine import Coupling, MomentumCoupling, ReversibleSequence, TwoStreamCoupling
from ..engine.context import Context
from ..fidelity.drift import roundtrip

__all__ = ["ConvertedStack"]

SEQUENCE = "sequence"


def _passthrough(hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Blocks 2..n of a converted stack: the runner of block 1 has already run them."""
    return hidden


def couplings_for(method: str, branches: Sequence[nn.Module], gamma: float,
                  exact: bool = False) -> list[Coupling]:
    """The couplings that run ``branches`` (the residual branches of a stack, in order) by ``method``."""
    if method == "momentum":
        return [MomentumCoupling(f, gamma=gamma, dim=-1, exact=exact) for f in branches]
    if method == "two-stream":
        return [TwoStreamCoupling(branches[i], branches[i + 1] if i + 1 < len(branches) else None,
                                  gamma=gamma, dim=-1, exact=exact) for i in range(0, len(branches), 2)]
    raise ValueError(f"revnet.convert: unknown method {method!r}; expected 'momentum' or 'two-stream'.")


class ConvertedStack(nn.Module):
    """A list of residual blocks run as one reversible sequence (see the module's docstring).

    Args:
        blocks: the residual blocks, as the model's ``nn.ModuleList`` (or ``nn.Sequential``) held them.
        branches: the residual branches of each converted block, ``f(x, **context) -> f(x)``, built from
            the block's own sub-modules (an adapter's ``branches(block)``).
        gamma: in ``(0, 1)`` to train reversibly (0: the original network, plain autograd only).
        method: ``"momentum"`` or ``"two-stream"``.
        exact: the couplings' exact mode (bit-exact rebuilds).
        owner: the stack's path in its model, for messages.
        prefix: how many leading blocks run as they are (not residual in shape: a ResNet stage's
            downsampling unit), before the converted ones.

    Attributes:
        sequence: the :class:`~revnet.engine.ReversibleSequence` of the couplings (two per block for a
            transformer by momentum, one by two-stream); ``.reversible`` flips it as everywhere.
        blocks: how many blocks the stack replaces.
        method: the method.
    """

    def __init__(self, blocks: Sequence[nn.Module], branches: Sequence[Sequence[nn.Module]], *, gamma: float,
                 method: str = "momentum", exact: bool = False, owner: str = "", prefix: int = 0) -> None:
        super().__init__()
        if len(blocks) <= prefix:
            raise ValueError(f"revnet.convert: the stack {owner!r} holds no block to convert.")
        if len(branches) != len(blocks) - prefix:
            raise ValueError(f"revnet.convert: {len(branches)} blocks' branches for {len(blocks) - prefix} "
                             f"converted blocks of {owner!r}.")
        for i, block in enumerate(blocks):
            self.add_module(str(i), block)
        self.blocks, self.prefix, self.owner, self.method = len(blocks), prefix, owner, method
        couplings = couplings_for(method, [f for fs in branches for f in fs], gamma, exact)
        self.sequence = ReversibleSequence(couplings)  # registered after the blocks: their names come first
        self._signature = inspect.signature(blocks[prefix].forward)
        first = next(iter(self._signature.parameters.values()), None)
        if first is None or first.kind not in (inspect.Parameter.POSITIONAL_ONLY,
                                                inspect.Parameter.POSITIONAL_OR_KEYWORD):
            raise TypeError(f"revnet.convert: {type(blocks[prefix]).__name__}.forward takes no positional "
                            f"hidden states first ({self._signature}); the stack cannot be driven.")
        self._hidden = first.name
        self._cache_warned = False
        self._record: list[tuple[torch.Tensor, dict[str, Any]]] | None = None
        # The sequence's state-dict keys name the blocks' tensors a second time: map them to the
        # blocks' own keys (by identity), drop them on saving and fill them on loading.
        own = {id(t): k for k, t in self._block_state(keep_vars=True).items()}
        self._aliases = {k: own[id(t)] for k, t in self.sequence.state_dict(keep_vars=True).items()
                         if id(t) in own}
        self.register_state_dict_post_hook(_drop_sequence_keys)
        self.register_load_state_dict_pre_hook(_fill_sequence_keys)

    def _block_state(self, keep_vars: bool = False) -> dict[str, Any]:
        return {f"{i}.{k}": t for i in range(self.blocks)
                for k, t in self._modules[str(i)].state_dict(keep_vars=keep_vars).items()}

    # --- how the model's own loop sees it -----------------------------------------------------
    def __len__(self) -> int:
        return self.blocks

    def __iter__(self) -> Iterator[Callable[..., torch.Tensor]]:
        return iter([self.run, *[_passthrough] * (self.blocks - 1)])

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            if range(self.blocks)[index] != range(self.blocks):
                raise IndexError(f"revnet.convert: the converted stack {self.owner!r} runs its {self.blocks} "
                                 f"blocks as a whole, so it cannot run the slice {index}. Fix: convert a "
                                 f"model whose forward runs every block.")
            return list(self)
        return self._modules[str(range(self.blocks)[index])]

    def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The whole stack, for a model that calls its block list as one module (an ``nn.Sequential``)."""
        return self.run(hidden, *args, **kwargs)

    def run(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The whole stack on ``hidden``, called as its first block would be: the unconverted blocks
        first (a stage's downsampling unit), then the reversible sequence, whose branches get the
        other arguments as context."""
        for i in range(self.prefix):
            hidden = self._modules[str(i)](hidden, *args, **kwargs)
        bound = self._signature.bind(hidden, *args, **kwargs)
        context: dict[str, Any] = {}
        for name, value in bound.arguments.items():
            kind = self._signature.parameters[name].kind
            if name == self._hidden:
                continue
            if kind == inspect.Parameter.VAR_KEYWORD:
                context.update(value)
            elif kind == inspect.Parameter.VAR_POSITIONAL:
                if value:
                    raise TypeError(f"revnet.convert: the stack {self.owner!r} got extra positional "
                                    f"arguments its blocks take as *args; pass them by keyword.")
            else:
                context[name] = value
        if self.sequence.reversible and torch.is_grad_enabled() and (
                context.get("use_cache") or context.get("cache") is not None):
            # A key/value cache keeps every layer's keys and values: the activations the reversible
            # backward exists not to keep (and the rebuild would append them again). As Hugging Face
            # does under gradient checkpointing, training goes without it.
            if not self._cache_warned:
                warnings.warn(f"revnet.convert: {self.owner!r} trains reversibly, so the key/value cache "
                              f"is off while gradients are on (use_cache=False).", stacklevel=2)
                self._cache_warned = True
            context["use_cache"], context["cache"] = False, None
        # momentum: (v, x), the velocity zero; two-stream: (x_{k-1}, x_k), both the input
        first = torch.zeros_like(hidden) if self.method == "momentum" else hidden
        stream = torch.cat((first, hidden), dim=-1)
        out = self.sequence(stream, **context)
        if self._record is not None:
            self._record.append((stream, context))
        return out[..., hidden.shape[-1]:]

    def reconstruction_error(self, stream: torch.Tensor, context: dict[str, Any]) -> float:
        """Relative error (in norm) of ``stream``, the sequence's input, run through it and rebuilt from
        its output block by block as the reversible backward does (exact mode's tape included); no grad."""
        if "cache" in context or "use_cache" in context:  # the rebuild must not append to the cache again
            context = {**context, "cache": None, "use_cache": False}
        _, rebuilt = roundtrip(list(self.sequence), stream, -1, Context((), context))
        entered = self.sequence[0].entry(stream)
        return float((rebuilt - entered).double().norm() / entered.double().norm().clamp_min(1e-30))

    @property
    def gamma(self) -> float:
        """The couplings' gamma (:func:`revnet.conversion.set_gamma` sets it)."""
        return self.sequence[0].gamma

    def extra_repr(self) -> str:
        kept = f", unconverted={self.prefix}" if self.prefix else ""
        return f"blocks={self.blocks}{kept}, method={self.method}, gamma={self.gamma:g}"


def _drop_sequence_keys(module: ConvertedStack, state_dict: dict[str, Any], prefix: str,
                        local_metadata: Any) -> None:
    head = f"{prefix}{SEQUENCE}."
    for key in [k for k in state_dict if k.startswith(head)]:
        if key[len(head):] in module._aliases:
            del state_dict[key]


def _fill_sequence_keys(module: ConvertedStack, state_dict: dict[str, Any], prefix: str, local_metadata: Any,
                        strict: bool, missing_keys: list[str], unexpected_keys: list[str],
                        error_msgs: list[str]) -> None:
    for key, original in module._aliases.items():
        if f"{prefix}{original}" in state_dict:
            state_dict.setdefault(f"{prefix}{SEQUENCE}.{key}", state_dict[f"{prefix}{original}"])
