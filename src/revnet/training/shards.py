"""Sharded checkpoints of an FSDP run, written by every rank with ``torch.distributed.checkpoint``.

A sharded checkpoint is two things beside each other in the run directory:

- ``last.pt`` (or ``best.pt``), a small torch file with everything but the tensors (step, RNG,
  engine switches, config) and ``"shards": "last-step0000400.dcp"``, the name of
- that folder, where each rank wrote its own shards of the weights and the optimizer state
  (``torch.distributed.checkpoint``'s file format: one ``__<rank>_0.distcp`` file per rank and a
  ``.metadata``). No rank ever holds the whole model.

The folder is complete before ``last.pt`` names it (the torch file is replaced atomically), and
folders that no checkpoint names any more are removed after, so an interruption at any moment
leaves ``last.pt`` and what it names intact. Resuming reads each rank's part back (on another
number of ranks too: the format reshards); ``revnet eval``, ``generate`` and ``--init`` read the
weights in one process (:func:`load_checkpoint`).
"""

from __future__ import annotations

import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

__all__ = ["SHARDS", "load_checkpoint", "read_shards", "remove_unnamed", "shards_dir"]

SHARDS = "shards"  # the key of a checkpoint file that names its folder of shards


def shards_dir(out: Path, name: str, step: int) -> Path:
    """The folder a checkpoint called ``name`` (``last.pt``) at ``step`` keeps its shards in."""
    return out / f"{Path(name).stem}-step{step:07d}.dcp"


def remove_unnamed(out: Path, name: str, keep: str) -> None:
    """Removes the shard folders of checkpoint ``name`` other than ``keep`` (older ones, or one left
    half-written by an interruption)."""
    pattern = re.compile(rf"{re.escape(Path(name).stem)}-step\d+\.dcp")
    for d in out.iterdir():
        if d.name != keep and pattern.fullmatch(d.name) and d.is_dir():
            shutil.rmtree(d, ignore_errors=True)


def read_shards(folder: Path, key: str = "model") -> dict[str, Any]:
    """Entry ``key`` of a folder of shards, whole, in this process (no process group needed)."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    if not (folder / ".metadata").is_file():
        raise FileNotFoundError(f"{folder} holds no complete sharded checkpoint (no .metadata); the "
                                f"checkpoint file that names it was copied without it?")
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        return _load_state_dict_from_keys(key, checkpoint_id=str(folder))[key]


def load_checkpoint(path: Path) -> Any:
    """``torch.load`` of a checkpoint file on the CPU; a sharded one gets its weights (``"model"``)
    read from the folder it names, so the result looks like an unsharded checkpoint's."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(state, dict) and state.get(SHARDS):
        state = {**state, "model": read_shards(path.parent / state[SHARDS])}
    return state
