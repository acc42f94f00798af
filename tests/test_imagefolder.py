"""ImageFolder trees: in memory and streamed; built from real Fashion-MNIST images."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from tasprune.data import DeviceLoader, load_dataset
from tasprune.errors import DataError
from tasprune.imagefolder import StreamingLoader, load_imagefolder


def _tree(root: Path, per_class: int = 4, classes: int = 3) -> Path:
    data = load_dataset("fashion-mnist", "test")
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            idx = (data.labels == c).nonzero().flatten()[:per_class]
            for i in idx.tolist():
                Image.fromarray(data.images[i, 0].numpy()).save(folder / f"{i}.png")
    return root


def test_in_memory_tree_loads_real_pixels(tmp_path: Path) -> None:
    root = _tree(tmp_path / "tree")
    train = load_imagefolder(root, "train")
    test = load_imagefolder(root, "test")  # "test" finds val/
    assert train.images.shape == (12, 3, 28, 28) and train.images.dtype == torch.uint8
    assert train.num_classes == 3 and sorted(set(train.labels.tolist())) == [0, 1, 2]
    assert len(test) == 12
    # Grey PNGs become RGB with three equal channels.
    assert torch.equal(train.images[:, 0], train.images[:, 1])
    x, y = next(iter(DeviceLoader(train, 4, train=True, crop_padding=2, flip=True)))
    assert x.shape == (4, 3, 28, 28) and y.shape == (4,)


def test_resize_and_errors(tmp_path: Path) -> None:
    root = _tree(tmp_path / "tree", per_class=2)
    assert load_imagefolder(root, "train", image_size=16).images.shape[-2:] == (16, 16)
    with pytest.raises(DataError, match="not found"):
        load_imagefolder(tmp_path / "nowhere", "train")
    (root / "train" / "class0" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="unreadable"):
        load_imagefolder(root, "train")


def test_streaming_loader_standard_transforms(tmp_path: Path) -> None:
    root = _tree(tmp_path / "tree")
    train = StreamingLoader(root, "train", 4, train=True, image_size=32, workers=0, seed=1)
    val = StreamingLoader(root, "test", 4, train=False, image_size=32, workers=0)
    assert len(train) == 3 and train.num_classes == 3
    x, y = next(iter(train))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
    train.set_epoch(0)
    first = torch.cat([y for _, y in train])
    train.set_epoch(0)
    assert torch.equal(first, torch.cat([y for _, y in train]))  # seeded per epoch
    xs = torch.cat([x for x, _ in val])
    assert xs.shape == (12, 3, 32, 32)
    shards = [
        StreamingLoader(
            root, "train", 2, train=True, image_size=32, workers=0, rank=r, world_size=2
        )
        for r in (0, 1)
    ]
    assert len(shards[0]) == len(shards[1]) == 3
