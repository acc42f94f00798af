"""Tests for tasprune.datasets and tasprune.data: parsing, safe unpickling, splitting, DeviceLoader."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import needs_fashion_mnist
from tasprune.data import ArrayDataset, Augment, DeviceLoader, search_loaders, stratified_split
from tasprune.datasets import DATASETS, load_dataset
from tasprune.errors import DataError, TaspruneError

needs_system_fmnist = needs_fashion_mnist


# ---- helpers ---------------------------------------------------------------------------------


def _idx_bytes(arr: np.ndarray, magic: int) -> bytes:
    """Encode a uint8 array in idx format with the given magic number."""
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def _write_fmnist(folder: Path, images: np.ndarray, labels: np.ndarray, prefix: str) -> None:
    """Write a gzipped idx image/label pair like the official Fashion-MNIST files."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(images, 2051)))
    (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(labels, 2049)))


def _small_fmnist(n: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    return images, labels


def _cifar_batch(n: int, label_key: bytes, classes: int, seed: int) -> dict[bytes, Any]:
    """A batch dict with exactly the keys/types of the official CIFAR python pickles."""
    rng = np.random.default_rng(seed)
    batch: dict[bytes, Any] = {
        b"batch_label": b"training batch 1 of 5",
        label_key: [int(v) for v in rng.integers(0, classes, size=n)],
        b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }
    if label_key == b"fine_labels":
        batch[b"coarse_labels"] = [int(v) % 20 for v in batch[label_key]]
    return batch


def _dump(path: Path, obj: object) -> None:
    with path.open("wb") as fh:
        pickle.dump(obj, fh, protocol=2)


def _toy(n: int = 37, channels: int = 3, size: int = 8, classes: int = 4) -> ArrayDataset:
    gen = torch.Generator().manual_seed(123)
    return ArrayDataset(
        images=torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=gen),
        labels=torch.arange(n) % classes,
        num_classes=classes,
        mean=tuple(0.4 + 0.05 * c for c in range(channels)),
        std=tuple(0.2 + 0.01 * c for c in range(channels)),
        name="toy",
    )


# ---- Fashion-MNIST ---------------------------------------------------------------------------


@needs_system_fmnist
def test_real_fashion_mnist_loads() -> None:
    train = load_dataset("fashion-mnist", "train")
    test = load_dataset("fashion-mnist", "test")
    assert train.images.shape == (60000, 1, 28, 28)
    assert test.images.shape == (10000, 1, 28, 28)
    for ds in (train, test):
        assert ds.images.dtype == torch.uint8
        assert ds.labels.dtype == torch.int64
        assert int(ds.labels.min()) == 0 and int(ds.labels.max()) == 9
        assert ds.num_classes == 10 and ds.in_channels == 1 and ds.image_size == (28, 28)
    # Balanced classes, and the constants match the real data to 3 decimals.
    assert torch.equal(train.labels.bincount(), torch.full((10,), 6000))
    pixels = train.images.float() / 255
    assert abs(pixels.mean().item() - train.mean[0]) < 1e-3
    assert abs(pixels.std().item() - train.std[0]) < 1e-3


def test_torchvision_layout(tmp_path: Path) -> None:
    images, labels = _small_fmnist(20)
    _write_fmnist(tmp_path / "FashionMNIST" / "raw", images, labels, "train")
    ds = load_dataset("fashion-mnist", "train", root=tmp_path)
    assert ds.images.shape == (20, 1, 28, 28)
    assert torch.equal(ds.images[:, 0], torch.from_numpy(images))
    assert torch.equal(ds.labels, torch.from_numpy(labels.astype(np.int64)))


def test_root_itself_and_uncompressed_names(tmp_path: Path) -> None:
    images, labels = _small_fmnist(12, seed=5)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(_idx_bytes(images, 2051))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(labels, 2049))
    ds = load_dataset("fashion-mnist", "test", root=str(tmp_path))
    assert torch.equal(ds.images[:, 0], torch.from_numpy(images))


@needs_system_fmnist
def test_real_subset_roundtrip(tmp_path: Path) -> None:
    real = load_dataset("fashion-mnist", "test")
    images = real.images[:50, 0].numpy()
    labels = real.labels[:50].numpy().astype(np.uint8)
    _write_fmnist(tmp_path / "FashionMNIST" / "raw", images, labels, "t10k")
    ds = load_dataset("fashion-mnist", "test", root=tmp_path)
    assert torch.equal(ds.images, real.images[:50])
    assert torch.equal(ds.labels, real.labels[:50])


def test_truncated_idx_names_file(tmp_path: Path) -> None:
    images, labels = _small_fmnist(10)
    raw = tmp_path / "FashionMNIST" / "raw"
    _write_fmnist(raw, images, labels, "train")
    bad = raw / "train-images-idx3-ubyte.gz"
    bad.write_bytes(gzip.compress(_idx_bytes(images, 2051)[:-100]))
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz") as err:
        load_dataset("fashion-mnist", "train", root=tmp_path)
    assert "truncated" in str(err.value) and "Fix:" in str(err.value)


def test_truncated_gzip_stream_names_file(tmp_path: Path) -> None:
    images, labels = _small_fmnist(10)
    raw = tmp_path / "FashionMNIST" / "raw"
    _write_fmnist(raw, images, labels, "train")
    bad = raw / "train-labels-idx1-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:15])
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz"):
        load_dataset("fashion-mnist", "train", root=tmp_path)


def test_bad_magic(tmp_path: Path) -> None:
    images, labels = _small_fmnist(10)
    raw = tmp_path / "FashionMNIST" / "raw"
    _write_fmnist(raw, images, labels, "train")
    (raw / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(images, 2049)))
    with pytest.raises(DataError, match=r"magic.*train-images|train-images.*magic"):
        load_dataset("fashion-mnist", "train", root=tmp_path)


def test_label_count_mismatch_and_range(tmp_path: Path) -> None:
    images, labels = _small_fmnist(10)
    raw = tmp_path / "FashionMNIST" / "raw"
    _write_fmnist(raw, images, labels[:9], "train")
    with pytest.raises(DataError, match="9 labels"):
        load_dataset("fashion-mnist", "train", root=tmp_path)
    bad_labels = labels.copy()
    bad_labels[3] = 11
    _write_fmnist(raw, images, bad_labels, "train")
    with pytest.raises(DataError, match="train-labels-idx1-ubyte"):
        load_dataset("fashion-mnist", "train", root=tmp_path)


def test_unknown_dataset_and_split() -> None:
    with pytest.raises(DataError) as err:
        load_dataset("imagenet-21k", "train")
    msg = str(err.value)
    assert isinstance(err.value, TaspruneError)
    assert all(name in msg for name in DATASETS) and "Fix:" in msg
    with pytest.raises(DataError, match="train, test"):
        load_dataset("cifar10", "validation")


# ---- CIFAR -----------------------------------------------------------------------------------


def test_cifar10_official_layout(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = [_cifar_batch(6, b"labels", 10, seed=i) for i in range(1, 6)]
    for i, batch in enumerate(batches, start=1):
        _dump(folder / f"data_batch_{i}", batch)
    _dump(folder / "test_batch", _cifar_batch(4, b"labels", 10, seed=99))
    train = load_dataset("cifar10", "train", root=tmp_path)
    assert train.images.shape == (30, 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.labels.dtype == torch.int64 and train.num_classes == 10
    expected = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32)
    assert torch.equal(train.images, torch.from_numpy(expected))
    assert train.labels.tolist() == sum((b[b"labels"] for b in batches), [])
    test = load_dataset("cifar10", "test", root=tmp_path)
    assert len(test) == 4 and len(test.mean) == 3 and len(test.std) == 3


def test_cifar100_official_layout(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    train_batch = _cifar_batch(8, b"fine_labels", 100, seed=1)
    _dump(folder / "train", train_batch)
    _dump(folder / "test", _cifar_batch(3, b"fine_labels", 100, seed=2))
    train = load_dataset("cifar100", "train", root=tmp_path)
    assert train.images.shape == (8, 3, 32, 32) and train.num_classes == 100
    assert train.labels.tolist() == train_batch[b"fine_labels"]
    assert len(load_dataset("cifar100", "test", root=tmp_path)) == 3


class _Evil:
    """A pickle payload that runs a shell command when unpickled by plain pickle.load."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.target}",))


def test_malicious_pickle_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    target = tmp_path / "pwned"
    batch = _cifar_batch(2, b"labels", 10, seed=0)
    batch[b"data"] = _Evil(target)
    _dump(folder / "data_batch_1", batch)
    with pytest.raises(DataError, match="data_batch_1") as err:
        load_dataset("cifar10", "train", root=tmp_path)
    assert "system" in str(err.value) and "Fix:" in str(err.value)
    assert not target.exists()


def test_truncated_pickle(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    _dump(folder / "train", _cifar_batch(5, b"fine_labels", 100, seed=3))
    data = (folder / "train").read_bytes()
    (folder / "train").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="train"):
        load_dataset("cifar100", "train", root=tmp_path)


def test_cifar_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cifar-10-batches-py.*Fix:"):
        load_dataset("cifar10", "train", root=tmp_path)


# ---- stratified_split ------------------------------------------------------------------------


def test_stratified_split_invariants() -> None:
    labels = torch.tensor([0] * 10 + [1] * 7 + [2] * 4 + [3] * 1)[torch.randperm(22)]
    a, b = stratified_split(labels, 0.5, seed=3)
    assert set(a.tolist()).isdisjoint(b.tolist())
    assert sorted(a.tolist() + b.tolist()) == list(range(22))
    for cls, n in [(0, 10), (1, 7), (2, 4), (3, 1)]:
        assert int((labels[a] == cls).sum()) == round(0.5 * n)
        assert int((labels[b] == cls).sum()) == n - round(0.5 * n)
    a2, b2 = stratified_split(labels, 0.5, seed=3)
    assert torch.equal(a, a2) and torch.equal(b, b2)
    a3, _ = stratified_split(labels, 0.5, seed=4)
    assert not torch.equal(a, a3)
    a4, b4 = stratified_split(labels, 0.25, seed=0)
    assert int((labels[a4] == 0).sum()) == round(2.5) and len(a4) + len(b4) == 22


# ---- DeviceLoader ----------------------------------------------------------------------------


def test_search_holdout_is_part_of_split_b_the_architecture_never_sees() -> None:
    ds = _toy(200, channels=1, size=4)
    ds = ArrayDataset(  # image i holds the value i, so a batch names its images
        images=torch.arange(200, dtype=torch.uint8).view(200, 1, 1, 1).expand(200, 1, 4, 4),
        labels=ds.labels,
        num_classes=ds.num_classes,
        mean=ds.mean,
        std=ds.std,
        name="toy",
    )

    def ids(loader: DeviceLoader) -> set[int]:
        out: set[int] = set()
        for x, _ in loader:
            out |= {round(float(v)) for v in x[:, 0, 0, 0] * ds.std[0] * 255 + ds.mean[0] * 255}
        return out

    a, b, valid = search_loaders(ds, 10, seed=0, holdout=0.2)
    ia, ib, iv = ids(a), ids(b), ids(valid)
    assert len(ia) == 100 and len(ib) == 80 and len(iv) == 20
    assert not (ia & ib or ia & iv or ib & iv) and len(ia | ib | iv) == 200
    yv = torch.cat([y for _, y in valid])
    assert torch.bincount(yv, minlength=4).tolist() == [5, 5, 5, 5]  # stratified
    _, b0, valid0 = search_loaders(ds, 10, seed=0)  # holdout 0: validate on B itself
    assert ids(valid0) == ids(b0) == ib | iv
    # Small data: at least one image of every class is held out, none is left only there.
    _, b_small, valid_small = search_loaders(_toy(16), 2, holdout=0.01)
    assert torch.cat([y for _, y in valid_small]).sort().values.tolist() == [0, 1, 2, 3]
    assert len(b_small) == 2  # 4 of split B's 8 images stay for the architecture steps
    with pytest.raises(TaspruneError, match="holdout"):
        search_loaders(_toy(4), 1, holdout=0.5)  # one image per class in B: none left


def test_subset_and_properties() -> None:
    ds = _toy(10, channels=3, size=8)
    sub = ds.subset(torch.tensor([1, 3, 5]))
    assert len(sub) == 3 and sub.in_channels == 3 and sub.image_size == (8, 8)
    assert torch.equal(sub.images, ds.images[[1, 3, 5]])
    assert sub.labels.tolist() == [1, 3, 1] and sub.num_classes == ds.num_classes
    assert (sub.mean, sub.std, sub.name) == (ds.mean, ds.std, ds.name)


def test_loader_batch_count() -> None:
    ds = _toy(37)
    assert len(DeviceLoader(ds, 8, train=True)) == 4
    assert len(DeviceLoader(ds, 8, train=False)) == 5
    assert len(DeviceLoader(ds, 8, train=True, drop_last=False)) == 5
    sizes = [x.shape[0] for x, _ in DeviceLoader(ds, 8, train=False)]
    assert sizes == [8, 8, 8, 8, 5]
    assert sum(x.shape[0] for x, _ in DeviceLoader(ds, 8, train=True)) == 32


def test_loader_eval_normalisation() -> None:
    ds = _toy(20)
    loader = DeviceLoader(ds, 6, train=False, augment=Augment(crop_padding=4, flip=True))
    xs, ys = zip(*loader, strict=True)
    x, y = torch.cat(xs), torch.cat(ys)
    mean = torch.tensor(ds.mean).view(1, -1, 1, 1)
    std = torch.tensor(ds.std).view(1, -1, 1, 1)
    manual = (ds.images.float() / 255 - mean) / std
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    torch.testing.assert_close(x, manual)  # eval: no shuffle, no augmentation
    assert torch.equal(y, ds.labels)


def test_loader_determinism_and_epochs() -> None:
    ds = _toy(40)
    kw: dict[str, Any] = dict(train=True, augment=Augment(crop_padding=2, flip=True), seed=7)

    def epoch(loader: DeviceLoader) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = zip(*loader, strict=True)
        return torch.cat(xs), torch.cat(ys)

    la, lb = DeviceLoader(ds, 8, **kw), DeviceLoader(ds, 8, **kw)
    a0, b0 = epoch(la), epoch(lb)
    assert torch.equal(a0[0], b0[0]) and torch.equal(a0[1], b0[1])
    a1 = epoch(la)  # automatic epoch 1
    assert not torch.equal(a0[1], a1[1])
    assert la.state_dict() == {"epoch": 2}
    lb.set_epoch(1)
    assert torch.equal(epoch(lb)[0], a1[0])
    lc = DeviceLoader(ds, 8, **kw)
    lc.load_state_dict({"epoch": 1})
    assert torch.equal(epoch(lc)[0], a1[0])
    other_seed = DeviceLoader(ds, 8, train=True, seed=8)
    assert not torch.equal(epoch(other_seed)[1], a0[1])


def test_loader_crop_is_shifted_window() -> None:
    ds = _toy(16, channels=2, size=6)
    pad = 2
    # Labels = sample ids, so each output can be traced back to its source image.
    ds_unique = ArrayDataset(ds.images, torch.arange(16), 16, ds.mean, ds.std, "u")
    loader = DeviceLoader(
        ds_unique, 16, train=True, augment=Augment(crop_padding=pad, flip=False), seed=1
    )
    x, y = next(iter(loader))
    assert x.shape == (16, 2, 6, 6)
    mean = torch.tensor(ds.mean).view(-1, 1, 1)
    std = torch.tensor(ds.std).view(-1, 1, 1)
    raw = torch.round((x * std.unsqueeze(0) + mean.unsqueeze(0)) * 255).to(torch.uint8)
    padded = F.pad(ds.images, (pad, pad, pad, pad))
    shifted = 0
    for i in range(16):
        src = padded[int(y[i])]
        windows = [
            (dy, dx)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            if torch.equal(src[:, dy : dy + 6, dx : dx + 6], raw[i])
        ]
        assert windows, f"sample {i} is not a window of its padded original"
        shifted += (pad, pad) not in windows
    assert shifted > 0  # the crop really moved some images


def test_loader_flip() -> None:
    ds = ArrayDataset(_toy(32).images, torch.arange(32), 32, _toy().mean, _toy().std, "u")
    x, y = next(
        iter(DeviceLoader(ds, 32, train=True, augment=Augment(crop_padding=0, flip=True), seed=0))
    )
    mean = torch.tensor(ds.mean).view(1, -1, 1, 1)
    std = torch.tensor(ds.std).view(1, -1, 1, 1)
    ref = (ds.images[y].float() / 255 - mean) / std
    same = torch.isclose(x, ref).flatten(1).all(1)
    flipped = torch.isclose(x, ref.flip(3)).flatten(1).all(1)
    assert bool((same | flipped).all())
    assert 0 < int(flipped.sum()) < 32


def test_loader_channels_last() -> None:
    x, _ = next(iter(DeviceLoader(_toy(8), 4, train=False, channels_last=True)))
    assert x.is_contiguous(memory_format=torch.channels_last)


def test_loader_world_size_shards() -> None:
    ds = ArrayDataset(_toy(41).images, torch.arange(41), 41, _toy().mean, _toy().std, "u")
    shards = []
    for rank in range(2):
        loader = DeviceLoader(ds, 5, train=True, seed=3, rank=rank, world_size=2)
        assert loader.num_samples == 20 and len(loader) == 4
        shards.append(torch.cat([y for _, y in loader]))
    assert len(shards[0]) == len(shards[1]) == 20
    assert set(shards[0].tolist()).isdisjoint(shards[1].tolist())
    # Together, per batch, the ranks cover the single-process global batch of 2 x 5.
    single = DeviceLoader(ds, 10, train=True, seed=3)
    for i, (_, y) in enumerate(single):
        both = torch.cat([shards[0][i * 5 : i * 5 + 5], shards[1][i * 5 : i * 5 + 5]])
        assert sorted(both.tolist()) == sorted(y.tolist())
