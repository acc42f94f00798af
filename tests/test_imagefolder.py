"""ImageFolder trees: in memory and streamed; built from real Fashion-MNIST images."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from tasprune.data import Augment, DeviceLoader
from tasprune.datasets import load_dataset
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
    x, y = next(
        iter(DeviceLoader(train, 4, train=True, augment=Augment(crop_padding=2, flip=True)))
    )
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


def test_streaming_folder_search_split_is_stratified_and_disjoint(tmp_path: Path) -> None:
    from tasprune.data import search_loaders
    from tasprune.imagefolder import StreamingFolder

    root = _tree(tmp_path / "tree", per_class=6)
    train = StreamingFolder(root, "train", image_size=32, workers=0)
    assert len(train) == 18 and train.num_classes == 3 and train.image_size == (32, 32)
    small = train.subset(torch.tensor([0, 7, 13]))
    assert len(small) == 3 and small.labels.tolist() == train.labels[[0, 7, 13]].tolist()
    a, b, valid = search_loaders(train, 3, seed=0)
    ya = torch.cat([y for _, y in a])
    yb = torch.cat([y for _, y in b])
    assert torch.bincount(ya, minlength=3).tolist() == [3, 3, 3]  # stratified halves
    assert torch.bincount(yb, minlength=3).tolist() == [3, 3, 3]
    seen_a = set(a.dataset.indices)
    seen_b = set(b.dataset.indices)
    assert not seen_a & seen_b and len(seen_a | seen_b) == 18
    assert set(valid.dataset.indices) == seen_b


@pytest.mark.slow
@pytest.mark.parametrize("model", ["resnet18", "torchvision:resnet18"])
def test_imagenet_recipe_runs_end_to_end_streamed(tmp_path: Path, model: str) -> None:
    """`tasprune run` with data.name imagenet: every stage reads the tree through DataLoaders
    (a shipped family and the same network traced from torchvision)."""
    import yaml

    from tasprune.cli import main

    root = _tree(tmp_path / "tree", per_class=8)
    recipe = {
        "model": model,
        "device": "cpu",
        "data": {"name": "imagenet", "root": str(root), "image_size": 32, "workers": 0},
        "teacher": {"train": {"epochs": 1, "batch_size": 8}},
        "search": {"epochs": 1, "batch_size": 4, "flops_ratio": 0.6, "valid_batches": 1},
        "distill": {"init": "teacher", "train": {"epochs": 1, "batch_size": 8}},
        "report": {"latency_batches": [1], "latency_repeats": 1, "int8": False},
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out), "-q"]) == 0
    report = __import__("json").loads((out / "report.json").read_text())
    assert report["pruned"]["flops_ratio"] <= 0.6
    assert 0 <= report["pruned"]["top1"] <= 100
    # `tasprune train` on the same tree, streamed as well.
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "t"), "-q"]) == 0
    assert (tmp_path / "t" / "model.pt").is_file()
