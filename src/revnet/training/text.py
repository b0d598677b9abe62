"""Byte-level text data with nothing downloaded: a folder of text files, one byte stream per file.

The default corpus is the Python standard library's own top-level ``*.py`` files (present wherever
Python is); the files named in ``HELD_OUT`` form the validation split. Training windows are a pure
function of (seed, epoch, step), so a resumed run sees the batches it would have seen, on any
number of ranks. :class:`TextLoader` serves them to ``revnet train --dataset text`` with the
interface of :class:`revnet.training.loader.Loader`.
"""

from __future__ import annotations

import math
import pathlib
import sysconfig
from collections.abc import Iterator

import torch

from .datasets import mix_seed

__all__ = ["HELD_OUT", "TAG_TEXT", "VOCAB_SIZE", "TextLoader", "bits_per_byte", "default_text_dir",
           "eval_windows", "load_text", "random_tokens", "train_windows"]

TAG_TEXT = 5
VOCAB_SIZE = 256  # bytes
HELD_OUT = (
    "argparse.py", "ast.py", "base64.py", "bisect.py", "calendar.py", "cmd.py", "codecs.py", "copy.py",
    "csv.py", "difflib.py", "fnmatch.py", "fractions.py", "heapq.py", "keyword.py", "operator.py",
    "pprint.py", "random.py", "shlex.py", "string.py", "textwrap.py",
)


def default_text_dir() -> pathlib.Path:
    """The standard library's source folder."""
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def load_text(data_dir: str | pathlib.Path | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(train streams, held-out streams): uint8 tensors, one per file.

    Without ``data_dir`` the stdlib's top-level ``*.py`` files, ``HELD_OUT`` held out; with a folder,
    every file in it (sorted by name), every 10th held out (at least one when there are two or more).
    """
    if data_dir is None:
        folder, pattern, held = default_text_dir(), "*.py", set(HELD_OUT)
    else:
        folder, pattern, held = pathlib.Path(data_dir), "*", None
    if not folder.is_dir():
        raise FileNotFoundError(f"text data folder {folder} does not exist: pass --data-dir with a folder "
                                "of text files.")
    files = sorted(p for p in folder.glob(pattern) if p.is_file())
    streams: dict[str, torch.Tensor] = {}
    for p in files:
        try:
            data = p.read_bytes()
        except OSError:
            continue
        if data:
            streams[p.name] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    if not streams:
        raise ValueError(f"text data folder {folder} has no readable non-empty files: put text files in it "
                         "(or omit --data-dir for the standard library's source).")
    names = list(streams)
    if held is None:
        held = {n for i, n in enumerate(names) if i % 10 == 9} or ({names[-1]} if len(names) > 1 else set())
    train = [streams[n] for n in names if n not in held]
    test = [streams[n] for n in names if n in held]
    if not train:
        raise ValueError(f"text data folder {folder} has no training files (all held out).")
    return train, test


def train_windows(streams: list[torch.Tensor], batch: int, context: int, *, seed: int, epoch: int,
                  step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows (batch, context) int64 and next-byte targets, a pure function of (seed, epoch, step)."""
    usable = [s for s in streams if len(s) > context]
    if not usable:
        raise ValueError(f"no training file is longer than the context length {context}.")
    lengths = torch.tensor([len(s) - context for s in usable], dtype=torch.float64)
    g = torch.Generator().manual_seed(mix_seed(seed, TAG_TEXT, epoch, step))
    which = torch.multinomial(lengths, batch, replacement=True, generator=g)
    offsets = (torch.rand(batch, generator=g, dtype=torch.float64) * lengths[which]).long()
    rows = [usable[int(f)][int(o): int(o) + context + 1] for f, o in zip(which, offsets, strict=True)]
    chunk = torch.stack(rows).long()
    return chunk[:, :-1], chunk[:, 1:]


def eval_windows(streams: list[torch.Tensor], context: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Non-overlapping (1, n) windows over every held-out file: each byte after the first predicted once."""
    out = []
    for s in streams:
        s = s.long()
        for start in range(0, len(s) - 1, context):
            piece = s[start: start + context + 1]
            out.append((piece[None, :-1], piece[None, 1:]))
    return out


class TextLoader:
    """Batches of byte windows for training or evaluation, with :class:`~revnet.training.loader.Loader`'s
    interface (``len``, ``epoch(epoch, start)``, ``batch_size``, ``unit``, ``shape_info()``).

    Training (``train=True``): an "epoch" is as many steps as the training bytes make windows of
    ``batch_size x world_size x context``; step ``k``'s global batch of random windows is
    :func:`train_windows` of ``(seed, epoch, k)`` and rank ``r`` trains on its slice ``r``.
    Evaluation: every held-out byte after a file's first is predicted once, from the windows of
    :func:`eval_windows`; full windows go in batches of ``batch_size``, the ranks taking every
    ``world_size``-th batch.
    """

    unit = "tokens"  # what the training speed counts

    def __init__(self, streams: list[torch.Tensor], batch_size: int, context: int, *, train: bool,
                 device: str | torch.device = "cpu", seed: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:
        if batch_size < 1 or context < 1:
            raise ValueError(f"TextLoader: batch_size ({batch_size}) and context ({context}) must be >= 1.")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"TextLoader: need 0 <= rank < world_size, got {rank} and {world_size}.")
        self.streams, self.batch_size, self.context, self.train = streams, batch_size, context, train
        self.device, self.seed, self.rank, self.world_size = torch.device(device), seed, rank, world_size
        if train:
            longest = max((len(s) for s in streams), default=0)
            if longest <= context:
                raise ValueError(f"TextLoader: no training file is longer than the context length {context} "
                                 f"(the longest has {longest} bytes); pass a shorter --context-length or "
                                 f"longer files.")
            self._batches: list[tuple[torch.Tensor, torch.Tensor]] = []
        else:
            self._batches = self._eval_batches()

    def _eval_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        windows = eval_windows(self.streams, self.context)
        full = [w for w in windows if w[0].shape[1] == self.context]
        batches = [(torch.cat([x for x, _ in full[i:i + self.batch_size]]),
                    torch.cat([y for _, y in full[i:i + self.batch_size]]))
                   for i in range(0, len(full), self.batch_size)]
        batches += [w for w in windows if w[0].shape[1] != self.context]  # each file's last, shorter window
        return batches[self.rank::self.world_size]

    def __len__(self) -> int:
        """Steps per epoch (training), or this rank's evaluation batches."""
        if not self.train:
            return len(self._batches)
        total = sum(len(s) for s in self.streams)
        return max(1, total // (self.batch_size * self.world_size * self.context))

    def shape_info(self) -> dict[str, int]:
        """What a model and a random batch of this data need: the vocabulary and the context length."""
        return {"vocab_size": VOCAB_SIZE, "context_length": self.context}

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's batches ``(tokens, next tokens)``, (B, T) int64 each, from batch ``start`` on."""
        if not 0 <= start <= len(self):
            raise ValueError(f"TextLoader.epoch: start must be in [0, {len(self)}], got {start}.")
        if not self.train:
            return ((x.to(self.device), y.to(self.device)) for x, y in self._batches[start:])
        return self._train_batches(epoch, start)

    def _train_batches(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        b = self.batch_size
        mine = slice(self.rank * b, (self.rank + 1) * b)
        for step in range(start, len(self)):
            x, y = train_windows(self.streams, b * self.world_size, self.context, seed=self.seed, epoch=epoch,
                                 step=step)
            yield x[mine].to(self.device), y[mine].to(self.device)


def random_tokens(batch: int, context: int, generator: torch.Generator,
                  device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """A random batch of the data's shape (for probes and memory counts): tokens and targets (B, T)."""
    x = torch.randint(0, VOCAB_SIZE, (batch, context), generator=generator, device=device)
    y = torch.randint(0, VOCAB_SIZE, (batch, context), generator=generator, device=device)
    return x, y


def bits_per_byte(nats_per_byte: float) -> float:
    """A mean cross-entropy in nats per byte, in bits per byte."""
    return nats_per_byte / math.log(2)
