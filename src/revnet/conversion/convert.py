"""``revnet.convert``: the residual block stacks of an existing model made reversible, in place."""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .adapters import adapter_for
from .stack import ConvertedStack

__all__ = ["METHODS", "ConversionReport", "auto_gamma", "convert", "converted_stacks", "reconstruction_error",
           "set_gamma"]

log = logging.getLogger("revnet.convert")

METHODS = ("momentum", "two-stream")
AUTO = "auto"
DEFAULT_GAMMA: float | str = "auto"  # measured on both transfers (docs/CONVERT.md)
EXACT_AUTO_GAMMA = 0.25  # exact mode rebuilds at any gamma: the text transfer's best (docs/CONVERT.md)
AUTO_FLOOR = 0.5  # the float rule's floor: below it the function moves little more, the rebuild a lot


def auto_gamma(branches: int, exact: bool = False) -> float:
    """The gamma ``convert(..., gamma="auto")`` picks for a stack of ``branches`` residual branches.

    In float the rebuild's rounding grows by ``1 / gamma`` per branch (each divides by gamma once),
    so the smallest gamma whose rebuild stays near 1e-4 after ``branches`` of them (from 1e-7 per
    step: ``gamma = 1000^(-1 / branches)``, rounded up to 0.01), and not below 0.5; in exact mode,
    where the rebuild is exact at any gamma, 0.25. Measured in docs/CONVERT.md.
    """
    if exact:
        return EXACT_AUTO_GAMMA
    return max(AUTO_FLOOR, math.ceil(100 * 1000.0 ** (-1.0 / max(branches, 1)) - 1e-9) / 100)
CONFIG_KEY = "revnet_conversion"  # where a Hugging Face model's config records the conversion


@dataclass
class ConversionReport:
    """What :func:`convert` did, and (given an ``example``) how far the converted model moved.

    Attributes:
        method: the conversion method (``"momentum"`` or ``"two-stream"``).
        gamma: the couplings' gamma.
        exact: whether the couplings run in exact mode (bit-exact rebuilds).
        auto: whether gamma was chosen from the depth (``gamma="auto"``: :func:`auto_gamma`).
        stacks: ``(path, block class, converted blocks, couplings)`` per converted stack.
        output_difference: ``|y_converted - y_original| / |y_original|`` on the example (None without one).
        reconstruction_error: the largest relative error of a stack's input rebuilt by its inverse
            from its output, on the example (None without one): the drift the reversible backward
            starts from.
    """

    method: str
    gamma: float
    exact: bool = False
    auto: bool = False
    stacks: list[tuple[str, str, int, int]] = field(default_factory=list)
    output_difference: float | None = None
    reconstruction_error: float | None = None

    def __str__(self) -> str:
        where = ", ".join(f"{p or '<model>'} ({n} x {cls})" for p, cls, n, _ in self.stacks)
        mode = ", exact" if self.exact else ""
        chosen = f"auto: {self.gamma:g}" if self.auto else f"{self.gamma:g}"
        out = f"revnet.convert: {self.method} (gamma={chosen}{mode}) on {where}"
        if self.output_difference is not None:
            out += f"; output moved by {self.output_difference:.3g} (relative)"
        if self.reconstruction_error is not None:
            out += f", inverse rebuilds the input to {self.reconstruction_error:.2g}"
        return out


def converted_stacks(model: nn.Module) -> list[tuple[str, ConvertedStack]]:
    """The converted stacks inside ``model``, with their paths."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, ConvertedStack)]


def _refuse_wrapped(model: nn.Module) -> None:
    owner = type(model).__name__
    if hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
        raise TypeError(f"revnet.convert: {owner} is a torch.compile'd model; conversion replaces modules "
                        f"the compiled graph has traced. Fix: convert the original (model._orig_mod), "
                        f"then compile it (revnet.compile).")
    if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
        raise TypeError(f"revnet.convert: {owner} wraps the model for data parallelism. Fix: convert "
                        f"model.module first, then wrap it again.")
    module = sys.modules.get("torch.distributed.fsdp")  # never imported: nothing can be sharded
    kinds = (getattr(module, kind, None) for kind in ("FSDPModule", "FullyShardedDataParallel"))
    fsdp = tuple(t for t in kinds if t is not None)
    for name, m in model.named_modules():
        if fsdp and isinstance(m, fsdp):
            raise TypeError(f"revnet.convert: {name or owner} is sharded with FSDP; its parameters are "
                            f"flattened or sharded. Fix: convert the unsharded model, then shard it.")


def _convertible(block: nn.Module) -> bool:
    adapter = adapter_for(block)
    return adapter is not None and (adapter.check is None or adapter.check(block) is None)


def _find_stacks(model: nn.Module) -> tuple[list[tuple[str, Sequence[nn.Module], int]], list[str]]:
    """The block lists ``convert`` can convert (path, blocks, how many leading blocks stay as they
    are), and a description of the lists it could not. A list is an ``nn.ModuleList`` or a plain
    ``nn.Sequential`` whose blocks after the leading ones (a stage's downsampling unit) all have the
    same adapter."""
    found: list[tuple[str, Sequence[nn.Module], int]] = []
    unknown = []
    for name, m in model.named_modules():
        if not (isinstance(m, nn.ModuleList) or type(m) is nn.Sequential) or len(m) == 0:
            continue
        if any(name.startswith(f"{f}.") for f, _, _ in found):
            continue  # inside a stack already found
        blocks = list(m)
        prefix = max((i + 1 for i, b in enumerate(blocks) if not _convertible(b)), default=0)
        rest = blocks[prefix:]
        if rest and len({id(adapter_for(b)) for b in rest}) == 1:
            found.append((name, blocks, prefix))
        elif isinstance(m, nn.ModuleList) or any(adapter_for(b) is not None for b in blocks):
            classes = ", ".join(sorted({type(b).__name__ for b in blocks}))
            unknown.append(f"{name or '<model>'} ({len(m)} x {classes})")
    return found, unknown


def _branches(path: str, block: nn.Module) -> list[nn.Module]:
    adapter = adapter_for(block)
    assert adapter is not None
    reason = adapter.check(block) if adapter.check is not None else None
    if reason:
        raise ValueError(f"revnet.convert: {type(block).__name__} at {path} cannot be converted: {reason}.")
    try:
        branches = list(adapter.branches(block))
    except AttributeError as e:
        raise TypeError(f"revnet.convert: the adapter for {adapter.name} does not fit the block at {path} "
                        f"({e}); "
                        f"its class has changed from the layout the adapter knows (the Hugging Face adapters "
                        f"follow transformers 5). Fix: register an adapter for this version: "
                        f"revnet.register_adapter({type(block).__name__}, ...).") from e
    if not branches or not all(isinstance(f, nn.Module) for f in branches):
        raise TypeError(f"revnet.convert: the adapter of {adapter.name} must return its residual branches as "
                        f"a non-empty list of nn.Modules, got {[type(f).__name__ for f in branches]}.")
    inside = {id(p) for f in branches for p in f.parameters()}
    outside = [n for n, p in block.named_parameters() if id(p) not in inside]
    if outside:
        raise ValueError(
            f"revnet.convert: {type(block).__name__} at {path} has parameters outside its residual branches "
            f"({', '.join(outside[:4])}{', ...' if len(outside) > 4 else ''}), which the reversible backward "
            f"would not differentiate. Fix: an adapter whose branches include them "
            f"(revnet.register_adapter({type(block).__name__}, ...)), e.g. a layer scale inside its branch.")
    return branches


def _first_tensor(out: Any) -> torch.Tensor:
    """The main output of a model call: a tensor, a Hugging Face output's first field, or a tuple's first."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, tuple | list) and out:
        return _first_tensor(out[0])
    raise TypeError(f"revnet.convert: cannot find a tensor in the model's output ({type(out).__name__}).")


def _call(model: nn.Module, example: Any) -> torch.Tensor:
    if isinstance(example, Mapping):
        return _first_tensor(model(**example))
    if isinstance(example, tuple):
        return _first_tensor(model(*example))
    return _first_tensor(model(example))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def reconstruction_error(model: nn.Module, example: Any) -> float:
    """The largest relative error (in norm) with which a converted stack rebuilds its input from its
    output, block by block as the reversible backward does, for ``model`` called on ``example`` (a
    tensor, a tuple of arguments or a dict of keywords), in evaluation mode and without gradients: how
    far the reversible backward's rebuild drifts (0.0 in exact mode)."""
    stacks = [s for _, s in converted_stacks(model)]
    if not stacks:
        raise ValueError(f"reconstruction_error: {type(model).__name__} has no converted stack; "
                         f"revnet.convert(model) first.")
    was_training = model.training
    records: list[tuple[ConvertedStack, list[tuple[torch.Tensor, dict[str, Any]]]]] = []
    for s in stacks:
        s._record = []
        records.append((s, s._record))
    try:
        model.eval()
        with torch.no_grad():
            _call(model, example)
        return max((s.reconstruction_error(*r) for s, rec in records for r in rec), default=0.0)
    finally:
        for s in stacks:
            s._record = None
        model.train(was_training)


def convert(model: nn.Module, *, method: str | None = None, gamma: float | str | None = None,
            exact: bool | None = None, example: Any = None) -> nn.Module:
    """Makes the residual block stacks of ``model`` reversible, in place, and returns ``model``.

    Every list of residual blocks that an adapter knows (revnet's transformers, Hugging Face GPT-2,
    Llama/Mistral/Qwen2, BERT/RoBERTa, ViT, and any class given to :func:`revnet.register_adapter`)
    becomes a :class:`~revnet.conversion.stack.ConvertedStack`: the blocks' own sub-modules and
    weights, run as momentum steps (Sander et al., ICML 2021) or two-stream steps (RevViT/MEFT's
    form) in one reversible sequence, so that training keeps no block activations. The state dict
    keeps its keys (a checkpoint loads before or after conversion); ``revnet.set_reversible(model,
    False)`` runs the same modules under plain autograd.

    Example:
        >>> import torch, revnet
        >>> gpt = revnet.create_model("gpt_mini")
        >>> tokens = torch.randint(0, 256, (2, 16))
        >>> gpt = revnet.convert(gpt, example=tokens)  # gamma="auto": 0.5 for its 8 branches
        >>> gpt.revnet_conversion.stacks
        [('transformer.blocks', 'TransformerBlock', 4, 8)]

    Args:
        model: the model (not compiled, not wrapped in DDP or FSDP: convert first).
        method: ``"momentum"`` (default): each residual branch ``x = x + f(x)`` becomes
            ``v = gamma v + (1 - gamma) f(x)``, ``x = x + v``, with ``v`` starting at zero.
            ``"two-stream"``: the stream keeps the last two states, each branch computing
            ``x_next = gamma x_prev + (1 - gamma) x + f(x)`` (two branches per coupling).
        gamma: ``"auto"`` (default): the smallest the rebuild allows for the stack's depth
            (:func:`auto_gamma`: 0.5 up to 10 branches, 0.75 for 24, 0.87 for 48; 0.25 in exact mode),
            or a number in ``[0, 1)``. 0 is the original network exactly but cannot rebuild
            (plain autograd only); larger values rebuild more accurately (rounding grows by
            ``1 / gamma`` per step) and move the function further from the original's.
        exact: the couplings' exact mode (default False): the rebuild is bit-exact at any gamma and
            depth, for one byte per element of a stream half per scaling kept until backward, and
            gamma becomes the nearest fraction with denominator <= 256 (docs/guide/convert.md).
        example: an input for ``model`` (a tensor, a tuple of arguments, or a dict of keywords): with it
            the report gives how far the outputs moved and the inverse's reconstruction error.

    Returns:
        ``model``, converted; ``model.revnet_conversion`` is the :class:`ConversionReport` (also logged).
        A Hugging Face model's config records the method and gamma (``config.revnet_conversion``), so
        ``convert`` after ``from_pretrained`` without options converts as before.

    Raises:
        ValueError: nothing to convert (with the block lists found and how to register an adapter),
            the model converted already, a block with parameters outside its branches.
        TypeError: a compiled, DDP- or FSDP-wrapped model (convert first).
    """
    _refuse_wrapped(model)
    owner = type(model).__name__
    recorded = getattr(getattr(model, "config", None), CONFIG_KEY, None)
    if isinstance(recorded, Mapping) and method is None and gamma is None and exact is None:
        method, gamma, exact = recorded.get("method"), recorded.get("gamma"), recorded.get("exact")
    method = "momentum" if method is None else method
    gamma = DEFAULT_GAMMA if gamma is None else gamma
    auto = gamma == AUTO
    exact = bool(exact)
    if method not in METHODS:
        raise ValueError(f"revnet.convert: unknown method {method!r}; expected one of {METHODS}.")
    if not auto:
        if isinstance(gamma, str) or not (math.isfinite(float(gamma)) and 0.0 <= float(gamma) < 1.0):
            raise ValueError(f"revnet.convert: gamma must be in [0, 1) or 'auto', got {gamma!r}.")
        gamma = float(gamma)
        if exact and gamma == 0.0:
            raise ValueError("revnet.convert: exact mode rebuilds, and gamma = 0 cannot: pass gamma > 0.")
    done = converted_stacks(model)
    if done:
        raise ValueError(f"revnet.convert: {owner} is converted already ({', '.join(p for p, _ in done)}); "
                         f"converting twice would nest reversible streams. Fix: convert the original model "
                         f"once (to change gamma, set it on the couplings: revnet.conversion.set_gamma).")
    found, unknown = _find_stacks(model)
    if not found:
        seen = (f" It has block lists {'; '.join(unknown)}." if unknown
                else " It has no nn.ModuleList of blocks.")
        raise ValueError(
            f"revnet.convert: found no residual block stack it knows in {owner}.{seen} Fix: register your "
            f"block class: revnet.register_adapter(BlockClass, lambda block: [branch_1, branch_2]) with its "
            f"residual branches (docs/guide/convert.md, 'Your own block').")

    reference = None
    if example is not None:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            reference = _call(model, example).detach().clone()
        model.train(was_training)
    branches_of = {}
    for path, blocks, prefix in found:
        if not path:
            raise ValueError(f"revnet.convert: {owner} is itself a list of blocks; convert the model that "
                             f"holds it (its forward runs the loop).")
        branches_of[path] = [_branches(f"{path}.{i}", b) for i, b in enumerate(blocks) if i >= prefix]
    if auto:
        gamma = auto_gamma(max(sum(len(fs) for fs in bs) for bs in branches_of.values()), exact)
    report = ConversionReport(method, gamma, exact, auto=auto)
    for path, blocks, prefix in found:
        branches = branches_of[path]
        stack = ConvertedStack(blocks, branches, gamma=gamma, method=method, exact=exact, owner=path,
                               prefix=prefix)
        stack.train(model.get_submodule(path).training)
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, attr, stack)
        adapter = adapter_for(blocks[prefix])
        if adapter is not None and adapter.parent is not None:
            adapter.parent(parent)
        report.stacks.append((path, type(blocks[prefix]).__name__, len(blocks) - prefix, len(stack.sequence)))
    if reference is not None:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            report.output_difference = _rel(_call(model, example), reference)
        model.train(was_training)
        report.reconstruction_error = reconstruction_error(model, example) if gamma > 0 else None
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):  # a Hugging Face config: saved with the model
        setattr(config, CONFIG_KEY, {"method": method, "gamma": gamma, "exact": exact})
    model.revnet_conversion = report
    log.info("%s", report)
    return model


def set_gamma(model: nn.Module, gamma: float) -> int:
    """Sets the momentum of every converted stack's couplings (between steps); returns how many."""
    if not (math.isfinite(gamma) and 0.0 <= gamma < 1.0):
        raise ValueError(f"set_gamma: gamma must be in [0, 1), got {gamma}.")
    stacks = converted_stacks(model)
    if gamma == 0.0 and any(getattr(c, "exact", False) for _, s in stacks for c in s.sequence):
        raise ValueError("set_gamma: the couplings are in exact mode, and exact mode cannot rebuild at "
                         "gamma = 0; turn it off first (revnet.set_exact(model, False)).")
    count = 0
    for _, stack in stacks:
        for c in stack.sequence:
            c.gamma = float(gamma)
            count += 1
    config = getattr(model, "config", None)
    if config is not None and isinstance(getattr(config, CONFIG_KEY, None), dict):
        getattr(config, CONFIG_KEY)["gamma"] = float(gamma)
    return count

