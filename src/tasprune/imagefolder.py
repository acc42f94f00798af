"""ImageFolder trees: small ones in memory (an ArrayDataset), ImageNet-sized ones streamed.

``root/train/<class>/*.png`` and ``root/val/<class>/*`` (or ``root/test``) in torchvision's
ImageFolder layout. Small trees are decoded once into uint8 tensors so the device-resident
loader, the search split and every tasprune stage work on them unchanged. ImageNet-sized trees
are streamed with the standard torchvision transforms by a multi-worker DataLoader (sharded with
a DistributedSampler under torchrun).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import (
    DataLoader,
    DistributedSampler,
    RandomSampler,
    SequentialSampler,
    Subset,
)

from tasprune.arrays import ArrayDataset
from tasprune.errors import DataError

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_SPLIT_DIRS = {"train": ("train",), "test": ("val", "test", "validation")}


def split_dir(root: str | Path, split: str) -> Path:
    """The folder of ``split`` ("train" or "test", which also accepts val/validation)."""
    base = Path(root).expanduser()
    for name in _SPLIT_DIRS.get(split, (split,)):
        if (base / name).is_dir():
            return base / name
    wanted = " or ".join(f"{base}/{n}" for n in _SPLIT_DIRS.get(split, (split,)))
    raise DataError(
        f"ImageFolder split '{split}' not found: no {wanted}. Fix: pass --data-root DIR whose "
        "train/ and val/ folders hold one sub-folder of images per class"
    )


def _image_folder(folder: Path, transform: Any = None) -> Any:
    from torchvision.datasets import ImageFolder

    try:
        return ImageFolder(str(folder), transform=transform)
    except (FileNotFoundError, OSError) as err:
        raise DataError(
            f"cannot read ImageFolder {folder}: {err}. Fix: one sub-folder of images per class"
        ) from None


def load_imagefolder(root: str | Path, split: str, image_size: int | None = None) -> ArrayDataset:
    """Decode a small ImageFolder split into memory (RGB uint8, resized to ``image_size``).

    Without ``image_size`` every image must already have the same size. Mean/std are computed
    from the split itself.
    """
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms import functional as TF

    folder = split_dir(root, split)
    ds = _image_folder(folder)
    if len(ds.samples) == 0:
        raise DataError(f"ImageFolder {folder} holds no images. Fix: add images per class")
    images: list[Tensor] = []
    for path, _ in ds.samples:
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
        except (OSError, UnidentifiedImageError, ImportError):
            # ImportError: an Image.open another library replaced in the process (Ultralytics'
            # fallback for files PIL cannot identify installs a HEIF plugin, which fails offline)
            raise DataError(f"image {path} is unreadable. Fix: remove or replace it") from None
        if image_size is not None:
            img = TF.center_crop(TF.resize(img, image_size), [image_size, image_size])
        images.append(TF.pil_to_tensor(img))
    sizes = {tuple(t.shape) for t in images}
    if len(sizes) != 1:
        raise DataError(
            f"ImageFolder {folder} mixes image sizes {sorted(sizes)[:3]}. "
            "Fix: set data.image_size to resize them"
        )
    x = torch.stack(images)
    scaled = x.float() / 255
    mean = tuple(float(v) for v in scaled.mean((0, 2, 3)))
    std = tuple(max(float(v), 1e-3) for v in scaled.std((0, 2, 3)))
    labels = torch.tensor([y for _, y in ds.samples], dtype=torch.int64)
    return ArrayDataset(
        images=x,
        labels=labels,
        num_classes=len(ds.classes),
        mean=mean,
        std=std,
        name=f"imagefolder:{Path(root).name}",
    )


class StreamingLoader:
    """A DataLoader over an ImageFolder split with torchvision's standard ImageNet transforms.

    Train: RandomResizedCrop + horizontal flip; test: resize to 256/224 of the crop, then centre
    crop. Sharded by a DistributedSampler when ``world_size > 1``. Yields normalised float
    batches; offers ``set_epoch`` and ``len`` like `tasprune.data.DeviceLoader`.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        batch_size: int,
        *,
        train: bool,
        image_size: int = 224,
        workers: int = 4,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        indices: Sequence[int] | Tensor | None = None,
        folder: Any = None,
    ) -> None:
        from torchvision import transforms as T

        norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        if train:
            tf = T.Compose(
                [T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), norm]
            )
        else:
            resize = round(image_size * 256 / 224)
            tf = T.Compose([T.Resize(resize), T.CenterCrop(image_size), T.ToTensor(), norm])
        if folder is None:
            folder = _image_folder(split_dir(root, split))
        # A shallow copy of the file list with this loader's transform (listing ImageNet's
        # 1.28 M files once per run, not once per loader).
        base = _with_transform(folder, tf)
        self.num_classes = len(base.classes)
        self.dataset: Any = base
        if indices is not None:
            idx = indices.tolist() if isinstance(indices, Tensor) else list(indices)
            self.dataset = Subset(base, idx)
        self.in_channels = 3
        self.image_size = (image_size, image_size)
        self.sampler: Any
        if world_size > 1:
            self.sampler = DistributedSampler(
                self.dataset, world_size, rank, shuffle=train, seed=seed, drop_last=train
            )
        elif train:
            self.sampler = RandomSampler(
                self.dataset, generator=torch.Generator().manual_seed(seed)
            )
        else:
            self.sampler = SequentialSampler(self.dataset)
        self.seed = seed
        self.loader = DataLoader(
            self.dataset,
            batch_size=batch_size,
            sampler=self.sampler,
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            drop_last=train,
            persistent_workers=workers > 0,
        )

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for ``epoch`` (seeded, so a resumed run sees the same order)."""
        if isinstance(self.sampler, DistributedSampler):
            self.sampler.set_epoch(epoch)
        elif isinstance(self.sampler, RandomSampler) and self.sampler.generator is not None:
            self.sampler.generator.manual_seed(self.seed + epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return iter(self.loader)


def _with_transform(folder: Any, transform: Any) -> Any:
    import copy

    out = copy.copy(folder)  # shares the (samples, targets, classes) lists
    out.transform = transform
    return out


class StreamingFolder:
    """One split of an ImageFolder tree too large for memory (data.name ``imagenet``).

    Lists the files once and hands out `StreamingLoader`s over all of them or a subset; it offers
    what the stages read from an in-memory `ArrayDataset` (``labels``, ``len``, ``subset``,
    ``num_classes``, ``in_channels``, ``image_size``, ``name``), so the search split, the data
    subsets and the checks work unchanged.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        image_size: int = 224,
        workers: int = 8,
        *,
        folder: Any = None,
        indices: Tensor | None = None,
    ) -> None:
        self.root = Path(root).expanduser()
        self.split = split
        self.workers = workers
        self.folder = folder if folder is not None else _image_folder(split_dir(root, split))
        if len(self.folder) == 0:
            raise DataError(f"ImageFolder {self.root}/{split} has no images. Fix: check the tree")
        all_labels = torch.tensor(self.folder.targets, dtype=torch.long)
        self.indices = indices if indices is not None else torch.arange(len(all_labels))
        self.labels = all_labels[self.indices]
        self.num_classes = len(self.folder.classes)
        self.in_channels = 3
        self.image_size = (image_size, image_size)
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD  # what StreamingLoader normalises by
        self.name = f"imagenet:{self.root.name}"

    def __len__(self) -> int:
        return int(self.indices.numel())

    def subset(self, idx: Tensor) -> StreamingFolder:
        """The images at positions ``idx`` of this split (as `ArrayDataset.subset`)."""
        return StreamingFolder(
            self.root,
            self.split,
            self.image_size[0],
            self.workers,
            folder=self.folder,
            indices=self.indices[idx],
        )

    def loader(
        self,
        batch_size: int,
        *,
        train: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        part: Tensor | None = None,
    ) -> StreamingLoader:
        """A loader over this split (or the positions ``part`` of it), standard transforms."""
        idx = self.indices if part is None else self.indices[part]
        return StreamingLoader(
            self.root,
            self.split,
            batch_size,
            train=train,
            image_size=self.image_size[0],
            workers=self.workers,
            seed=seed,
            rank=rank,
            world_size=world_size,
            indices=idx,
            folder=self.folder,
        )
