"""Batches for training: the augmentation setting, the stratified split and a device-resident
batch loader, and the loaders of every stage built from them.

Why this module exists: the small benchmarks TAS is evaluated on (Fashion-MNIST, CIFAR-10/100,
read by `tasprune.datasets`) fit in a few hundred MB of uint8, so the fastest and most
reproducible way to train on them is to keep the raw bytes on the training device and do
shuffling, augmentation and normalisation as a handful of batched tensor ops per batch (the
"airbench" idea) instead of a per-image Python ``Dataset``/``DataLoader`` pipeline. Streamed
ImageNet-sized trees get multi-worker loaders instead (`tasprune.imagefolder`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from tasprune import distributed as ddp
from tasprune.arrays import ArrayDataset
from tasprune.errors import ConfigError, DataError
from tasprune.imagefolder import StreamingFolder

__all__ = [
    "FLIP_INVARIANT",
    "Augment",
    "ArrayDataset",
    "DeviceLoader",
    "as_augment",
    "search_loaders",
    "stratified_split",
    "train_test_loaders",
]

logger = logging.getLogger(__name__)

#: Datasets whose labels do not change under a horizontal mirror: flipping is on by default only
#: for these (a mirrored digit or letter is another class or no class at all).
FLIP_INVARIANT: tuple[str, ...] = ("fashion-mnist", "cifar10", "cifar100", "imagenet")
#: Random-crop padding (pixels) used by the measured recipes of the shipped datasets.
_KNOWN_PADDING: dict[str, int] = {"fashion-mnist": 2, "cifar10": 4, "cifar100": 4}


# --------------------------------------------------------------------------------------------
# Training augmentation
# --------------------------------------------------------------------------------------------


class Augment(BaseModel):
    """Training-time augmentation: random crop (zero padding, then a crop of the original size)
    and horizontal flip. One setting for the teacher, the search and the student alike.

    ``None`` fields fit the data (:meth:`resolve`): padding = the measured value for the
    shipped datasets (Fashion-MNIST 2, CIFAR 4), else 1/8 of the smaller image side (1 pixel
    at 8x8, 4 at 32x32); flip on only for datasets known to be mirror-invariant.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    crop_padding: int | None = Field(default=None, ge=0)  # pixels; 0 = no random crop
    flip: bool | None = None  # random horizontal flip

    def resolve(self, dataset: str, image_size: tuple[int, int]) -> Augment:
        """The concrete setting for ``dataset`` at ``image_size`` (H, W): no ``None`` left."""
        key = dataset.strip().lower()
        pad = self.crop_padding
        if pad is None:
            pad = _KNOWN_PADDING.get(key, min(image_size) // 8)
        flip = self.flip if self.flip is not None else key in FLIP_INVARIANT
        return Augment(crop_padding=pad, flip=flip)

    def describe(self) -> str:
        """``"crop padding 2, flip on"`` for logs."""
        pad = "auto" if self.crop_padding is None else str(self.crop_padding)
        flip = "auto" if self.flip is None else ("on" if self.flip else "off")
        return f"crop padding {pad}, flip {flip}"


def as_augment(value: Augment | dict[str, Any] | None) -> Augment:
    """An :class:`Augment` from itself, a mapping of its fields, or None (fit the data)."""
    if value is None:
        return Augment()
    if isinstance(value, Augment):
        return value
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(Augment.model_fields))
        if unknown:
            raise ConfigError(
                f"unknown augment key {unknown[0]!r}. Fix: use crop_padding and/or flip"
            )
        try:
            return Augment(**value)
        except ValueError as err:
            raise ConfigError(
                f"augment {value!r} is invalid ({str(err).splitlines()[0]}). "
                "Fix: crop_padding is a pixel count >= 0, flip true or false"
            ) from None
    raise ConfigError(f"augment must be a mapping or Augment, got {type(value).__name__}")


# --------------------------------------------------------------------------------------------
# Splitting
# --------------------------------------------------------------------------------------------


def stratified_split(
    labels: torch.Tensor, fraction: float = 0.5, seed: int = 0, *, min_b: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split sample indices into two disjoint, class-balanced, sorted index tensors (A, B).

    TAS trains the architecture parameters and the weights on two halves of the training set;
    stratifying keeps every class represented in both. Per class ``c`` with ``n_c`` samples,
    the first ``round(fraction * n_c)`` entries of a seeded permutation go to A, the rest to B.
    Deterministic for a given ``seed``; A and B together cover every index exactly once.
    ``min_b``: B gets at least that many of every class that has more than ``min_b`` samples.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(
            f"split fraction {fraction} is outside [0, 1]. Fix: pass a fraction such as 0.5"
        )
    labels = labels.detach().cpu().reshape(-1)
    gen = torch.Generator().manual_seed(seed)
    part_a: list[torch.Tensor] = []
    part_b: list[torch.Tensor] = []
    for cls in torch.unique(labels, sorted=True).tolist():
        members = torch.nonzero(labels == cls, as_tuple=False).reshape(-1)
        shuffled = members[torch.randperm(members.numel(), generator=gen)]
        k = round(fraction * members.numel())
        if members.numel() > min_b:
            k = min(k, members.numel() - min_b)
        part_a.append(shuffled[:k])
        part_b.append(shuffled[k:])
    empty = torch.empty(0, dtype=torch.int64)
    a = torch.cat(part_a).sort().values if part_a else empty
    b = torch.cat(part_b).sort().values if part_b else empty
    return a, b


# --------------------------------------------------------------------------------------------
# Device-resident loader
# --------------------------------------------------------------------------------------------


class DeviceLoader:
    """Iterate an :class:`ArrayDataset` in normalised float32 batches without worker processes.

    The uint8 images are copied to ``device`` once. Each epoch draws, from a private
    ``torch.Generator`` seeded with ``seed + epoch``, a permutation plus per-sample crop
    offsets and flip bits (on the CPU, so results are bit-identical on every device), then each
    batch is gathered, augmented and normalised with a few whole-batch tensor ops: random crop
    = zero-pad the batch and gather every sample's window with one advanced-indexing op; flip =
    ``torch.where`` on a per-sample mask. Augmentation happens only when ``train`` is true.

    With ``world_size > 1`` every rank computes the same global order, truncates it to a
    multiple of ``world_size`` and keeps every ``world_size``-th sample starting at ``rank``;
    rank shards are disjoint, equally long (``len(data) // world_size``) and batch ``i`` of all
    ranks together is global batch ``i``. ``batch_size`` is the per-rank batch.

    Epochs: :meth:`set_epoch` picks the epoch the next iteration uses; without it, successive
    iterations use epochs 0, 1, 2, ... :meth:`state_dict` stores the next epoch for resuming.
    """

    def __init__(
        self,
        data: ArrayDataset,
        batch_size: int,
        *,
        train: bool,
        device: torch.device | str = "cpu",
        augment: Augment | None = None,
        drop_last: bool | None = None,
        seed: int = 0,
        channels_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch size {batch_size} must be >= 1. Fix: pass a positive batch")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(
                f"rank {rank} / world size {world_size} is invalid. Fix: use 0 <= rank < world_size"
            )
        if len(data) // world_size == 0:
            raise DataError(
                f"dataset {data.name!r} has {len(data)} samples, fewer than the {world_size} "
                "ranks. Fix: use fewer processes or a larger dataset"
            )
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.train = train
        # No augment: none at all. Fields left None fit the data (Augment.resolve).
        aug = (augment or Augment(crop_padding=0, flip=False)).resolve(data.name, data.image_size)
        self.augment = aug
        self.crop_padding = int(aug.crop_padding or 0) if train else 0
        self.flip = bool(aug.flip) and train
        self.drop_last = train if drop_last is None else drop_last
        self.seed = seed
        self.channels_last = channels_last
        self.rank = rank
        self.world_size = world_size
        self.num_classes = data.num_classes
        self.epoch = 0
        self.images = data.images.to(self.device)
        self.labels = data.labels.to(self.device)
        self._n_total = len(data)
        self._n_local = self._n_total // world_size
        shape = (1, data.in_channels, 1, 1)
        self._mean = torch.tensor(data.mean, dtype=torch.float32, device=self.device).view(shape)
        self._std = torch.tensor(data.std, dtype=torch.float32, device=self.device).view(shape)
        self._generator = torch.Generator()

    def __len__(self) -> int:
        """Batches per epoch for this rank."""
        if self.drop_last:
            return self._n_local // self.batch_size
        return math.ceil(self._n_local / self.batch_size)

    @property
    def num_samples(self) -> int:
        """Samples this rank sees per epoch (before ``drop_last`` trims a short last batch)."""
        return self._n_local

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration use epoch ``epoch`` (its order/augmentation seed is seed+epoch)."""
        self.epoch = int(epoch)

    def state_dict(self) -> dict[str, int]:
        """The epoch the next iteration will use, for checkpoint/resume."""
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore the epoch counter saved by :meth:`state_dict`."""
        self.epoch = int(state["epoch"])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(x, y)``: float32 normalised images and int64 labels on ``device``.

        The epoch's randomness is drawn immediately and the counter advanced, so calling
        ``iter()`` twice without :meth:`set_epoch` gives two different epochs.
        """
        epoch = self.epoch
        self.epoch += 1
        gen = self._generator
        gen.manual_seed(self.seed + epoch)
        n = self._n_total
        order = torch.randperm(n, generator=gen) if self.train else torch.arange(n)
        pad = self.crop_padding
        offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=gen) if pad else None
        flips = torch.rand(n, generator=gen) < 0.5 if self.flip else None
        # This rank's positions in the global order: every world_size-th, starting at rank.
        positions = torch.arange(self.rank, self._n_local * self.world_size, self.world_size)
        order = order[positions].to(self.device)
        if offsets is not None:
            offsets = offsets[positions].to(self.device)
        if flips is not None:
            flips = flips[positions].to(self.device)
        return self._batches(order, offsets, flips)

    def _batches(
        self,
        order: torch.Tensor,
        offsets: torch.Tensor | None,
        flips: torch.Tensor | None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Generator over one epoch's batches given its precomputed per-sample randomness."""
        for i in range(len(self)):
            sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
            idx = order[sl]
            x = self.images[idx]
            if offsets is not None:
                x = self._crop(x, offsets[sl])
            if flips is not None:
                x = torch.where(flips[sl].view(-1, 1, 1, 1), x.flip(3), x)
            out = x.to(torch.float32).div_(255.0).sub_(self._mean).div_(self._std)
            if self.channels_last:
                out = out.contiguous(memory_format=torch.channels_last)
            yield out, self.labels[idx]

    def _crop(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Random crop: zero-pad the batch, then gather each sample's H x W window at once.

        ``offsets[b] = (dy, dx)`` in ``[0, 2 * pad]`` is the window's top-left corner in the
        padded image, so output pixel (h, w) of sample b is padded[b, :, dy + h, dx + w].
        """
        pad = self.crop_padding
        b, c, h, w = x.shape
        padded = F.pad(x, (pad, pad, pad, pad))
        dev = x.device
        rows = offsets[:, 0:1] + torch.arange(h, device=dev)  # B x H
        cols = offsets[:, 1:2] + torch.arange(w, device=dev)  # B x W
        bi = torch.arange(b, device=dev).view(b, 1, 1, 1)
        ci = torch.arange(c, device=dev).view(1, c, 1, 1)
        return padded[bi, ci, rows.view(b, 1, h, 1), cols.view(b, 1, 1, w)]


def train_test_loaders(
    train: Any,
    test: Any,
    batch_size: int,
    *,
    augment: Augment | dict[str, Any] | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> tuple[Any, Any]:
    """The (train, test) loaders of a training stage (teacher, student, ``tasprune train``).

    The train split is augmented (``augment``, None: fit the data) and, under torchrun,
    sharded per rank (``batch_size`` is global: each rank gets its share); the test split is
    whole on every rank. In-memory data gets device-resident `DeviceLoader`s; a streamed
    split (`tasprune.imagefolder.StreamingFolder`) multi-worker loaders with the standard
    ImageNet transforms (RandomResizedCrop + flip instead of ``augment``).
    """
    rank, world = ddp.get_rank(), ddp.get_world_size()
    batch = ddp.per_rank_batch(batch_size, world)
    if isinstance(train, StreamingFolder):
        return (
            train.loader(batch, train=True, seed=seed, rank=rank, world_size=world),
            test.loader(batch_size, train=False),
        )
    aug = as_augment(augment).resolve(train.name, train.image_size)
    logger.info("training augmentation: %s", aug.describe())
    return (
        DeviceLoader(
            train,
            batch,
            train=True,
            device=device,
            augment=aug,
            seed=seed,
            rank=rank,
            world_size=world,
        ),  # fmt: skip
        DeviceLoader(test, batch_size, train=False, device=device),
    )


def search_loaders(
    train: Any,
    batch_size: int,
    *,
    augment: Augment | dict[str, Any] | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
    world: tuple[int, int] | None = None,
    holdout: float = 0.0,
    one_split: bool = False,
) -> tuple[Any, Any, Any]:
    """(split A, split B, validation) loaders of a TAS search: a stratified 50/50 split of the
    training images (weights train on A, the architecture on B), both augmented and sharded
    per rank under torchrun (``world`` = (rank, world size) overrides the process group's);
    in-memory or streamed as :func:`train_test_loaders`.

    ``holdout`` (a fraction of B, stratified) is kept from the architecture steps and is the
    validation set that ranks the in-band shapes; 0 validates on B itself, as the paper.
    ``one_split`` (the joint search step): A and what B keeps are one training loader, and
    the second loader is None."""
    idx_a, idx_b = stratified_split(train.labels, 0.5, seed)
    idx_val = idx_b
    if holdout > 0:
        # At least one image of every class is held out (small data sets).
        keep, held = stratified_split(train.labels[idx_b], 1.0 - holdout, seed + 1, min_b=1)
        if held.numel() == 0 or keep.numel() == 0:
            raise ConfigError(
                f"search.holdout {holdout} leaves no images on one side of split B "
                f"({idx_b.numel()} images). Fix: use more training images or holdout 0"
            )
        idx_b, idx_val = idx_b[keep], idx_b[held]
    if one_split:
        idx_a = torch.cat([idx_a, idx_b]).sort().values
    rank, size = world if world is not None else (ddp.get_rank(), ddp.get_world_size())
    batch = ddp.per_rank_batch(batch_size, size)
    if isinstance(train, StreamingFolder):
        return (
            train.loader(batch, train=True, seed=seed, rank=rank, world_size=size, part=idx_a),
            None
            if one_split
            else train.loader(
                batch, train=True, seed=seed + 10_000, rank=rank, world_size=size, part=idx_b
            ),
            train.loader(batch, train=False, rank=rank, world_size=size, part=idx_val),
        )
    aug = as_augment(augment).resolve(train.name, train.image_size)
    logger.info("search augmentation: %s", aug.describe())

    def half(idx: torch.Tensor, training: bool, offset: int) -> DeviceLoader:
        return DeviceLoader(
            train.subset(idx),
            batch,
            train=training,
            device=device,
            augment=aug if training else None,
            seed=seed + offset,
            rank=rank,
            world_size=size,
        )

    second = None if one_split else half(idx_b, True, 10_000)
    return half(idx_a, True, 0), second, half(idx_val, False, 0)
