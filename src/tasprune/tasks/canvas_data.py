"""Torch datasets over a built canvas set, and a picture of a few canvases to check it by eye.

``CanvasDetection`` gives what torchvision detectors take (a float image and a target dict with
x1y1x2y2 boxes, labels 1..10 with 0 left for the background, per-instance masks);
``CanvasSegmentation`` gives (image, class-index map). A split is read into memory once (a few
thousand 96 px canvases are tens of MB as uint8), so ``__getitem__`` only converts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from tasprune.errors import ConfigError, DataError
from tasprune.tasks.canvas import FASHION_MNIST_CLASSES, SPLITS, read_manifest

__all__ = ["CanvasDetection", "CanvasSegmentation", "collate", "save_canvas_preview"]

Target = dict[str, Any]


def _read_pngs(folder: Path, names: Sequence[str]) -> torch.Tensor:
    """The grey PNGs ``folder/name`` as one uint8 N x H x W tensor."""
    try:
        arrays = [np.asarray(Image.open(folder / name)) for name in names]
    except OSError as err:
        raise DataError(
            f"cannot read canvas image in {folder}: {err}. Fix: delete the set's folder "
            "and build it again"
        ) from err
    return torch.from_numpy(np.stack(arrays)) if arrays else torch.zeros(0, 0, 0, dtype=torch.uint8)


def _check_args(root: str | os.PathLike[str], split: str, channels: int) -> Path:
    if split not in SPLITS:
        raise ConfigError(f"canvas split {split!r}. Fix: use one of {', '.join(SPLITS)}")
    if channels not in (1, 3):
        raise ConfigError(
            f"canvas channels={channels}. Fix: use 1 (grey) or 3 (grey copied to RGB)"
        )
    read_manifest(root)
    return Path(root)


def _as_float(image: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 H x W -> float C x H x W in [0, 1] (grey copied to every channel)."""
    return (image.float() / 255.0).unsqueeze(0).expand(channels, -1, -1).contiguous()


class CanvasDetection(Dataset[tuple[torch.Tensor, Target]]):
    """One split of a canvas set for detection and instance segmentation.

    Item ``i``: ``(image, target)``, image float ``C x H x W`` in [0, 1] (``channels=3`` copies
    the grey plane for detectors built for RGB), target ``boxes`` (float ``N x 4``, x1 y1 x2 y2
    in pixels, tight around the visible pixels), ``labels`` (int64, 1..10), ``masks`` (uint8
    ``N x H x W``), ``image_id`` (the COCO image id, for :func:`to_coco_detections`), ``area``
    and ``iscrowd``. ``transforms(image, target)`` is applied last when given. Batch with
    :func:`collate`.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str,
        *,
        channels: int = 1,
        transforms: Callable[[torch.Tensor, Target], tuple[torch.Tensor, Target]] | None = None,
    ) -> None:
        self.root = _check_args(root, split, channels)
        self.split, self.channels, self.transforms = split, channels, transforms
        self.annotation_file = self.root / "annotations" / f"{split}.json"
        coco = json.loads(self.annotation_file.read_text(encoding="utf-8"))
        self.image_ids = [int(img["id"]) for img in coco["images"]]
        names = [img["file_name"] for img in coco["images"]]
        self.images = _read_pngs(self.root / "images" / split, names)
        self.instances = _read_pngs(self.root / "instances" / split, names)
        per_image: dict[int, list[dict[str, Any]]] = {i: [] for i in self.image_ids}
        for ann in coco["annotations"]:
            per_image[int(ann["image_id"])].append(ann)
        self._anns = [per_image[i] for i in self.image_ids]
        self.classes = FASHION_MNIST_CLASSES

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        anns = self._anns[index]
        boxes = torch.tensor(
            [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)],
            dtype=torch.float32,
        ).reshape(-1, 4)
        ids = torch.tensor([a["instance"] for a in anns], dtype=torch.uint8)
        masks = (self.instances[index].unsqueeze(0) == ids.view(-1, 1, 1)).to(torch.uint8)
        target: Target = {
            "boxes": boxes,
            "labels": torch.tensor([a["category_id"] for a in anns], dtype=torch.int64),
            "masks": masks,
            "image_id": self.image_ids[index],
            "area": torch.tensor([a["area"] for a in anns], dtype=torch.float32),
            "iscrowd": torch.zeros(len(anns), dtype=torch.int64),
        }
        image = _as_float(self.images[index], self.channels)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def collate(
    batch: Sequence[tuple[torch.Tensor, Target]],
) -> tuple[list[torch.Tensor], list[Target]]:
    """A detection batch as torchvision detectors take it: a list of images, a list of targets."""
    return [image for image, _ in batch], [target for _, target in batch]


CanvasDetection.collate = staticmethod(collate)  # type: ignore[attr-defined]


class CanvasSegmentation(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """One split of a canvas set for semantic segmentation.

    Item ``i``: ``(image, mask)``, image float ``C x H x W`` in [0, 1], mask long ``H x W`` with
    the class index + 1 of the visible item at each pixel and 0 for the background (11 classes
    for :func:`tasprune.tasks.miou`).
    """

    num_classes = len(FASHION_MNIST_CLASSES) + 1

    def __init__(self, root: str | os.PathLike[str], split: str, *, channels: int = 1) -> None:
        self.root = _check_args(root, split, channels)
        self.split, self.channels = split, channels
        names = sorted(p.name for p in (self.root / "images" / split).glob("*.png"))
        self.images = _read_pngs(self.root / "images" / split, names)
        self.masks = _read_pngs(self.root / "semantic" / split, names)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _as_float(self.images[index], self.channels), self.masks[index].long()


def save_canvas_preview(
    root: str | os.PathLike[str],
    path: str | os.PathLike[str],
    *,
    split: str = "train",
    count: int = 8,
    cols: int = 4,
) -> Path:
    """A PNG grid of the first ``count`` canvases of ``split``: each canvas with its boxes and
    class names, and beside it the semantic map, to check by eye that boxes and masks fit."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    data = CanvasDetection(root, split)
    seg = CanvasSegmentation(root, split)
    count = min(count, len(data))
    rows = max(1, -(-count // cols))
    fig = Figure(figsize=(cols * 4.2, rows * 2.2), dpi=110, layout="constrained")
    axes = np.atleast_2d(fig.subplots(rows, 2 * cols, squeeze=False))
    cmap = colormaps["tab10"]
    for ax in axes.ravel():
        ax.set_axis_off()
    for i in range(count):
        image, target = data[i]
        ax_img, ax_seg = axes[i // cols, 2 * (i % cols)], axes[i // cols, 2 * (i % cols) + 1]
        ax_img.imshow(image[0].numpy(), cmap="gray", vmin=0, vmax=1)
        for (x1, y1, x2, y2), label in zip(
            target["boxes"].tolist(), target["labels"].tolist(), strict=True
        ):
            color = cmap(label - 1)
            # Boxes are pixel-edge coordinates; imshow centres pixel j at j, so edges are -0.5.
            ax_img.add_patch(
                Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, color=color, lw=1)
            )
            ax_img.text(
                x1 - 0.5, y1 - 1.5, FASHION_MNIST_CLASSES[label - 1], color=color, fontsize=6
            )
        semantic = seg[i][1].numpy()
        colored = np.zeros((*semantic.shape, 3))
        for c in range(1, len(FASHION_MNIST_CLASSES) + 1):
            colored[semantic == c] = cmap(c - 1)[:3]
        ax_seg.imshow(colored)
        ax_img.set_title(f"{split} {i}", fontsize=7)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out
