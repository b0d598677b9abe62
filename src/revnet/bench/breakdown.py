"""Where a training step's bytes go, per rank: parameters, gradients, optimizer state, activations.

``revnet bench memory --breakdown`` runs :func:`breakdown` on every rank of a ``torchrun`` job
(``--nproc`` CPU processes, gloo). For each model (float32, AdamW) and each way of training it
(:data:`MODES`):

- ``ddp plain``: DistributedDataParallel around the model under plain autograd;
- ``ddp reversible``: the same, reversible;
- ``ddp reversible + optimizer in backward``: the same, each parameter stepped from DDP's
  communication hook after its bucket's all-reduce (:func:`revnet.optimizer_in_backward`);
- ``fsdp reversible``: ``fully_shard`` on every coupling of every reversible sequence, then the root
  (:func:`revnet.training.distributed.shard_fsdp`);
- ``fsdp reversible + optimizer in backward``: the same, each sharded parameter stepped, and its
  gradient freed, as soon as the reduce-scatter has written it.

one training step runs (forward, loss, backward, ``step``), and this rank's tensors are counted as
the bytes of their distinct storages (a sharded parameter counts its local shard, padding included;
views of one buffer count it once):

- ``params``: the parameters after the step (FSDP has resharded them all after backward);
- ``grads``: the **high-water mark** of the parameters' gradients (``.grad``; FSDP's sharded ones)
  alive at once on this rank during backward. Sampled at the end of backward, before and after every
  FSDP parameter group's ``post_backward``, and at every sharded parameter's post-accumulate-grad
  hook, which FSDP2 fires as its reduce-scatter writes that parameter's sharded gradient: the
  sampling hook is registered before the optimizer in backward's own, so each sample is taken just
  before that parameter steps and frees its gradient. Without the optimizer in backward the mark is
  the end of backward, every gradient held; with it under FSDP, one group's reduce-scatter output
  (the sharded gradients are views of it, freed when the last of them is). DDP keeps its gradients
  in its buckets (``gradient_as_bucket_view``) for the wrapper's lifetime, with or without the
  optimizer in backward, so there the gradients are the buckets;
- ``grads_in_flight`` (FSDP only, not in ``grads``): the high-water mark of the unsharded, full-size
  gradients waiting for a group's reduce-scatter: those of the one unit whose backward is done, in
  both FSDP modes alike. FSDP's own communication buffers are not counted;
- ``optimizer``: the optimizer state (AdamW's two moments; per-parameter optimizers' states summed);
- ``activations``: the tensors one forward and loss keep for backward
  (:class:`revnet.memory.measure.SavedBytes`, run after the step): under FSDP these include the
  root's gathered parameters that its own layers save (a GPT's tied embedding, saved by its head).

Inputs as the reversible papers measure them: a vision transformer on ``batch`` (default 2) random
224px images of 1000 classes (its own image size); a language model on ``batch`` (default 1) random
sequences of its context length (GPT-2's 1024) over its vocabulary (50257).
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..engine import set_reversible
from ..memory.in_backward import optimizer_in_backward
from ..memory.measure import SavedBytes
from ..models import create_model, list_models
from ..training.distributed import DistInfo, shard_fsdp
from .contenders import model_kind

__all__ = ["DEFAULT_MODELS", "MODES", "breakdown", "breakdown_models", "check_models",
           "measure_mode", "static_mib"]

MiB = 2**20
MODES = ("ddp plain", "ddp reversible", "ddp reversible + optimizer in backward", "fsdp reversible",
         "fsdp reversible + optimizer in backward")
DEFAULT_MODELS = ("revvit_base", "revgpt2_small")
_KINDS = ("revvit", "revgpt")  # the reversible transformers: vision (images) and language (tokens)
_CLASSES = 1000  # a vision transformer's head: ImageNet's classes
_LR = 1e-4

Progress = Callable[[dict[str, Any]], None] | None


def breakdown_models() -> list[str]:
    """The registered models the breakdown takes: the reversible vision and language transformers."""
    return [name for name in list_models() if model_kind(name) in _KINDS]


def check_models(names: Sequence[str]) -> None:
    """Raises ValueError naming the models the breakdown cannot take, and the ones it can."""
    valid = breakdown_models()
    known = set(list_models())
    unknown = [n for n in names if n not in known]
    other = [n for n in names if n in known and n not in valid]
    problems = [] if names else ["no models given"]
    if unknown:
        problems.append(f"unknown model{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}")
    if other:
        problems.append(f"{', '.join(other)} {'is' if len(other) == 1 else 'are'} not a reversible vision or "
                        f"language transformer")
    if problems:
        raise ValueError(f"{'; '.join(problems)}. The breakdown takes: {', '.join(valid)}.")


def package_root() -> str:
    """The folder holding the revnet package (for the launched processes' ``PYTHONPATH``)."""
    return str(Path(__file__).resolve().parents[2])


def static_mib(row: dict[str, Any]) -> float:
    """What a row holds besides activations: parameters, gradients and optimizer state (MiB)."""
    return row["params_mib"] + row["grads_mib"] + row["optimizer_mib"]


def breakdown(models: Sequence[str] = DEFAULT_MODELS, modes: Sequence[str] = MODES, *, info: DistInfo,
              batch: int | None = None, progress: Progress = None) -> dict[str, Any]:
    """This rank's bytes of one training step, per model and mode (the module's docstring).

    Every rank of the job must call it with the same arguments (the modes' collectives).

    Args:
        models: of :func:`breakdown_models`.
        modes: of :data:`MODES`.
        info: the process group this rank is in (:func:`revnet.training.distributed.init_from_env`),
            at least 2 processes.
        batch: per-rank batch (default 2 images, or 1 sequence).
        progress: called with each finished row.

    Returns:
        ``config`` and ``rows`` (one per model and mode, in that order), each row's ``ratio`` its
        :func:`static_mib` over ``ddp plain``'s (None where that mode was not measured).

    Raises:
        ValueError: an unknown model or mode, a batch < 1, or fewer than 2 processes.
    """
    check_models(models)
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"breakdown: unknown mode(s) {unknown}; expected some of {list(MODES)}.")
    if batch is not None and batch < 1:
        raise ValueError(f"breakdown: batch must be >= 1, got {batch}.")
    if info.world_size < 2:
        raise ValueError(f"breakdown: compares sharded against replicated training, which needs >= 2 "
                         f"processes; this job has {info.world_size}.")
    rows = []
    for name in models:
        done = []
        for mode in modes:
            done.append(measure_mode(name, mode, info, batch=batch))
            gc.collect()  # the mode's model, wrapper and optimizer go before the next is built
            if progress is not None:
                progress(done[-1])
        plain = next((r for r in done if r["mode"] == "ddp plain"), None)
        for r in done:
            r["ratio"] = static_mib(r) / static_mib(plain) if plain else None
        rows += done
    config = {"models": list(models), "modes": list(modes), "batch": batch, "world_size": info.world_size,
              "backend": info.backend, "dtype": "float32", "optimizer": f"AdamW(lr={_LR})",
              "rank": info.rank}
    return {"config": config, "rows": rows}


def measure_mode(name: str, mode: str, info: DistInfo, *, batch: int | None = None) -> dict[str, Any]:
    """One training step of model ``name`` trained as ``mode`` on this rank, and its bytes (MiB)."""
    model, x, y, lm = _build(name, batch)
    set_reversible(model, mode != "ddp plain")
    in_backward = mode.endswith("optimizer in backward")
    if mode.startswith("fsdp"):
        net = shard_fsdp(model, info)
        watch = _GradientWatermark.fsdp(model)
    else:
        net = nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True)
        watch = _GradientWatermark(lambda: list(model.parameters()))
    if in_backward:
        opt: torch.optim.Optimizer = optimizer_in_backward(
            net, lambda ps: torch.optim.AdamW(ps, lr=_LR))
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=_LR)
    _loss(net, x, y, lm).backward()
    watch.sample()  # the end of backward: every gradient still held is here
    opt.step()  # the optimizer state exists from here on
    params = list(model.parameters())  # FSDP: the sharded parameters again (resharded after backward)
    with SavedBytes(model) as saved:
        loss = _loss(net, x, y, lm)
    del loss
    row = {"model": name, "mode": mode, "batch": len(x), "input": list(x.shape),
           "params_mib": _storage_bytes(params) / MiB, "grads_mib": watch.peak / MiB,
           "grads_in_flight_mib": watch.in_flight / MiB if mode.startswith("fsdp") else None,
           "optimizer_mib": _storage_bytes(_optimizer_tensors(opt)) / MiB,
           "activations_mib": saved.total / MiB}
    return row


def _build(name: str, batch: int | None) -> tuple[nn.Module, torch.Tensor, torch.Tensor, bool]:
    """The model (seed 0, float32) and one batch: tokens and next tokens, or images and labels."""
    lm = model_kind(name) == "revgpt"
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if lm:
        model = create_model(name)
        seq = torch.randint(0, model.vocab_size, (batch or 1, model.context_length + 1), generator=g)
        return model, seq[:, :-1].contiguous(), seq[:, 1:].contiguous(), lm
    model = create_model(name, num_classes=_CLASSES).to(memory_format=torch.contiguous_format)
    size = model.tokens.img_size
    x = torch.randn(batch or 2, model.in_chans, size, size, generator=g)
    return model, x, torch.randint(0, _CLASSES, (len(x),), generator=g), lm


def _loss(net: nn.Module, x: torch.Tensor, y: torch.Tensor, lm: bool) -> torch.Tensor:
    return net(x, targets=y) if lm else F.cross_entropy(net(x), y)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # a DTensor's shard on this rank


def _storage_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of the distinct storages under ``tensors`` (views of one buffer count it once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is not None:
            s = _local(t).untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def _optimizer_tensors(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The state tensors of ``opt`` (of each per-parameter optimizer of an optimizer in backward);
    scalars (AdamW's step counts) left out."""
    optimizers = getattr(opt, "optimizers", [opt])
    return [t for o in optimizers for s in o.state.values() for t in s.values()
            if isinstance(t, torch.Tensor) and t.dim() > 0]


class _GradientWatermark:
    """The most gradient bytes alive at once on this rank, over the samples taken.

    ``peak``: the ``.grad`` of ``held()`` (the parameters as the optimizer sees them: FSDP's sharded
    ones); ``in_flight``: the ``.grad`` of ``unsharded()`` (FSDP's full-size parameters, whose
    gradients wait there for their group's reduce-scatter). Asked at every sample: FSDP replaces its
    parameter objects at its lazy initialisation, in the first forward.
    """

    def __init__(self, held: Callable[[], list[torch.Tensor]],
                 unsharded: Callable[[], list[torch.Tensor | None]] = list) -> None:
        self.held, self.unsharded = held, unsharded
        self.peak = 0
        self.in_flight = 0

    @classmethod
    def fsdp(cls, model: nn.Module) -> _GradientWatermark:
        """Samples at every sharded parameter's post-accumulate-grad hook, which FSDP2 fires as the
        reduce-scatter writes that parameter's sharded gradient (registered here before
        :func:`revnet.optimizer_in_backward` registers its own, so each sample comes just before the
        parameter steps and frees its gradient), and before and after every parameter group's
        ``post_backward``. Uses FSDP2's parameter-group objects (torch 2.13), as the optimizer in
        backward does."""
        from torch.distributed.fsdp import FSDPModule

        groups = [g for m in model.modules() if isinstance(m, FSDPModule)
                  for g in m._get_fsdp_state()._fsdp_param_groups]
        fsdp_params = [fp for g in groups for fp in g.fsdp_params]
        watch = cls(lambda: [fp.sharded_param for fp in fsdp_params],
                    lambda: [getattr(fp, "_unsharded_param", None) for fp in fsdp_params])
        for fp in fsdp_params:
            fp.sharded_param.register_post_accumulate_grad_hook(lambda _p: watch.sample())
        for g in groups:
            g.post_backward = watch._around(g.post_backward)
        return watch

    def _around(self, post_backward: Callable[..., Any]) -> Callable[..., Any]:
        def sampled(*args: Any) -> Any:
            self.sample()  # the unit's full gradients, handed to the reduce-scatter
            out = post_backward(*args)
            self.sample()  # its sharded gradients written, before any step frees them
            return out
        return sampled

    def sample(self) -> None:
        self.peak = max(self.peak, _storage_bytes(p.grad for p in self.held()))
        self.in_flight = max(self.in_flight,
                             _storage_bytes(p.grad for p in self.unsharded() if p is not None))
