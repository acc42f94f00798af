"""The in-memory dataset container every stage reads: images as uint8 tensors plus labels.

Its own module so that the loaders of every source (`tasprune.data` for the official files,
`tasprune.imagefolder` for folders of images) build it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tasprune.errors import DataError

__all__ = ["ArrayDataset"]


@dataclass
class ArrayDataset:
    """A whole labelled image dataset held as two tensors.

    ``images`` stays uint8 (N x C x H x W) so it is 4x smaller than float32 and can live on the
    accelerator; ``mean``/``std`` (per channel, 0-1 scale) travel with it so the loader
    normalises exactly the way the dataset expects.
    """

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str

    def __post_init__(self) -> None:
        """Reject inconsistent containers early, where the cause is still obvious."""
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DataError(
                f"dataset {self.name!r}: images must be a uint8 N x C x H x W tensor, got "
                f"{self.images.dtype} with shape {tuple(self.images.shape)}. "
                "Fix: convert the images to uint8 NCHW before building an ArrayDataset"
            )
        if self.labels.dim() != 1 or self.labels.shape[0] != self.images.shape[0]:
            raise DataError(
                f"dataset {self.name!r}: {tuple(self.labels.shape)} labels for "
                f"{self.images.shape[0]} images. Fix: pass one int64 label per image"
            )
        if self.labels.dtype != torch.int64:
            self.labels = self.labels.to(torch.int64)
        channels = self.images.shape[1]
        if len(self.mean) != channels or len(self.std) != channels:
            raise DataError(
                f"dataset {self.name!r}: mean/std have {len(self.mean)}/{len(self.std)} entries "
                f"but the images have {channels} channels. Fix: give one mean and std per channel"
            )

    def __len__(self) -> int:
        """Number of samples."""
        return int(self.images.shape[0])

    @property
    def in_channels(self) -> int:
        """Channels per image (1 for Fashion-MNIST, 3 for CIFAR)."""
        return int(self.images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        """Image (height, width) in pixels."""
        return int(self.images.shape[2]), int(self.images.shape[3])

    def subset(self, idx: torch.Tensor) -> ArrayDataset:
        """Return the samples at ``idx`` (an index or boolean tensor) as a new dataset.

        Used to carve the TAS architecture/weight halves out of a training set while keeping
        the class count and normalisation constants.
        """
        idx = idx.to(self.images.device)
        return ArrayDataset(
            images=self.images[idx],
            labels=self.labels[idx.to(self.labels.device)],
            num_classes=self.num_classes,
            mean=self.mean,
            std=self.std,
            name=self.name,
        )
