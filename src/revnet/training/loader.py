"""Batches of an in-memory data set on the device, augmented there in one go per batch.

The paper's augmentation (random crop with zero padding 4 and horizontal flip, Sec. 5.1)
runs on whole batches on the training device, with randomness derived from
``(seed, epoch, step)``, so a run resumed mid-epoch sees exactly the batches it would have
seen, on any number of ranks.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from .datasets import TAG_AUG, TAG_PERM, ArrayDataset, mix_seed

__all__ = ["Loader", "augment", "normalize"]


def normalize(
    images: torch.Tensor,
    mean: Sequence[float] | torch.Tensor,
    std: Sequence[float] | torch.Tensor,
) -> torch.Tensor:
    """uint8 images (..., C, H, W) -> float32 ``(images / 255 - mean) / std`` per channel."""
    if images.dtype != torch.uint8:
        raise TypeError(f"normalize expects uint8 images, got {images.dtype}.")
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    return images.to(torch.float32).div_(255).sub_(mean_t).div_(std_t)


def _draw_augment(
    n: int, pad: int, flip: bool, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Crop offsets (n,) in [0, 2*pad] for rows and columns, and a flip mask (n,) or None."""
    device = generator.device
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=device)
    mirror = torch.randint(0, 2, (n,), generator=generator, device=device).bool() if flip else None
    return dy, dx, mirror


def _crop_flip(
    images: torch.Tensor,
    dy: torch.Tensor,
    dx: torch.Tensor,
    mirror: torch.Tensor | None,
    pad: int,
) -> torch.Tensor:
    """Crops window (dy, dx) of each zero-padded image and mirrors it where `mirror` is set."""
    B, C, H, W = images.shape
    dev = images.device
    dy, dx = dy.to(dev), dx.to(dev)
    padded = F.pad(images, (pad, pad, pad, pad)) if pad else images  # (B, C, H+2p, W+2p)
    Wp = W + 2 * pad
    rows = dy[:, None] + torch.arange(H, device=dev)  # (B, H)
    cols_idx = torch.arange(W, device=dev)
    if mirror is not None:
        # A mirrored crop reads its window right to left.
        cols_idx = torch.where(mirror.to(dev)[:, None], W - 1 - cols_idx, cols_idx)  # (B, W)
    cols = dx[:, None] + cols_idx  # (B, W)
    flat = (rows[:, :, None] * Wp + cols[:, None, :]).view(B, 1, H * W)  # (B, 1, H*W)
    out = padded.reshape(B, C, -1).gather(2, flat.expand(B, C, H * W))  # (B, C, H*W)
    return out.view(B, C, H, W)


def augment(
    images: torch.Tensor, *, pad: int, flip: bool, generator: torch.Generator
) -> torch.Tensor:
    """Random crop with zero padding ``pad`` and random horizontal flip, for a whole batch.

    Args:
        images: (B, C, H, W), any dtype, on any device.
        pad: zero padding on each side; the crop offset is uniform in [0, 2*pad] per axis.
        flip: mirror each image with probability 1/2.
        generator: source of randomness (on any device; the draws move to ``images.device``).

    Returns:
        A new (B, C, H, W) tensor of the same dtype and device.
    """
    if images.dim() != 4:
        raise ValueError(f"augment expects (B, C, H, W) images, got {tuple(images.shape)}.")
    if pad < 0:
        raise ValueError(f"augment: pad must be >= 0, got {pad}.")
    dy, dx, mirror = _draw_augment(images.shape[0], pad, flip, generator)
    return _crop_flip(images, dy, dx, mirror, pad)


# ---------------------------------------------------------------------------------------------
# Loader


class Loader:
    """Batches an ArrayDataset on a device, with batched augmentation (no per-sample Python loop).

    Order: for training, a permutation per epoch drawn from ``(seed, epoch)``, identical on every
    rank; otherwise sequential. Each global step consumes ``batch_size * world_size`` samples of
    that order and rank ``r`` takes the slice ``[r * batch_size, (r + 1) * batch_size)`` of them,
    so ``batch_size`` is the per-rank batch. Augmentation for a global step is drawn from
    ``(seed, epoch, step)`` for the whole global batch and then sliced, so a sample's crop and flip
    depend neither on the number of ranks nor on which batches were produced before.

    With ``drop_last=False`` the last global batch may be short, and some ranks may then have one
    batch fewer than others (fine for evaluation, not for DDP training).

    Args:
        dataset: the split to serve; its uint8 images are copied to ``device`` once.
        batch_size: samples per batch on each rank.
        train: shuffle every epoch (and default ``augment`` and ``drop_last`` to True).
        augment: random crop (zero padding ``pad``) and, if ``flip``, horizontal flip.
        device: where batches are built and returned.
        seed: seeds the permutations and the augmentation.
        drop_last: drop the last global batch if it is short.
        rank: this process's rank in ``[0, world_size)``.
        world_size: number of ranks sharing each global batch.
        pad: zero padding of the random crop (the paper uses 4 on CIFAR).
        flip: include the random horizontal flip in the augmentation.
    """

    def __init__(
        self,
        dataset: ArrayDataset,
        batch_size: int,
        *,
        train: bool,
        augment: bool | None = None,
        device: str | torch.device = "cpu",
        seed: int = 0,
        drop_last: bool | None = None,
        rank: int = 0,
        world_size: int = 1,
        pad: int = 4,
        flip: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"Loader: batch_size must be >= 1, got {batch_size}.")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"Loader: need 0 <= rank < world_size, got {rank} and {world_size}.")
        if pad < 0:
            raise ValueError(f"Loader: pad must be >= 0, got {pad}.")
        self.dataset = dataset
        self.batch_size = batch_size
        self.train = train
        self.augment = train if augment is None else augment
        self.drop_last = train if drop_last is None else drop_last
        self.device = torch.device(device)
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.pad = pad
        self.flip = flip
        if len(self) == 0 and len(dataset) > 0:
            raise ValueError(
                f"Loader: {len(dataset)} samples make no full global batch of "
                f"{batch_size} x {world_size} ranks; use a smaller batch or drop_last=False."
            )
        self._images = dataset.images.to(self.device)  # (N, C, H, W) uint8
        self._labels = dataset.labels.to(self.device)  # (N,) int64
        self._mean = torch.tensor(dataset.mean, dtype=torch.float32, device=self.device)
        self._std = torch.tensor(dataset.std, dtype=torch.float32, device=self.device)

    unit = "images"  # what the training speed counts

    def shape_info(self) -> dict[str, int]:
        """What a model and a random batch of this data need: classes, channels, image side."""
        return {"num_classes": self.dataset.num_classes, "in_chans": self.dataset.in_chans,
                "image_size": self.dataset.image_size[0]}

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        n, b = len(self.dataset), self.batch_size
        full, rest = divmod(n, b * self.world_size)
        if self.drop_last:
            return full
        return full + (1 if rest > self.rank * b else 0)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yields this rank's batches ``(x, y)`` of one epoch, from batch index ``start`` on.

        ``x`` is (B, C, H, W) float32 normalised with the data set's mean/std, ``y`` (B,) int64,
        both on the loader's device. Skipped batches cost nothing, and batch ``k`` is the same
        whatever ``start`` is (for exact resumption mid-epoch).
        """
        if epoch < 0:
            raise ValueError(f"Loader.epoch: epoch must be >= 0, got {epoch}.")
        if not 0 <= start <= len(self):
            raise ValueError(f"Loader.epoch: start must be in [0, {len(self)}], got {start}.")
        return self._batches(epoch, start)

    def _batches(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n, b = len(self.dataset), self.batch_size
        step_size = b * self.world_size
        order = None
        if self.train:
            g = torch.Generator().manual_seed(mix_seed(self.seed, TAG_PERM, epoch))
            order = torch.randperm(n, generator=g).to(self.device)  # (N,)
        augmenting = self.augment and (self.pad > 0 or self.flip)
        for step in range(start, len(self)):
            first = step * step_size  # of this global batch, in `order`
            lo = first + self.rank * b
            hi = min(lo + b, n)
            if order is None:
                x, y = self._images[lo:hi], self._labels[lo:hi]
            else:
                idx = order[lo:hi]
                x, y = self._images.index_select(0, idx), self._labels.index_select(0, idx)
            if augmenting:
                g = torch.Generator().manual_seed(mix_seed(self.seed, TAG_AUG, epoch, step))
                # Drawn for the whole global batch, then sliced to this rank's part.
                dy, dx, mirror = _draw_augment(min(step_size, n - first), self.pad, self.flip, g)
                part = slice(lo - first, hi - first)
                x = _crop_flip(
                    x, dy[part], dx[part], None if mirror is None else mirror[part], self.pad
                )
            yield normalize(x, self._mean, self._std), y
