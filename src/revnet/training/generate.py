"""Text from a language model's checkpoint: ``revnet generate RUN_DIR/best.pt --prompt "def "``."""

from __future__ import annotations

import os
from typing import Any

import torch

from ..engine.modes import set_modes
from .config import TrainConfig
from .evaluate import read_checkpoint
from .setup import build_model, resolve_device
from .state import config_fields
from .text import VOCAB_SIZE

__all__ = ["generate_text"]


def generate_text(path: str | os.PathLike, prompt: str, *, max_bytes: int = 300,
                  temperature: float = 0.8, top_k: int | None = None, seed: int = 0,
                  device: str = "cpu") -> dict[str, Any]:
    """A continuation of ``prompt`` by the byte-level language model of checkpoint ``path``.

    The prompt is encoded as UTF-8 bytes; ``max_bytes`` bytes are sampled
    (:meth:`revnet.models.gpt.RevGPT.generate`: ``temperature`` 0 always takes the likeliest
    byte) from a generator seeded with ``seed``, and decoded as UTF-8, an invalid sequence shown
    as U+FFFD.

    Returns:
        ``text`` (the continuation alone), ``prompt``, ``model``, ``step`` and ``checkpoint``.

    Raises:
        FileNotFoundError, ValueError: no checkpoint, not a revnet checkpoint, a checkpoint of an
            image model, a prompt longer than the model's context, or a bad setting.
    """
    if max_bytes < 0:
        raise ValueError(f"generate: --max-bytes must be >= 0, got {max_bytes}.")
    state = read_checkpoint(path, "generate")
    fields = config_fields(state["config"])
    if fields.get("dataset") != "text":
        raise ValueError(f"generate: {path} is a checkpoint of {fields.get('model')!r}, an image classifier "
                         f"trained on {fields.get('dataset')!r}; generate samples text from a language "
                         f"model. "
                         f"Train one with `revnet train --recipe text-lm` and pass its best.pt.")
    config = TrainConfig(**{**fields, "device": device, "compile": None})
    ids = list(prompt.encode("utf-8"))
    if not ids:
        raise ValueError("generate: --prompt is empty; give at least one character (e.g. --prompt 'def ').")
    if len(ids) > config.context_length:
        raise ValueError(f"generate: the prompt is {len(ids)} bytes and {fields['model']} sees "
                         f"{config.context_length} (its --context-length); shorten --prompt to at most "
                         f"{config.context_length} bytes.")
    dev = resolve_device(device)
    model = build_model(config, vocab_size=VOCAB_SIZE, context_length=config.context_length)
    model.load_state_dict(state["model"])
    set_modes(model, state.get("engine_modes", {}))
    model.to(dev)
    g = torch.Generator(dev).manual_seed(seed)
    out = model.generate(torch.tensor([ids], device=dev), max_bytes, temperature=temperature, top_k=top_k,
                         generator=g)
    text = bytes(out[0, len(ids):].tolist()).decode("utf-8", errors="replace")
    return {"text": text, "prompt": prompt, "model": fields["model"], "step": state["step"],
            "checkpoint": str(path)}
