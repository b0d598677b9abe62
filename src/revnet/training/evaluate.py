"""Test loss and accuracy (and bits per byte for a language model): of the model being trained,
and of a saved checkpoint."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..engine.modes import set_modes
from .config import TrainConfig
from .distributed import DistInfo
from .loader import Loader
from .precision import autocast
from .setup import build_run, prediction_loss, to_layout
from .shards import load_checkpoint
from .state import config_fields
from .text import TextLoader, bits_per_byte

__all__ = ["evaluate", "evaluate_checkpoint", "read_checkpoint"]


def evaluate(model: nn.Module, loader: Loader | TextLoader, config: TrainConfig, device: torch.device,
             info: DistInfo | None = None) -> dict:
    """Test loss and accuracy over the whole loader (no grad: reversibility costs nothing).

    For text (a :class:`~revnet.training.text.TextLoader`) every held-out byte is one prediction:
    ``test_loss`` is in nats per byte, ``test_accuracy`` the share of bytes predicted right, and
    ``test_bits_per_byte`` the loss in bits.

    Under DDP each rank evaluates its shard of the test set (``loader`` built with its rank)
    and the sums are all-reduced, so every rank returns the same figures. A compiled model
    evaluates eagerly: a few passes over the test set do not repay compiling the
    evaluation-mode graphs (one per batch shape).
    """
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    with torch.no_grad(), autocast(device, config.amp), torch.compiler.set_stance("force_eager"):
        for x, y in loader.epoch(0):
            logits = model(to_layout(x, config)).float()
            loss_sum += prediction_loss(logits, y, reduction="sum").item()
            correct += (logits.argmax(-1) == y).sum().item()
            count += y.numel()
    model.train()
    if info is not None:
        loss_sum, correct, count = info.sum([loss_sum, correct, count], device)
    result = {"test_loss": loss_sum / max(count, 1), "test_accuracy": correct / max(count, 1)}
    if isinstance(loader, TextLoader):
        result["test_bits_per_byte"] = bits_per_byte(result["test_loss"])
    return result


def evaluate_checkpoint(path: str | os.PathLike, *, data_dir: str | None = None,
                        device: str = "auto") -> dict[str, Any]:
    """Test accuracy (and bits per byte for text) of a checkpoint written by :func:`fit`
    (``last.pt`` or ``best.pt``)."""
    state = read_checkpoint(path, "eval")
    fields = config_fields(state["config"])
    fields.update(device=device, compile=None, **({"data_dir": data_dir} if data_dir else {}))
    run = build_run(TrainConfig(**fields), init_weights=False)  # the checkpoint's own weights
    run.model.load_state_dict(state["model"])
    set_modes(run.model, state.get("engine_modes", {}))
    return {"checkpoint": str(path), "step": state["step"], "dataset": run.config.dataset,
            **evaluate(run.model, run.test, run.config, run.device)}


def read_checkpoint(path: str | os.PathLike, command: str) -> dict[str, Any]:
    """The state a ``last.pt``/``best.pt`` holds, on the CPU; errors name ``command`` and the fix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{command}: no checkpoint at {path}.")
    try:
        state = load_checkpoint(path)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise ValueError(f"{command}: {path} is not a readable torch checkpoint ({type(e).__name__}: {e}); "
                         f"pass a last.pt or best.pt written by `revnet train`.") from e
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ValueError(f"{command}: {path} is not a revnet training checkpoint (no 'model'/'config').")
    return state
