"""The data path alone (index gather, batched augmentation, normalisation) against the training step."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import torch

from ..models import create_model
from ..training.config import RECIPES, TrainConfig
from ..training.datasets import load_dataset
from ..training.loader import Loader
from ..training.precision import probe_step_time, resolve_amp
from .speed import train_step_rate

__all__ = ["data_path", "loader_throughput"]

def loader_throughput(loader: Loader, *, batches: int = 100, warmup: int = 5) -> dict[str, Any]:
    """Images per second that ``loader`` alone delivers: gather, augmentation and normalisation.

    Runs ``warmup`` batches untimed, then times ``batches`` batches (crossing epochs as needed),
    synchronising CUDA so that asynchronous kernels are counted. The training step is measured
    separately (:func:`revnet.bench.speed.train_step_rate`); ``revnet bench data`` prints the ratio.

    Returns:
        ``images_per_s``, ``seconds``, ``batches``, ``images`` and the loader's settings.
    """
    if batches < 1 or warmup < 0:
        raise ValueError(f"loader_throughput: need batches >= 1 and warmup >= 0, got {batches}, {warmup}.")
    if len(loader) == 0:
        raise ValueError("loader_throughput: the loader yields no batches.")

    def stream() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = 0
        while True:
            yield from loader.epoch(epoch)
            epoch += 1

    def sync() -> None:
        if loader.device.type == "cuda":
            torch.cuda.synchronize(loader.device)

    it = stream()
    for _ in range(warmup):
        next(it)
    sync()
    images, start = 0, time.perf_counter()
    for _ in range(batches):
        x, _y = next(it)
        images += x.shape[0]
    sync()
    seconds = time.perf_counter() - start
    return {"images_per_s": images / seconds, "seconds": seconds, "batches": batches, "images": images,
            "batch_size": loader.batch_size, "augment": loader.augment, "pad": loader.pad,
            "flip": loader.flip, "device": str(loader.device)}


def data_path(recipe: str = "fashion-mnist-long", *, dataset: str | None = None, data_dir: str | None = None,
              batch: int | None = None, batches: int = 200, repeats: int = 7, warmup: int = 2,
              device: str = "cpu") -> dict[str, Any]:
    """The loader of ``recipe`` (or ``dataset``) against its training step, images/s each.

    Both as ``revnet train --recipe RECIPE`` runs them: the loader with the recipe's
    augmentation (:func:`loader_throughput`), the step with its model, batch and precision
    on random data (:func:`revnet.bench.speed.train_step_rate`).
    """
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; known: {sorted(RECIPES)}.")
    cfg = {**TrainConfig().__dict__, **RECIPES[recipe]}
    name = dataset or cfg["dataset"]
    batch = batch or cfg["batch_size"]
    ds = load_dataset(name, "train", data_dir, **(cfg["synthetic"] if name == "synthetic" else {}))
    if cfg["amp"] == "auto":  # as revnet train decides it: by a probe of the step where flags do not tell
        net = create_model(cfg["model"], num_classes=ds.num_classes, in_chans=ds.in_chans).to(device)
        layout = torch.channels_last if cfg["channels_last"] else torch.contiguous_format
        net = net.to(memory_format=layout)
        x = torch.randn(batch, ds.in_chans, *ds.image_size, device=device).contiguous(memory_format=layout)
        probe = probe_step_time(net, x, lambda out: out.float().square().mean())
        cfg["amp"] = resolve_amp("auto", torch.device(device), probe).amp
    loader = Loader(ds, batch, train=True, device=device, pad=cfg["crop_pad"], flip=cfg["flip"])
    load = loader_throughput(loader, batches=batches)
    step = train_step_rate(cfg["model"], batch=batch, image_size=ds.image_size[0], in_chans=ds.in_chans,
                           amp=cfg["amp"], channels_last=cfg["channels_last"], repeats=repeats, warmup=warmup,
                           device=device)
    return {"config": {"recipe": recipe, "dataset": name, "batch": batch, "device": device,
                       "model": cfg["model"], "amp": cfg["amp"], "crop_pad": cfg["crop_pad"],
                       "flip": cfg["flip"], "threads": step["config"]["threads"]},
            "loader": load, "train_step": step, "ratio": load["images_per_s"] / step["images_per_s"]}
