"""Tests of revnet.training.datasets and .loader: file formats and their errors, synthetic data,
augmentation, Loader."""

from __future__ import annotations

import gzip
import pathlib
import pickle

import numpy as np
import pytest
import torch

from revnet.training.datasets import DATASETS, ArrayDataset, default_data_dir, load_dataset
from revnet.training.loader import Loader, augment, normalize

SYSTEM_FASHION = pathlib.Path("/usr/share/datasets/fashion-mnist")
FASHION_NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


# --- writers of tiny files in the real formats ---


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    header = bytes([0, 0, type_code, array.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


def write_file(path: pathlib.Path, payload: bytes, gz: bool) -> pathlib.Path:
    path = path.with_name(path.name + ".gz") if gz else path
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


def fake_fashion(folder: pathlib.Path, gz: bool, n: dict[str, int] | None = None) -> dict:
    """Writes the four IDX files; returns {split: (images (N, 28, 28), labels (N,))}."""
    n = n or {"train": 6, "test": 3}
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = {}
    for split, (img_name, lbl_name) in FASHION_NAMES.items():
        images = rng.integers(0, 256, (n[split], 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n[split], dtype=np.uint8)
        write_file(folder / img_name, idx_bytes(images), gz)
        write_file(folder / lbl_name, idx_bytes(labels), gz)
        out[split] = (images, labels)
    return out


def pickle_batch(path: pathlib.Path, batch: object, protocol: int = 2) -> None:
    path.write_bytes(pickle.dumps(batch, protocol=protocol))


def fake_cifar(root: pathlib.Path, name: str, per_file: int = 3) -> dict:
    """Writes a tiny extracted CIFAR folder under `root`; returns {split: (data, labels)}."""
    if name == "cifar10":
        folder, key, k = root / "cifar-10-batches-py", b"labels", 10
        files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    else:
        folder, key, k = root / "cifar-100-python", b"fine_labels", 100
        files = {"train": ["train"], "test": ["test"]}
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    out = {}
    for split, names in files.items():
        datas, labels = [], []
        for file in names:
            data = rng.integers(0, 256, (per_file, 3072), dtype=np.uint8)
            lbl = [int(v) for v in rng.integers(0, k, per_file)]
            lbl[0] = k - 1  # the top class must be accepted
            pickle_batch(folder / file, {b"batch_label": b"x", b"data": data, key: lbl})
            datas.append(data)
            labels += lbl
        out[split] = (np.concatenate(datas), np.array(labels))
    return out


# --- Fashion-MNIST ---


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_round_trip(tmp_path: pathlib.Path, gz: bool) -> None:
    truth = fake_fashion(tmp_path, gz)
    for split in ("train", "test"):
        ds = load_dataset("fashion-mnist", split, data_dir=tmp_path)
        images, labels = truth[split]
        assert ds.images.shape == (len(images), 1, 28, 28) and ds.images.dtype == torch.uint8
        assert ds.images.is_contiguous()
        assert ds.labels.dtype == torch.int64
        assert torch.equal(ds.images[:, 0], torch.from_numpy(images))
        assert torch.equal(ds.labels, torch.from_numpy(labels).long())
        assert ds.num_classes == 10 and ds.name == "fashion-mnist"
        assert ds.in_chans == 1 and ds.image_size == (28, 28) and len(ds) == len(images)
        assert ds.mean == pytest.approx((0.2860,)) and ds.std == pytest.approx((0.3530,))


def test_fashion_subfolder_and_env_override(tmp_path, monkeypatch) -> None:
    truth = fake_fashion(tmp_path / "fashion-mnist", gz=True)
    monkeypatch.setenv("REVNET_DATA", str(tmp_path))
    for name in ("fashion-mnist", "cifar10", "cifar100"):
        assert default_data_dir(name) == tmp_path
    ds = load_dataset("fashion-mnist", "test")
    assert torch.equal(ds.images[:, 0], torch.from_numpy(truth["test"][0]))


def test_default_data_dir_without_env(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("REVNET_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_data_dir("fashion-mnist") == SYSTEM_FASHION
    assert default_data_dir("cifar10") == tmp_path / "revnet"
    with pytest.raises(ValueError, match="cifar100"):
        default_data_dir("mnist")


def test_fashion_missing_files(tmp_path: pathlib.Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"apt-get install dataset-fashion-mnist") as info:
        load_dataset("fashion-mnist", "train", data_dir=tmp_path / "nowhere")
    assert "does not exist" in str(info.value) and "REVNET_DATA" in str(info.value)
    fake_fashion(tmp_path, gz=False)
    (tmp_path / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing train-labels-idx1-ubyte") as info:
        load_dataset("fashion-mnist", "train", data_dir=tmp_path)
    listed = str(info.value).split(" in ")[0]  # the help text after it names all four files
    assert str(tmp_path) in str(info.value) and "train-images" not in listed
    load_dataset("fashion-mnist", "test", data_dir=tmp_path)  # the other split is complete


def _corrupt(kind: str, folder: pathlib.Path) -> None:
    """Replaces the test-split files in `folder` with a broken variant."""
    images = np.zeros((3, 28, 28), np.uint8)
    labels = np.array([0, 1, 2], np.uint8)
    img, lbl = (folder / n for n in FASHION_NAMES["test"])
    gz_payload = gzip.compress(idx_bytes(images))
    payloads = {
        "magic": b"\x08\x03" + idx_bytes(images)[2:],
        "dtype": idx_bytes(images.astype(np.float32), type_code=0x0D),
        "ndim": idx_bytes(images.reshape(3, -1)),
        "short": idx_bytes(images)[:-5],
        "long": idx_bytes(images) + b"\x00",
        "gz_eof": gz_payload[:-12],
        # The gzip trailer is CRC32 then size, 4 bytes each: spoil the CRC.
        "gz_crc": gz_payload[:-8] + bytes([gz_payload[-8] ^ 0xFF]) + gz_payload[-7:],
    }
    if kind in payloads:
        data = payloads[kind]
        (img.with_name(img.name + ".gz") if kind.startswith("gz") else img).write_bytes(data)
        lbl.write_bytes(idx_bytes(labels))
    elif kind == "label_range":
        img.write_bytes(idx_bytes(images))
        lbl.write_bytes(idx_bytes(np.array([0, 10, 2], np.uint8)))
    elif kind == "count":
        img.write_bytes(idx_bytes(images))
        lbl.write_bytes(idx_bytes(labels[:2]))


@pytest.mark.parametrize(
    ("kind", "match"),
    [
        ("magic", r"not an IDX file"),
        ("dtype", r"type code 0x0d.*unsigned byte"),
        ("ndim", r"2 dimension\(s\); expected 3"),
        ("short", r"truncated or corrupt"),
        ("long", r"truncated or corrupt"),
        ("gz_eof", r"corrupt or truncated gzip"),
        ("gz_crc", r"corrupt or truncated gzip.*CRC"),
        ("label_range", r"outside the 10 classes"),
        ("count", r"3 images but .* 2 labels"),
    ],
)
def test_fashion_bad_files(tmp_path: pathlib.Path, kind: str, match: str) -> None:
    _corrupt(kind, tmp_path)
    with pytest.raises(ValueError, match=match) as info:
        load_dataset("fashion-mnist", "test", data_dir=tmp_path)
    assert "idx" in str(info.value)  # names the file
    assert "apt-get install --reinstall dataset-fashion-mnist" in str(info.value)  # and how to get it


@pytest.mark.skipif(not SYSTEM_FASHION.is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_test_split() -> None:
    ds = load_dataset("fashion-mnist", "test", data_dir=SYSTEM_FASHION)
    assert ds.images.shape == (10_000, 1, 28, 28)
    assert torch.equal(ds.labels.bincount(), torch.full((10,), 1000))
    assert abs(ds.images.float().mean().item() / 255 - ds.mean[0]) < 0.01


# --- CIFAR ---


@pytest.mark.parametrize(
    ("name", "folder"), [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")]
)
def test_cifar_round_trip(tmp_path: pathlib.Path, name: str, folder: str) -> None:
    truth = fake_cifar(tmp_path, name)
    k = 10 if name == "cifar10" else 100
    for split, data_dir in (("train", tmp_path), ("test", tmp_path / folder)):  # parent or itself
        ds = load_dataset(name, split, data_dir=data_dir)
        data, labels = truth[split]
        assert ds.images.shape == (len(data), 3, 32, 32) and ds.images.dtype == torch.uint8
        # Rows are channel-major: 1024 red, then green, then blue values.
        assert torch.equal(ds.images.reshape(len(data), -1), torch.from_numpy(data))
        assert torch.equal(ds.images[0, 1, 0, :3], torch.from_numpy(data[0, 1024:1027]))
        assert torch.equal(ds.labels, torch.from_numpy(labels).long())
        assert ds.num_classes == k and ds.in_chans == 3 and ds.name == name
        assert len(ds.mean) == len(ds.std) == 3
    assert len(load_dataset(name, "train", data_dir=tmp_path)) == (15 if k == 10 else 3)


def test_cifar_missing(tmp_path: pathlib.Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"cifar-10-python\.tar\.gz") as info:
        load_dataset("cifar10", "train", data_dir=tmp_path)
    assert "data_batch_1" in str(info.value) and "cifar-10-batches-py" in str(info.value)
    (tmp_path / "cifar-100-python.tar.gz").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"not extracted.*cifar-100-python") as info:
        load_dataset("cifar100", "test", data_dir=tmp_path)
    fake_cifar(tmp_path, "cifar10")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing data_batch_3 in .*cifar-10-batches-py"):
        load_dataset("cifar10", "train", data_dir=tmp_path)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize(
    ("batch", "match"),
    [
        ([1, 2], r"expected a pickled dict"),
        ({b"data": np.zeros((2, 3072), np.uint8)}, r"no b'labels' entry"),
        ({b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]}, r"\(N, 3072\) uint8"),
        ({b"data": np.zeros((2, 3072), np.int64), b"labels": [0, 1]}, r"\(N, 3072\) uint8"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, r"outside the 10 classes"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, r"2 images but 1 labels"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": _Evil()}, r"refusing to load"),
        (b"truncated", r"not a readable CIFAR-10 pickle"),
    ],
)
def test_cifar_bad_pickles(tmp_path: pathlib.Path, batch: object, match: str) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    if batch == b"truncated":
        good = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}
        (folder / "test_batch").write_bytes(pickle.dumps(good, protocol=2)[:-40])
    else:
        pickle_batch(folder / "test_batch", batch)
    with pytest.raises(ValueError, match=match) as info:
        load_dataset("cifar10", "test", data_dir=tmp_path)
    assert "test_batch" in str(info.value)
    assert "tar -xzf cifar-10-python.tar.gz" in str(info.value)  # how to get a good one


def test_cifar_other_pickle_flavours(tmp_path: pathlib.Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    data = np.arange(2 * 3072, dtype=np.uint64).astype(np.uint8).reshape(2, 3072)
    # Python 3 re-pickle with str keys and a numpy label array, newest protocol.
    pickle_batch(folder / "train", {"data": data, "fine_labels": np.array([5, 99])}, protocol=5)
    # The original files are python 2 pickles naming numpy.core (numpy 2 calls it numpy._core);
    # protocol 2 spells globals out as text, so the old name can be patched in.
    legacy = pickle.dumps({b"data": data, b"fine_labels": [1, 2]}, protocol=2)
    legacy = legacy.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    assert b"numpy.core.multiarray" in legacy
    (folder / "test").write_bytes(legacy)
    assert load_dataset("cifar100", "train", data_dir=folder).labels.tolist() == [5, 99]
    test = load_dataset("cifar100", "test", data_dir=folder)
    assert torch.equal(test.images.reshape(2, -1), torch.from_numpy(data))


# --- names, splits, synthetic ---


def test_unknown_name_split_and_options(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match=r"fashion-mnist, cifar10, cifar100, synthetic"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match=r"train, test"):
        load_dataset("synthetic", "val")
    with pytest.raises(TypeError, match=r"num_samples"):
        load_dataset("cifar10", data_dir=tmp_path, num_samples=3)
    assert DATASETS == ("fashion-mnist", "cifar10", "cifar100", "synthetic")


def test_synthetic_deterministic_and_shared_templates() -> None:
    a = load_dataset("synthetic", "train")
    b = load_dataset("synthetic", "train")
    assert a.images.shape == (512, 3, 32, 32) and a.images.dtype == torch.uint8
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.labels.bincount().tolist() == [52] * 2 + [51] * 8  # balanced
    test = load_dataset("synthetic", "test")
    assert len(test) == 256 and not torch.equal(test.images[:256], a.images[:256])
    assert test.mean == a.mean and test.std == a.std
    other = load_dataset("synthetic", "train", seed=1)
    assert not torch.equal(other.images, a.images)

    def class_means(ds: ArrayDataset) -> torch.Tensor:  # (K, C, H, W) in [0, 1]
        x = ds.images.float() / 255
        return torch.stack([x[ds.labels == k].mean(0) for k in range(ds.num_classes)])

    train_m, test_m = class_means(a), class_means(test)
    same = (train_m - test_m).abs().mean()
    across = (train_m - test_m.roll(1, 0)).abs().mean()
    assert same < 0.03 and across > 3 * same  # the same templates in both splits

    small = load_dataset(
        "synthetic", "test", num_samples=7, image_size=8, channels=1, num_classes=3, seed=5
    )
    assert small.images.shape == (7, 1, 8, 8) and small.num_classes == 3
    assert int(small.labels.max()) < 3 and len(small.mean) == 1
    with pytest.raises(ValueError, match="image_size"):
        load_dataset("synthetic", image_size=0)


# --- augmentation and normalisation ---


def _images(b: int = 32, c: int = 2, h: int = 6, w: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(1, 256, (b, c, h, w), generator=g, dtype=torch.uint8)  # no zeros


def test_augment_flip_only() -> None:
    x = _images()
    out = augment(x, pad=0, flip=True, generator=torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == torch.uint8
    mirrored = [torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x, strict=True)]
    same = [torch.equal(o, xi) for o, xi in zip(out, x, strict=True)]
    assert all(m or s for m, s in zip(mirrored, same, strict=True))
    assert any(mirrored) and any(same)
    again = augment(x, pad=0, flip=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again)
    assert torch.equal(augment(x, pad=0, flip=False, generator=torch.Generator()), x)


@pytest.mark.parametrize("flip", [False, True])
def test_augment_crop_is_a_window_of_the_padded_image(flip: bool) -> None:
    x, pad = _images(), 2
    out = augment(x, pad=pad, flip=flip, generator=torch.Generator().manual_seed(2))
    assert out.shape == x.shape and out.dtype == x.dtype
    padded = torch.nn.functional.pad(x, (pad,) * 4)
    _, _, h, w = x.shape
    offsets = set()
    for o, p in zip(out, padded, strict=True):
        hits = [
            (dy, dx, mirror)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            for mirror in ((False, True) if flip else (False,))
            if torch.equal(
                o,
                p[:, dy : dy + h, dx : dx + w].flip(-1)
                if mirror
                else p[:, dy : dy + h, dx : dx + w],
            )
        ]
        assert hits, "output is not a (mirrored) window of the zero-padded input"
        offsets.add(hits[0])
    assert len(offsets) > 5  # offsets really vary


def test_normalize() -> None:
    x = _images(4, 3)
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
    expected = (x.double() / 255 - torch.tensor(mean).view(3, 1, 1).double()) / torch.tensor(
        std
    ).view(3, 1, 1).double()
    out = normalize(x, mean, std)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(normalize(x[0], mean, std), out[0])


# --- Loader ---


def indexed(n: int = 50, c: int = 1, size: int = 4) -> ArrayDataset:
    """A data set whose label is each sample's index, so batches show the order."""
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (n, c, size, size), generator=g, dtype=torch.uint8)
    return ArrayDataset(images, torch.arange(n), n, (0.25,) * c, (0.5,) * c, "indexed")


def collect(loader: Loader, epoch: int, start: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(loader.epoch(epoch, start))


def test_loader_batches_and_normalisation() -> None:
    ds = indexed()
    train = Loader(ds, 8, train=True, augment=False)
    assert len(train) == 50 // 8
    batches = collect(train, 0)
    assert len(batches) == len(train)
    seen = torch.cat([y for _, y in batches])
    assert len(set(seen.tolist())) == len(seen) == 48  # a permutation, last partial dropped
    for x, y in batches:
        assert x.shape == (8, 1, 4, 4) and x.dtype == torch.float32 and y.dtype == torch.int64
        torch.testing.assert_close(x, (ds.images[y].float() / 255 - 0.25) / 0.5)
    x, _ = next(Loader(ds, 8, train=True).epoch(0))  # augmented: padding zeros show up
    assert x.shape == (8, 1, 4, 4) and (x == -0.5).any()


def test_loader_determinism_epochs_and_resume() -> None:
    ds = indexed()
    a, b = Loader(ds, 8, train=True, seed=7), Loader(ds, 8, train=True, seed=7)
    ea, eb = collect(a, 2), collect(b, 2)
    assert all(
        torch.equal(x1, x2) and torch.equal(y1, y2)
        for (x1, y1), (x2, y2) in zip(ea, eb, strict=True)
    )
    order = lambda batches: torch.cat([y for _, y in batches]).tolist()  # noqa: E731
    assert order(collect(a, 3)) != order(ea)
    assert order(collect(Loader(ds, 8, train=True, seed=8), 2)) != order(ea)
    for k in (0, 1, 4, len(a)):
        resumed = collect(a, 2, start=k)
        assert len(resumed) == len(a) - k
        for (x1, y1), (x2, y2) in zip(resumed, ea[k:], strict=True):
            assert torch.equal(x1, x2) and torch.equal(y1, y2)
    with pytest.raises(ValueError, match="start"):
        a.epoch(0, start=len(a) + 1)


def test_loader_rank_shards() -> None:
    ds = indexed(53)
    whole = collect(Loader(ds, 10, train=True, seed=1), 1)
    ranks = [collect(Loader(ds, 5, train=True, seed=1, rank=r, world_size=2), 1) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(whole) == 5
    for (x, y), (x0, y0), (x1, y1) in zip(whole, *ranks, strict=True):
        assert not set(y0.tolist()) & set(y1.tolist())
        # Together the ranks make the global batch, augmentation included.
        assert torch.equal(torch.cat([y0, y1]), y) and torch.equal(torch.cat([x0, x1]), x)
    with pytest.raises(ValueError, match="rank"):
        Loader(ds, 5, train=True, rank=2, world_size=2)
    with pytest.raises(ValueError, match="no full global batch"):
        Loader(ds, 30, train=True, world_size=2)


def test_test_loader_covers_everything_in_order() -> None:
    ds = indexed(23)
    loader = Loader(ds, 5, train=False)
    assert len(loader) == 5
    batches = collect(loader, 0)
    assert [len(y) for _, y in batches] == [5, 5, 5, 5, 3]
    assert torch.cat([y for _, y in batches]).tolist() == list(range(23))
    assert torch.equal(
        torch.cat([x for x, _ in collect(loader, 3)]), torch.cat([x for x, _ in batches])
    )  # no randomness
    ranks = [Loader(ds, 4, train=False, rank=r, world_size=2) for r in (0, 1)]
    assert [len(r) for r in ranks] == [3, 3]
    got = sorted(torch.cat([y for r in ranks for _, y in collect(r, 0)]).tolist())
    assert got == list(range(23))
    assert len(Loader(indexed(17), 4, train=False, rank=1, world_size=2)) == 2  # 8+8+1: rank 1 idle
