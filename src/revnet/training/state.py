"""Checkpoints: what ``last.pt`` and ``best.pt`` hold, written atomically, and resuming from them.

The learning rate is a pure function of the step, the data order and augmentation are
pure functions of ``(seed, epoch, step)``, and the RNG states and engine switches are
saved, so a resumed run ends with the same weights as an uninterrupted one. An FSDP run writes
sharded checkpoints by default (:mod:`.shards`): each rank its own part, no rank the whole model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..engine.modes import get_modes, set_modes
from ..memory import OptimizerInBackward
from .config import TrainConfig
from .distributed import is_sharded
from .setup import Run
from .shards import SHARDS, remove_unnamed, shards_dir

__all__ = ["checkpoint_state", "config_fields", "restore", "save_atomic", "save_checkpoint", "write_json"]


def save_atomic(obj: Any, path: Path) -> None:
    """Writes to a temporary file beside ``path``, then renames: never a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_json(obj: Any, path: Path) -> None:
    """``obj`` as indented JSON, written atomically like :func:`save_atomic`."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _full_options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def checkpoint_state(run: Run) -> dict[str, Any]:
    """What ``last.pt``/``best.pt`` hold: weights, optimizer, scaler, step, RNG, engine switches, config.

    A model sharded with FSDP gives its full (unsharded) weights and optimizer state, gathered with
    ``torch.distributed.checkpoint``'s state-dict functions onto rank 0: the same file an unsharded
    run writes (``--checkpoint full``). Collective: every rank calls it (rank 0 writes)."""
    if is_sharded(run.model):
        model, optimizer = _sharded_tensors(run, full=True)
    else:
        model, optimizer = run.model.state_dict(), run.optimizer.state_dict()
    return {"model": model, "optimizer": optimizer, **_rest(run)}


def _rest(run: Run) -> dict[str, Any]:
    """A checkpoint's contents but the weights and the optimizer's state."""
    return {
        "scaler": run.scaler.state_dict() if run.scaler else None,
        "step": run.step,
        "best": run.best,
        "rng": _rng_state(run.device),
        "engine_modes": get_modes(run.model),
        "config": asdict(run.config),
        "world_size": run.dist.world_size,
        "torch": torch.__version__,
    }


def _sharded_tensors(run: Run, *, full: bool = False) -> tuple[dict[str, Any], Any]:
    """An FSDP model's weights and optimizer state through ``torch.distributed.checkpoint``'s
    state-dict functions: this rank's shards, or (``full``) the whole state gathered on rank 0."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    options = _full_options() if full else None
    model = get_model_state_dict(run.model, options=options)
    if isinstance(run.optimizer, OptimizerInBackward):  # one optimizer per sharded parameter
        # the shape of OptimizerInBackward.state_dict (keyed by position: a dict, which DCP flattens)
        optimizer = {"optimizers": {str(i): get_optimizer_state_dict(run.model, o, options=options)
                                    for i, o in enumerate(run.optimizer.optimizers)},
                     "steps": run.optimizer.steps}
    else:
        optimizer = get_optimizer_state_dict(run.model, run.optimizer, options=options)
    return model, optimizer


def _set_sharded_tensors(run: Run, model: dict[str, Any], optimizer: Any, *, full: bool) -> None:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    # full: each rank holds the whole state and takes its shard
    options = StateDictOptions(full_state_dict=True) if full else None
    set_model_state_dict(run.model, model, options=options)
    if isinstance(run.optimizer, OptimizerInBackward):
        saved = optimizer["optimizers"]  # a list in files of before the sharded checkpoints
        for o, s in zip(run.optimizer.optimizers, saved.values() if isinstance(saved, dict) else saved,
                        strict=True):
            set_optimizer_state_dict(run.model, o, s, options=options)
        run.optimizer.steps = optimizer.get("steps", 0)
        # loading replaced the optimizers' group dicts: the wrapper's must be theirs again, or the
        # learning-rate schedule would set a copy
        run.optimizer.param_groups = [g for o in run.optimizer.optimizers for g in o.param_groups]
    else:
        set_optimizer_state_dict(run.model, run.optimizer, optimizer, options=options)


def save_checkpoint(run: Run, name: str) -> None:
    """Writes checkpoint ``name`` (``last.pt``, ``best.pt``) into the run directory. Collective
    under FSDP (every rank calls it): a sharded checkpoint is written by every rank into its own
    folder, then rank 0 writes the file that names it (:mod:`.shards`); a full one is gathered to
    rank 0, which writes it. Otherwise rank 0 alone writes."""
    if not (run.dist.is_main or is_sharded(run.model)):
        return
    if not run.config.sharded_checkpoints:
        state = checkpoint_state(run)
        if run.dist.is_main:
            save_atomic(state, run.out / name)
        return
    import torch.distributed.checkpoint as dcp

    folder = shards_dir(run.out, name, run.step)
    if run.dist.is_main and folder.exists():  # half-written by an interrupted run that reached this step
        shutil.rmtree(folder)
    run.dist.barrier()
    model, optimizer = _sharded_tensors(run)
    dcp.save({"model": model, "optimizer": optimizer}, checkpoint_id=str(folder))
    if run.dist.is_main:
        save_atomic({"model": None, "optimizer": None, SHARDS: folder.name, **_rest(run)}, run.out / name)
        remove_unnamed(run.out, name, keep=folder.name)


# How a run executes, not what it computes (compiled kernels round like eager ones, not bit for bit).
_RESUME_MAY_DIFFER = {"out", "device", "data_dir", "dist_timeout", "amp_reason", "compile", "memory_budget",
                      "checkpoint", "nproc_reason"}


def _check_resumable(state: dict[str, Any], run: Run, path: Path) -> None:
    saved = TrainConfig(**config_fields(state["config"]))
    diff = {k: (getattr(saved, k), getattr(run.config, k)) for k in asdict(saved)
            if k not in _RESUME_MAY_DIFFER and getattr(saved, k) != getattr(run.config, k)}
    if diff:
        lines = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"resume: {path} was written with a different configuration ({lines}); "
                         f"resume with the same settings or start a new --out.")
    world = state.get("world_size", 1)
    if run.config.lr_scaling == "linear" and world != run.dist.world_size:
        raise ValueError(f"resume: {path} was trained on {world} processes with --lr-scaling linear "
                         f"(lr x {world}); resume on {world} processes too, or the learning rate "
                         f"would jump to x {run.dist.world_size}.")


def restore(run: Run, path: Path) -> None:
    """Loads ``path`` on rank 0 and hands it to every rank (no shared file system needed)."""
    state: dict[str, Any] | None = None
    error: BaseException | None = None
    if run.dist.is_main:
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
            _check_resumable(state, run, path)
        except (OSError, ValueError, RuntimeError) as e:
            error = e
    run.dist.raise_together(error)
    state = run.dist.broadcast(state)
    if state.get(SHARDS):
        import torch.distributed.checkpoint as dcp

        model, optimizer = _sharded_tensors(run)  # this rank's parts, filled from the folder
        target = {"model": model, "optimizer": optimizer}
        dcp.load(target, checkpoint_id=str(path.parent / state[SHARDS]))
        _set_sharded_tensors(run, target["model"], target["optimizer"], full=False)
    elif is_sharded(run.model):
        _set_sharded_tensors(run, state["model"], state["optimizer"], full=True)
    else:
        run.model.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
    if run.scaler is not None and state["scaler"] is not None:
        run.scaler.load_state_dict(state["scaler"])
    run.step, run.best = state["step"], state["best"]
    _set_rng_state(state["rng"], run.device)
    set_modes(run.model, state.get("engine_modes", {}))  # older checkpoints lack it


def config_fields(d: dict[str, Any]) -> dict[str, Any]:
    """A saved config dict back to TrainConfig arguments (JSON turns tuples into lists)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    out = {k: v for k, v in d.items() if k in names}
    if "milestones" in out:
        out["milestones"] = tuple(out["milestones"])
    return out
