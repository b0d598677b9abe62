"""Data sets as uint8 tensors in memory, read from local files.

Everything is read from local files (nothing is downloaded):

* Fashion-MNIST from its four IDX files, gzipped or not; Debian's package
  ``dataset-fashion-mnist`` puts them in ``/usr/share/datasets/fashion-mnist``.
* CIFAR-10 / CIFAR-100 from the standard python-pickle folders ``cifar-10-batches-py`` and
  ``cifar-100-python`` (what ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz`` extract to).
* ``synthetic``: class templates plus noise made from a seed, for tests and smoke runs.

A whole data set fits in memory as uint8 (CIFAR-10: 150 MB); :class:`revnet.training.loader.Loader`
batches and augments it on the device. numpy, which parses the files (and seeds the data order),
is imported where it is used, so that the package itself imports with torch alone.
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import pathlib
import pickle
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "DATASETS",
    "ArrayDataset",
    "default_data_dir",
    "load_dataset",
    "mix_seed",
]

logger = logging.getLogger(__name__)

DATASETS: tuple[str, ...] = ("fashion-mnist", "cifar10", "cifar100", "synthetic")

# Published per-channel statistics of the train splits, in [0, 1] pixel units.
_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
_SPLITS = ("train", "test")
_FASHION_SYSTEM_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_FASHION_HELP = (
    "Install them with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu; puts them in "
    f"{_FASHION_SYSTEM_DIR}), or pass --data-dir / set REVNET_DATA to a folder holding the four "
    "IDX files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
    "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz; gzipped or not)."
)


@dataclass(frozen=True)
class _CifarSpec:
    title: str  # for messages
    folder: str  # what the archive extracts to
    archive: str  # the standard archive's file name
    files: dict[str, tuple[str, ...]]  # split -> pickle files inside `folder`
    label_key: bytes  # key of the labels in each pickled dict
    num_classes: int


_CIFAR: dict[str, _CifarSpec] = {
    "cifar10": _CifarSpec(
        title="CIFAR-10",
        folder="cifar-10-batches-py",
        archive="cifar-10-python.tar.gz",
        files={"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
        label_key=b"labels",
        num_classes=10,
    ),
    "cifar100": _CifarSpec(
        title="CIFAR-100",
        folder="cifar-100-python",
        archive="cifar-100-python.tar.gz",
        files={"train": ("train",), "test": ("test",)},
        label_key=b"fine_labels",
        num_classes=100,
    ),
}

# Domain tags keep the seeds of different random streams apart (see `mix_seed`).
TAG_PERM, TAG_AUG, TAG_TEMPLATES, TAG_SAMPLES = 1, 2, 3, 4


@dataclass(frozen=True, eq=False)  # eq=False: comparing tensors with `==` is not a bool
class ArrayDataset:
    """A whole split in memory.

    Attributes:
        images: (N, C, H, W) uint8, contiguous.
        labels: (N,) int64 class indices in [0, num_classes).
        num_classes: number of classes.
        mean: per-channel mean in [0, 1] pixel units, for :func:`normalize`.
        std: per-channel standard deviation, same units.
        name: data set name, one of :data:`DATASETS`.
    """

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                f"ArrayDataset: images must be (N, C, H, W) uint8, got {tuple(self.images.shape)} "
                f"{self.images.dtype}."
            )
        if self.labels.dtype != torch.int64 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(
                f"ArrayDataset: labels must be ({self.images.shape[0]},) int64, got "
                f"{tuple(self.labels.shape)} {self.labels.dtype}."
            )
        if not len(self.mean) == len(self.std) == self.images.shape[1]:
            raise ValueError(
                f"ArrayDataset: mean and std need one value per channel ({self.images.shape[1]}), "
                f"got {len(self.mean)} and {len(self.std)}."
            )
        # Frozen: fields can only be normalised through object.__setattr__.
        object.__setattr__(self, "images", self.images.contiguous())
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))

    @property
    def in_chans(self) -> int:
        """Channels C of the images."""
        return self.images.shape[1]

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the images."""
        return self.images.shape[2], self.images.shape[3]

    def __len__(self) -> int:
        return self.images.shape[0]

    def __repr__(self) -> str:
        # The default repr would print the tensors.
        return (
            f"ArrayDataset(name={self.name!r}, n={len(self)}, "
            f"shape={tuple(self.images.shape[1:])}, num_classes={self.num_classes})"
        )


# ---------------------------------------------------------------------------------------------
# Locating and loading


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; expected one of: {', '.join(DATASETS)}.")


def default_data_dir(name: str) -> pathlib.Path:
    """Folder that :func:`load_dataset` reads ``name`` from when no ``data_dir`` is given.

    ``$REVNET_DATA`` if set (one folder for all data sets: it holds the Fashion-MNIST IDX files,
    directly or in a ``fashion-mnist`` subfolder, and the extracted CIFAR folders). Otherwise
    Fashion-MNIST is looked for where Debian's ``dataset-fashion-mnist`` installs it
    (``/usr/share/datasets/fashion-mnist``), and everything else in ``$XDG_CACHE_HOME/revnet``
    (default ``~/.cache/revnet``). ``synthetic`` reads no files; its entry is only nominal.
    """
    _check_name(name)
    env = os.environ.get("REVNET_DATA")
    if env:
        return pathlib.Path(env).expanduser()
    if name == "fashion-mnist":
        return _FASHION_SYSTEM_DIR
    cache = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return pathlib.Path(cache).expanduser() / "revnet"


def load_dataset(
    name: str,
    split: str = "train",
    data_dir: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> ArrayDataset:
    """Loads one split of a data set into memory.

    Args:
        name: one of :data:`DATASETS`.
        split: ``"train"`` or ``"test"``.
        data_dir: folder to read from; default :func:`default_data_dir`. For CIFAR it may be the
            extracted folder itself (``cifar-10-batches-py``) or its parent.
        **kwargs: only for ``synthetic``: ``num_samples`` (512 train / 256 test),
            ``image_size`` (32), ``channels`` (3), ``num_classes`` (10), ``seed`` (0).

    Raises:
        FileNotFoundError: the files are missing; the message says where it looked and how to
            get them.
        ValueError: unknown name or split, or a file is truncated or not in the expected format.
    """
    _check_name(name)
    if split not in _SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of: {', '.join(_SPLITS)}.")
    if name == "synthetic":
        return _synthetic(split, **kwargs)
    if kwargs:
        raise TypeError(f"load_dataset({name!r}) takes no options, got: {', '.join(kwargs)}.")
    root = pathlib.Path(data_dir).expanduser() if data_dir is not None else default_data_dir(name)
    if name == "fashion-mnist":
        images, labels, folder = _load_fashion(root, split)
        num_classes = 10
    else:
        spec = _CIFAR[name]
        images, labels, folder = _load_cifar(spec, root, split)
        num_classes = spec.num_classes
    logger.info("loaded %s %s: %d images from %s", name, split, len(labels), folder)
    mean, std = _STATS[name]
    return ArrayDataset(
        images=torch.from_numpy(images),
        labels=torch.from_numpy(labels).to(torch.int64),
        num_classes=num_classes,
        mean=mean,
        std=std,
        name=name,
    )


def _check_labels(labels: np.ndarray, num_classes: int, path: pathlib.Path) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"{path}: labels range over [{labels.min()}, {labels.max()}], outside the "
            f"{num_classes} classes [0, {num_classes - 1}]."
        )


# --- Fashion-MNIST (IDX files) ---


def _load_fashion(root: pathlib.Path, split: str) -> tuple[np.ndarray, np.ndarray, pathlib.Path]:
    """Returns images (N, 1, H, W) uint8, labels (N,) and the folder they came from."""
    bases = _FASHION_FILES[split]
    # REVNET_DATA is shared by all data sets, so the files may sit in a subfolder.
    folders = [root, root / "fashion-mnist"]
    for folder in folders:
        paths = [_find_idx(folder, base) for base in bases]
        if all(p is not None for p in paths):
            break
    else:
        missing = [b for b in bases if _find_idx(root, b) is None]
        where = (
            f"{root} (folder does not exist)"
            if not root.is_dir()
            else f"{root} (nor in {folders[1]})"
        )
        raise FileNotFoundError(
            f"Fashion-MNIST {split} split not found: missing "
            f"{', '.join(b + '[.gz]' for b in missing)} in {where}. {_FASHION_HELP}"
        )
    images_path, labels_path = paths
    try:
        images = _read_idx(images_path, ndim=3)  # (N, H, W)
        labels = _read_idx(labels_path, ndim=1)  # (N,)
        if images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"Fashion-MNIST: {images_path} holds {images.shape[0]} images but {labels_path} "
                f"holds {labels.shape[0]} labels."
            )
        _check_labels(labels, 10, labels_path)
    except ValueError as e:
        raise ValueError(
            f"{e} Get intact files with `apt-get install --reinstall dataset-fashion-mnist` "
            f"(Debian/Ubuntu; {_FASHION_SYSTEM_DIR}), or point --data-dir / REVNET_DATA at a "
            "folder holding the four Fashion-MNIST IDX files."
        ) from e
    return images[:, None], labels, folder


def _find_idx(folder: pathlib.Path, base: str) -> pathlib.Path | None:
    for candidate in (folder / f"{base}.gz", folder / base):
        if candidate.is_file():
            return candidate
    return None


def _read_idx(path: pathlib.Path, ndim: int) -> np.ndarray:
    """Reads an unsigned-byte IDX file (gzipped or not) with `ndim` dimensions."""
    import numpy as np

    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic; IDX files start with two zero bytes instead
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{path}: corrupt or truncated gzip data ({e}).") from e
    if len(raw) < 4 or raw[:2] != b"\x00\x00":
        raise ValueError(
            f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'}; expected "
            f"0000 followed by type code 08 and {ndim} dimension(s))."
        )
    if raw[2] != 0x08:
        raise ValueError(f"{path}: IDX type code 0x{raw[2]:02x}; expected 0x08 (unsigned byte).")
    if raw[3] != ndim:
        raise ValueError(f"{path}: IDX file has {raw[3]} dimension(s); expected {ndim}.")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes).")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = math.prod(shape)
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: header declares shape {shape} ({expected} bytes of data) but the file holds "
            f"{len(raw) - header}; the file is truncated or corrupt."
        )
    # Copy: np.frombuffer over `bytes` is read-only, and torch wants writable memory.
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()


# --- CIFAR (python pickles) ---


def _load_cifar(
    spec: _CifarSpec, root: pathlib.Path, split: str
) -> tuple[np.ndarray, np.ndarray, pathlib.Path]:
    """Returns images (N, 3, 32, 32) uint8, labels (N,) and the folder they came from."""
    import numpy as np

    names = spec.files[split]
    # Accept both the parent of the extracted folder and the folder itself.
    folder = root / spec.folder if (root / spec.folder).is_dir() else root
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        if not root.is_dir():
            where = f"{root} (folder does not exist)"
        elif folder == root:
            where = f"{root / spec.folder} or directly in {root}"
        else:
            where = str(folder)
        hint = ""
        if (root / spec.archive).is_file():
            hint = f" {root / spec.archive} is there but not extracted."
        raise FileNotFoundError(
            f"{spec.title} {split} split not found: missing {', '.join(missing)} in {where}."
            f"{hint} Extract the standard archive {spec.archive} into the data folder "
            f"(`tar -xzf {spec.archive} -C DATA_DIR`, which creates DATA_DIR/{spec.folder}), "
            "then pass --data-dir DATA_DIR or set REVNET_DATA=DATA_DIR."
        )
    images, labels = [], []
    for n in names:
        try:
            x, y = _read_cifar_batch(folder / n, spec)
        except ValueError as e:
            raise ValueError(
                f"{e} Replace it: extract the standard archive {spec.archive} again "
                f"(`tar -xzf {spec.archive} -C DATA_DIR`)."
            ) from e
        images.append(x)
        labels.append(y)
    return np.concatenate(images), np.concatenate(labels), folder


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that only rebuilds numpy arrays: a CIFAR file cannot run arbitrary code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol 2 stores bytes when written by python 3
    }

    def find_class(self, module: str, name: str) -> Any:
        canonical = module.replace("numpy._core", "numpy.core", 1)
        if (canonical, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        import numpy as np

        # numpy 2 renamed numpy.core to numpy._core; the CIFAR files were written with the old name.
        core = "numpy._core" if int(np.__version__.split(".")[0]) >= 2 else "numpy.core"
        return super().find_class(canonical.replace("numpy.core", core, 1), name)


def _read_cifar_batch(path: pathlib.Path, spec: _CifarSpec) -> tuple[np.ndarray, np.ndarray]:
    """Reads one pickled batch: images (N, 3, 32, 32) uint8 and labels (N,)."""
    import numpy as np

    with path.open("rb") as f:
        try:
            # encoding="bytes": the files are python 2 pickles whose str keys become bytes.
            batch = _ArrayUnpickler(f, encoding="bytes").load()
        except Exception as e:  # truncated or foreign pickles fail in many ways
            raise ValueError(
                f"{path}: not a readable {spec.title} pickle ({type(e).__name__}: {e})."
            ) from e
    label_key = spec.label_key
    if not isinstance(batch, dict):
        raise ValueError(
            f"{path}: expected a pickled dict with keys b'data' and {label_key!r}, got "
            f"{type(batch).__name__}."
        )

    def get(key: bytes) -> Any:
        # Files re-pickled under python 3 may have str keys.
        for k in (key, key.decode()):
            if k in batch:
                return batch[k]
        raise ValueError(
            f"{path}: the pickled dict has no {key!r} entry (keys: "
            f"{', '.join(repr(k) for k in batch)}); expected b'data' and {label_key!r}."
        )

    data = np.asarray(get(b"data"))
    labels = np.asarray(get(label_key))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(
            f"{path}: b'data' must be (N, 3072) uint8 (32x32 RGB, channel-major rows), got "
            f"{data.shape} {data.dtype}."
        )
    if labels.ndim != 1 or not (labels.size == 0 or np.issubdtype(labels.dtype, np.integer)):
        raise ValueError(
            f"{path}: {label_key!r} must be a list of integers, got {labels.shape} {labels.dtype}."
        )
    if labels.shape[0] != data.shape[0]:
        raise ValueError(
            f"{path}: {data.shape[0]} images but {labels.shape[0]} labels in {label_key!r}."
        )
    _check_labels(labels, spec.num_classes, path)
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


# --- synthetic ---


def mix_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from a tuple of ints (no collisions like seed+epoch would have)."""
    import numpy as np  # SeedSequence: every data order and augmentation so far was drawn from it

    state = np.random.SeedSequence([v % 2**64 for v in values]).generate_state(2, np.uint32)
    return (int(state[1]) << 31) ^ int(state[0])


def _synthetic(
    split: str,
    *,
    num_samples: int | None = None,
    image_size: int = 32,
    channels: int = 3,
    num_classes: int = 10,
    seed: int = 0,
) -> ArrayDataset:
    """Class templates (fixed by `seed`) plus per-sample noise (drawn from `seed` and `split`).

    Each template is a colour per channel plus a sinusoidal grating whose orientation is distinct
    per class: a texture that survives random crops and flips, so a small CNN learns it in a few
    dozen steps.
    """
    if num_samples is None:
        num_samples = 512 if split == "train" else 256
    for key, value, low in (
        ("num_samples", num_samples, 0),
        ("image_size", image_size, 1),
        ("channels", channels, 1),
        ("num_classes", num_classes, 1),
    ):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"synthetic: {key} must be an integer >= {low}, got {value!r}.")
    K, C, S, N = num_classes, channels, image_size, num_samples
    noise = 0.1

    g = torch.Generator().manual_seed(mix_seed(seed, TAG_TEMPLATES))
    colour = 0.3 + 0.4 * torch.rand(K, C, 1, 1, generator=g)
    # Orientations a fixed fraction of pi apart, in shuffled order, so no two classes coincide.
    angle = (torch.randperm(K, generator=g) + 0.5 * torch.rand(K, generator=g)) * (math.pi / K)
    freq = 1.5 + 2.5 * torch.rand(K, generator=g)  # cycles per image
    phase = 2 * math.pi * torch.rand(K, C, 1, 1, generator=g)
    coords = torch.arange(S, dtype=torch.float32) / S
    # (K, 1, S, S): position along each class's wave direction
    cos_a, sin_a = angle.cos().view(K, 1, 1, 1), angle.sin().view(K, 1, 1, 1)
    along = cos_a * coords.view(1, 1, S, 1) + sin_a * coords.view(1, 1, 1, S)
    templates = colour + 0.2 * torch.sin(2 * math.pi * freq.view(K, 1, 1, 1) * along + phase)

    g = torch.Generator().manual_seed(mix_seed(seed, TAG_SAMPLES, _SPLITS.index(split)))
    labels = (torch.arange(N) % K)[torch.randperm(N, generator=g)]  # balanced classes
    x = templates[labels] + noise * torch.randn(N, C, S, S, generator=g)  # (N, C, S, S)
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8)

    # Statistics of the template distribution, not of one split's sample: the same for every
    # split and size.
    mean = templates.mean(dim=(0, 2, 3))
    std = (templates.var(dim=(0, 2, 3), unbiased=False) + noise**2).sqrt()
    return ArrayDataset(
        images=images,
        labels=labels,
        num_classes=K,
        mean=tuple(mean.tolist()),
        std=tuple(std.tolist()),
        name="synthetic",
    )
