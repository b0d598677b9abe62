"""Process-group plumbing for DDP training under ``torchrun`` (used by :mod:`revnet.training.loop`).

``torchrun`` starts one process per device and tells each its place through environment
variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``).
:func:`init_from_env` reads them, joins the process group (gloo on CPU, nccl on CUDA) and
returns a :class:`DistInfo`; without them it returns the single-process info and touches
nothing. The small collectives here (:meth:`DistInfo.any`, :meth:`DistInfo.sum`, ...) are
no-ops in a single process, so the training loop reads the same either way.

Failures of the group itself (a rank that dies, a rendezvous nobody joins, a collective
that outlives the timeout) are re-raised as :class:`DistributedError` with a message
that says what happened and what to do.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistInfo", "DistributedError", "init_from_env", "launch_command", "shutdown", "wrap_ddp"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(RuntimeError):
    """The process group failed: a rank died or never joined, or a collective timed out."""


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the job (``world_size == 1``: no process group)."""

    rank: int = 0  # global rank in [0, world_size)
    world_size: int = 1  # number of processes
    local_rank: int = 0  # rank on this node: the CUDA device index under torchrun
    backend: str | None = None  # "gloo", "nccl", or None in a single process
    owns_group: bool = False  # this DistInfo created the process group (and destroys it)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs, shows progress and writes files."""
        return self.rank == 0

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when ``flag`` is True on at least one (a collective stop decision)."""
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        guarded(dist.all_reduce, t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def sum(self, values: Sequence[float], device: torch.device) -> list[float]:
        """Element-wise sum of ``values`` over all ranks (float64, exact for counts)."""
        if not self.enabled:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
        guarded(dist.all_reduce, t)
        return t.tolist()

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank (pickled; for small things and checkpoints)."""
        if not self.enabled:
            return obj
        box = [obj]
        guarded(dist.broadcast_object_list, box, src=0)
        return box[0]

    def broadcast_tensors(self, tensors: Sequence[torch.Tensor]) -> None:
        """Overwrites ``tensors`` in place with rank 0's values."""
        if self.enabled:
            for t in tensors:
                guarded(dist.broadcast, t, src=0)

    def barrier(self) -> None:
        if self.enabled:
            guarded(dist.barrier)

    def raise_together(self, error: BaseException | None) -> None:
        """Rank 0's error (if any) raised on every rank, so that all ranks stop at one point.

        Checks whose answer lives on rank 0 alone (files in the run directory, which need
        not be shared between nodes) run there; the others learn the verdict here.
        """
        if not self.enabled:
            if error is not None:
                raise error
            return
        verdict = self.broadcast(None if error is None else (type(error), str(error)))
        if error is not None:
            raise error
        if verdict is not None:
            kind, message = verdict
            raise kind(message)


def guarded(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Runs a collective; a failure of the group becomes a :class:`DistributedError`."""
    try:
        return fn(*args, **kwargs)
    except DistributedError:
        raise
    except RuntimeError as e:  # DistError (gloo/nccl/store) subclasses RuntimeError
        raise lost_contact(e) from e


def lost_contact(error: BaseException, where: str = "") -> DistributedError:
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))
    return DistributedError(
        f"rank {rank}{where}: lost contact with the other processes ({type(error).__name__}: "
        f"{str(error).strip().splitlines()[0] if str(error).strip() else 'no message'}). Another rank "
        f"probably died (see its error above) or a collective outlived --dist-timeout. No checkpoint "
        f"was written after this point; continue from the last complete one with --resume.")


def is_group_failure(error: BaseException) -> bool:
    """Whether ``error`` comes from the process group rather than from the model or data."""
    if isinstance(error, (DistributedError, dist.DistError)):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        s in text for s in ("Gloo", "gloo", "NCCL", "Connection closed", "Connection reset",
                            "Broken pipe", "timed out", "Timed out"))


def init_from_env(device: str, timeout_s: float) -> DistInfo:
    """Joins the process group described by torchrun's environment, if there is one.

    Args:
        device: the configured device ("auto", "cpu", "cuda", ...): CUDA means nccl, else gloo.
        timeout_s: seconds the rendezvous and every collective may wait for the other ranks.

    Returns:
        The single-process info when ``WORLD_SIZE`` is unset or 1; the process's place in the
        group otherwise (reusing a group that is already initialised).

    Raises:
        DistributedError: the environment is incomplete, or the rendezvous failed.
    """
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(),
                        int(os.environ.get("LOCAL_RANK", 0)), dist.get_backend(), owns_group=False)
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return DistInfo()
    missing = [k for k in _ENV if not os.environ.get(k)]
    if missing:
        raise DistributedError(
            f"WORLD_SIZE={world} is set but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
            f"not: the rendezvous is incomplete. Launch with torchrun (torchrun --nproc-per-node N -m "
            f"revnet train ...) or `revnet train --nproc N`, which set all of {', '.join(_ENV)}.")
    if not dist.is_available():
        raise DistributedError("this PyTorch build has no torch.distributed; run in one process.")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    use_cuda = torch.cuda.is_available() and (device.startswith("cuda") or device == "auto")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DistributedError(f"device {device!r} requested but CUDA is not available; use --device cpu "
                               f"(gloo).")
    if use_cuda and local_rank >= torch.cuda.device_count():
        raise DistributedError(
            f"LOCAL_RANK {local_rank} has no GPU: this node has {torch.cuda.device_count()}; start at most "
            f"that many processes per node (--nproc-per-node).")
    backend = "nccl" if use_cuda and dist.is_nccl_available() else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    eager = {"device_id": torch.device("cuda", local_rank)} if backend == "nccl" else {}
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **eager)
    except (RuntimeError, ValueError) as e:
        raise DistributedError(
            f"rank {rank}: could not join the process group at {where} within {timeout_s:g} s "
            f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}). Did all "
            f"{world} processes start, and can every node reach {where}? Multi-node runs need the same "
            f"--rdzv-endpoint on every node (see docs/DISTRIBUTED.md).") from e
    log.info("rank %d/%d joined the %s process group at %s", rank, world, backend, where)
    return DistInfo(rank, world, local_rank, backend, owns_group=True)


def shutdown(info: DistInfo) -> None:
    """Leaves the process group if ``info`` created it."""
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def launch_command(nproc: int, args: Sequence[str], *, command: str | None = "train") -> list[str]:
    """The ``torchrun`` command line that runs ``revnet COMMAND ARGS`` (``revnet ARGS`` with
    ``command=None``) on ``nproc`` processes.

    Uses torchrun's ``--standalone`` rendezvous (one node, a free local port).
    """
    # `python -m torch.distributed.run` is torchrun, with this very interpreter.
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "revnet", *([command] if command else []), *args]


def shard_fsdp(model: nn.Module, info: DistInfo) -> nn.Module:
    """FSDP2 per reversible block (each coupling of each sequence), then the root (stem, openers,
    head); ``model`` itself, sharded in place. One process: nothing to shard (``model`` as it is).

    The engine drives each sharded block (gather, rebuild, reduce-scatter: docs/DISTRIBUTED.md).
    FSDP2 takes contiguous parameters only, so convolution weights leave channels-last here
    (activations keep their layout)."""
    if not info.enabled:
        log.info("--fsdp has no effect in a single process")
        return model
    from torch.distributed.fsdp import fully_shard

    from ..engine import ReversibleSequence

    model.to(memory_format=torch.contiguous_format)
    for seq in [m for m in model.modules() if isinstance(m, ReversibleSequence)]:
        for block in seq:
            fully_shard(block)
    fully_shard(model)
    return model


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP2 shards ``model`` (its root is a ``fully_shard`` unit)."""
    fsdp = getattr(sys.modules.get("torch.distributed.fsdp"), "FSDPModule", None)
    return fsdp is not None and isinstance(model, fsdp)


def wrap_ddp(model: nn.Module, info: DistInfo, device: torch.device, *, sync_bn: bool = False) -> nn.Module:
    """DistributedDataParallel around ``model`` (with SyncBatchNorm if asked); ``model`` alone if one process.

    No ``find_unused_parameters``: the reversible engine returns every parameter's gradient
    from its backward, once, so DDP's buckets fill (and all-reduce) as backward proceeds.
    """
    if not info.enabled:
        if sync_bn:
            log.info("--sync-bn has no effect in a single process")
        return model
    if sync_bn:
        if device.type == "cpu":
            raise ValueError(
                "--sync-bn needs CUDA: PyTorch's SyncBatchNorm has no CPU kernels "
                "(torch.batch_norm_stats). On CPU train with --norm group (no cross-sample "
                "statistics), or keep per-process BatchNorm (drop --sync-bn).")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
