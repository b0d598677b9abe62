"""The optimizer step inside backward: each parameter stepped as soon as its gradient is complete.

Once activations no longer grow with depth, a training step's peak holds every parameter's
gradient at once (between backward and ``optimizer.step()``). Stepping each parameter from a hook
that fires when its gradient has been accumulated, and freeing that gradient at once, leaves at
most the gradients of the block whose backward is running: the reversible engine returns a
block's parameter gradients when that block is done, so they are stepped and freed block by block.

:func:`optimizer_in_backward` gives every trainable parameter its own optimizer (``make_optimizer``
called with that one parameter) and a post-accumulate-grad hook that steps it; the
:class:`OptimizerInBackward` it returns stands for all of them where a training loop expects one
optimizer: LR schedulers change its ``param_groups`` (the per-parameter optimizers' own), its
``state_dict`` checkpoints them, and its ``step()`` has nothing left to do.

Under FSDP2 (``fully_shard``) each sharded parameter steps when its group's gradients have been
reduce-scattered: FSDP2 (torch 2.13) calls the sharded parameter's post-accumulate-grad hooks right
after it writes the reduce-scattered ``.grad`` (on CUDA in its post-reduce stream, ordered after the
reduce-scatter), so the parameter's own hook steps it there; the end of the group's
``post_backward`` steps whatever gradient is still left (a torch whose FSDP does not call them).

Under DistributedDataParallel the step must wait for the gradient's all-reduce: called on the DDP
wrapper, it steps each parameter from DDP's communication hook, when the all-reduce of the bucket
that holds it has finished, instead of from the parameter's own hook (which would step on a gradient
not yet averaged over the processes). DDP keeps every gradient in its buckets anyway, so there the
gain is the overlap of the optimizer with backward, not memory. (PyTorch's own
``_apply_optimizer_in_backward`` route into DDP needs an accelerator; this one runs on gloo too.)

What cannot work this way is refused: a global-norm gradient clip needs every gradient before the
first step (clip per parameter instead: ``clip_per_parameter``), and accumulating gradients over
micro-batches needs them kept between backward passes.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["OptimizerInBackward", "optimizer_in_backward"]

MakeOptimizer = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


class OptimizerInBackward(torch.optim.Optimizer):
    """The per-parameter optimizers that step in backward, as one optimizer for the training loop.

    Made by :func:`optimizer_in_backward`. ``param_groups`` are the per-parameter optimizers' own
    groups (setting a learning rate here sets theirs, which is what LR schedulers do);
    :meth:`step` and :meth:`zero_grad` have nothing to do (each parameter was stepped and its
    gradient freed in backward); :meth:`state_dict` / :meth:`load_state_dict` carry every
    per-parameter optimizer's state. :meth:`remove` takes the hooks away.

    Attributes:
        optimizers: one optimizer per trainable parameter, in ``model.parameters()`` order.
        steps: how many parameter steps the hooks have taken (each backward adds one per parameter).
    """

    def __init__(self, params: list[nn.Parameter], make_optimizer: MakeOptimizer,
                 clip_per_parameter: float | None = None) -> None:
        self.optimizers: list[torch.optim.Optimizer] = []
        for i, p in enumerate(params):
            opt = make_optimizer([p])
            if not isinstance(opt, torch.optim.Optimizer):
                raise TypeError(f"optimizer_in_backward: make_optimizer must return a torch.optim.Optimizer, "
                                f"got {type(opt).__name__}.")
            owned = [q for g in opt.param_groups for q in g["params"]]
            if len(owned) != 1 or owned[0] is not p:
                raise ValueError(f"optimizer_in_backward: make_optimizer([p]) must return an optimizer over "
                                 f"exactly that parameter (parameter {i}, shape {tuple(p.shape)}), got one "
                                 f"over {len(owned)} parameter(s). Fix: build it from its argument, e.g. "
                                 f"lambda params: torch.optim.AdamW(params, lr=1e-3).")
            self.optimizers.append(opt)
        first = self.optimizers[0]
        super().__init__(params, dict(first.defaults))
        # The groups are the per-parameter optimizers' own dicts, so a scheduler's lr reaches them.
        self.param_groups = [g for opt in self.optimizers for g in opt.param_groups]
        self.clip = clip_per_parameter
        self.steps = 0
        self._params = params
        self._by_param = {id(p): opt for p, opt in zip(params, self.optimizers, strict=True)}
        self._handles = [p.register_post_accumulate_grad_hook(self._hook(p, opt))
                         for p, opt in zip(params, self.optimizers, strict=True)]
        self._ddp = False

    def _hook(self, p: nn.Parameter, opt: torch.optim.Optimizer) -> Callable[[torch.Tensor], None]:
        return lambda param: self._step_one(param, opt)

    def _step_one(self, p: torch.Tensor, opt: torch.optim.Optimizer) -> None:
        """Clips (per parameter, if asked), steps ``p``'s optimizer and frees the gradient: the one
        step every route (hook, DDP's communication hook, FSDP's post-backward) takes."""
        if self.clip is not None:
            torch.nn.utils.clip_grad_norm_([p], self.clip)
        opt.step()
        self.steps += 1
        p.grad = None  # freed now: the point of stepping here

    def _bind_ddp(self, ddp: nn.parallel.DistributedDataParallel) -> None:
        """Steps from DDP's communication hook, after each bucket's all-reduce, instead of the hooks."""
        import torch.distributed as dist

        for h in self._handles:
            h.remove()
        self._handles = []
        by_param = self._by_param
        group = ddp.process_group

        # No annotations: DDP checks the bucket's annotation against dist.GradBucket itself, and this
        # module's postponed annotations would be strings.
        def reduce_then_step(_state, bucket):  # type: ignore[no-untyped-def]
            world = dist.get_world_size(group)
            fut = dist.all_reduce(bucket.buffer(), group=group, async_op=True).get_future()

            def step(done: torch.futures.Future[list[torch.Tensor]]) -> torch.Tensor:
                buffer = done.value()[0].div_(world)
                for p, grad in zip(bucket.parameters(), bucket.gradients(), strict=True):
                    opt = by_param.get(id(p))
                    if opt is None:
                        continue
                    p.grad = _in_layout_of(p, grad)
                    self._step_one(p, opt)
                return buffer

            return fut.then(step)

        ddp.register_comm_hook(None, reduce_then_step)
        self._ddp = True

    def _bind_fsdp(self, units: list[nn.Module]) -> None:
        """Steps each sharded parameter when FSDP has reduce-scattered its gradient, at the latest:
        FSDP2 in torch 2.13 calls the parameter's post-accumulate-grad hooks after writing the
        sharded ``.grad`` (so it is stepped and freed there, and nothing is left here); for an FSDP
        that does not, the end of each parameter group's ``post_backward`` (which the reversible
        engine calls when a block is done and FSDP's own hooks call for the other units) steps each
        gradient still there. Uses FSDP2's parameter-group object (torch 2.13)."""
        for unit in units:
            for group in unit._get_fsdp_state()._fsdp_param_groups:
                group.post_backward = self._after_reduce(group, group.post_backward)

    def _after_reduce(self, group: Any, post_backward: Callable[..., Any]) -> Callable[..., Any]:
        def reduce_then_step(*args: Any) -> Any:
            out = post_backward(*args)
            wait = getattr(group, "_wait_for_post_backward", None)
            for fsdp_param in group.fsdp_params:
                p = fsdp_param.sharded_param
                opt = self._by_param.get(id(p))
                if opt is None or p.grad is None:
                    continue
                if wait is not None:
                    wait()  # the reduce-scatter has written the gradient (asynchronous on CUDA)
                    wait = None
                self._step_one(p, opt)
            return out
        return reduce_then_step

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Nothing to do: every parameter was stepped in backward. A closure is refused (it would
        run another backward, stepping again)."""
        if closure is not None:
            raise ValueError("OptimizerInBackward.step: the parameters step inside backward, so a closure "
                             "(LBFGS-style re-evaluation) cannot be used.")
        if self._ddp:
            self.zero_grad()  # DDP copied its averaged buckets back into .grad after the steps
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Frees gradients left behind (DDP writes its averaged buckets back after backward)."""
        for p in self._params:
            p.grad = None

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers], "steps": self.steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("optimizers")
        if not isinstance(saved, list) or len(saved) != len(self.optimizers):
            raise ValueError(f"OptimizerInBackward.load_state_dict: expected the state of "
                             f"{len(self.optimizers)} per-parameter optimizers (a state_dict of an "
                             f"OptimizerInBackward over the same model), got "
                             f"{'none' if saved is None else len(saved)}.")
        for opt, state in zip(self.optimizers, saved, strict=True):
            opt.load_state_dict(state)
        self.param_groups = [g for opt in self.optimizers for g in opt.param_groups]
        self.steps = int(state_dict.get("steps", 0))

    def clip_grad_norm_(self, max_norm: float) -> None:
        raise RuntimeError(
            "OptimizerInBackward: a global-norm gradient clip needs every gradient before the first "
            "parameter steps, and here each parameter steps (and frees its gradient) as soon as its own "
            "gradient is complete. Fix: clip each parameter's gradient on its own, "
            "optimizer_in_backward(model, make_optimizer, clip_per_parameter=max_norm), or train "
            "without the optimizer in backward.")

    def remove(self) -> None:
        """Takes the hooks away (the parameters keep their values and the optimizers their state)."""
        if self._ddp:
            raise RuntimeError("OptimizerInBackward.remove: DDP's communication hook cannot be taken back; "
                               "wrap the model in a new DistributedDataParallel instead.")
        for h in self._handles:
            h.remove()
        self._handles = []
        for p in self._params:
            if getattr(p, "_revnet_in_backward", None) is self:
                del p._revnet_in_backward

    def __repr__(self) -> str:
        kinds = sorted({type(o).__name__ for o in self.optimizers})
        return f"OptimizerInBackward({len(self.optimizers)} parameters, {'/'.join(kinds)})"


def _in_layout_of(p: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """A DDP bucket's gradient as it lies in the bucket: DDP lays a dense parameter's gradient out in
    the parameter's own strides (channels-last convolutions), while ``GradBucket.gradients()`` views
    it contiguously; read that way, a channels-last gradient would be scrambled."""
    dense = p.is_contiguous() or any(p.is_contiguous(memory_format=f) for f in
                                     ((torch.channels_last,) if p.dim() == 4 else
                                      (torch.channels_last_3d,) if p.dim() == 5 else ()))
    if p.is_contiguous() or not dense:
        return grad
    return grad.as_strided(p.size(), p.stride(), grad.storage_offset())


def optimizer_in_backward(model: nn.Module | Iterable[nn.Parameter], make_optimizer: MakeOptimizer, *,
                          clip_per_parameter: float | None = None,
                          clip_grad_norm: float | None = None) -> OptimizerInBackward:
    """Steps every trainable parameter of ``model`` inside backward, as soon as its gradient is complete.

    Example:
        >>> import torch, revnet
        >>> model = revnet.create_model("revnet38")
        >>> opt = revnet.optimizer_in_backward(model, lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9))
        >>> model(torch.randn(2, 3, 32, 32)).sum().backward()  # the parameters have moved; no .grad left
        >>> all(p.grad is None for p in model.parameters())
        True

    Args:
        model: the model, its DistributedDataParallel wrapper (then each parameter steps after the
            all-reduce of its bucket; call it before the first backward), or its parameters.
        make_optimizer: ``make_optimizer([param]) -> torch.optim.Optimizer`` over that one parameter,
            e.g. ``lambda ps: torch.optim.AdamW(ps, lr=1e-3)``; called once per parameter.
        clip_per_parameter: clip each parameter's gradient to this norm before its step.
        clip_grad_norm: refused (a global norm needs every gradient first): the error says what to do.

    Returns:
        An :class:`OptimizerInBackward`, for LR schedulers and checkpoints; its ``step()`` does nothing.

    Raises:
        ValueError: ``clip_grad_norm`` given, a model with no trainable parameters, parameters that
            step in backward already, or an optimizer built over other parameters than its own.
    """
    if clip_grad_norm is not None:
        raise ValueError(
            "optimizer_in_backward: a global-norm gradient clip (clip_grad_norm) needs every gradient before "
            "the first parameter steps, and here each parameter steps as soon as its own gradient is "
            "complete. "
            f"Fix: clip_per_parameter={clip_grad_norm} (each parameter's gradient clipped on its own).")
    if clip_per_parameter is not None and not (math.isfinite(clip_per_parameter) and clip_per_parameter > 0):
        raise ValueError(f"optimizer_in_backward: clip_per_parameter must be a positive number, got "
                         f"{clip_per_parameter!r}.")
    ddp = model if isinstance(model, nn.parallel.DistributedDataParallel) else None
    fsdp = getattr(sys.modules.get("torch.distributed.fsdp"), "FSDPModule", None)
    modules = list(model.modules()) if isinstance(model, nn.Module) else []
    sharded = [m for m in modules if fsdp is not None and isinstance(m, fsdp)]
    found = model.parameters() if isinstance(model, nn.Module) else model
    params, seen = [], set()
    for p in found:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    if not params:
        raise ValueError("optimizer_in_backward: no trainable parameters.")
    if any(getattr(p, "_revnet_in_backward", None) is not None for p in params):
        raise ValueError("optimizer_in_backward: these parameters step in backward already; call "
                         ".remove() on the first OptimizerInBackward before making another.")
    opt = OptimizerInBackward(params, make_optimizer, clip_per_parameter)
    for p in params:
        p._revnet_in_backward = opt  # type: ignore[attr-defined]
    if ddp is not None:
        opt._bind_ddp(ddp)
    if sharded:
        opt._bind_fsdp(sharded)
    return opt
