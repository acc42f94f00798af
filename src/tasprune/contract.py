"""The input contract: what a saved network expects, carried with it.

tasprune trains on normalised images ((x - mean) / std of the training data, x in [0, 1]), but
users feed what they have: ``ToTensor()`` floats in [0, 1], or uint8 pixels. A checkpoint
therefore records an :class:`InputContract` (channels, size, value range, mean/std), and
:func:`tasprune.load` and the exports return :class:`WithPreprocess`: the network with that
normalisation inside, so ``model(raw_images)`` gives the accuracy tasprune reported.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from tasprune.errors import TaspruneError

__all__ = [
    "FORMAT_VERSION",
    "InputContract",
    "InputError",
    "WithPreprocess",
    "contract_from_meta",
    "contract_of",
]

logger = logging.getLogger(__name__)

#: Version of the checkpoint meta. 1 (no ``format_version`` key): no input contract recorded;
#: 2: ``input`` (an InputContract) and ``augment`` (the resolved training augmentation).
FORMAT_VERSION = 2

_RANGE_SLACK = 1e-3  # float inputs may overshoot [0, 1] by rounding (e.g. after resizing)


class InputError(TaspruneError):
    """An input does not match the contract of the network it is fed to."""


@dataclass(frozen=True)
class InputContract:
    """What the network's ``forward`` accepts: N x C x H x W images, float in [0, 1] (what
    ``transforms.ToTensor`` gives) or uint8 in 0-255; normalised inside by ``mean``/``std``
    (per channel, on the 0-1 scale). ``mean``/``std`` None: fed to the network as given."""

    channels: int
    height: int
    width: int
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None

    def to_dict(self) -> dict[str, Any]:
        """JSON form, as stored in checkpoints and export metadata."""
        return {
            "channels": self.channels,
            "height": self.height,
            "width": self.width,
            "dtype": "float32 in [0, 1], or uint8 in [0, 255]",
            "layout": "NCHW",
            "mean": list(self.mean) if self.mean is not None else None,
            "std": list(self.std) if self.std is not None else None,
            "normalisation": "inside the model: (x - mean) / std"
            if self.mean is not None
            else "none: inputs reach the network as given",
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InputContract:
        mean, std = d.get("mean"), d.get("std")
        return cls(
            channels=int(d["channels"]),
            height=int(d["height"]),
            width=int(d["width"]),
            mean=tuple(float(v) for v in mean) if mean is not None else None,
            std=tuple(float(v) for v in std) if std is not None else None,
        )

    def describe(self) -> str:
        """``"N x 1 x 28 x 28 images, float in [0, 1] or uint8"``."""
        return (
            f"N x {self.channels} x {self.height} x {self.width} images, float in [0, 1] or uint8"
        )

    def check(self, x: Tensor) -> None:
        """Raise :class:`InputError` naming the expected input when ``x`` does not fit."""
        expected = (self.channels, self.height, self.width)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise InputError(
                f"input of shape {tuple(x.shape)} does not fit this model, which expects "
                f"{self.describe()}. Fix: resize to {self.height}x{self.width} with "
                f"{self.channels} channel(s) and add the batch axis"
            )
        if x.dtype == torch.uint8:
            return
        if not x.is_floating_point():
            raise InputError(
                f"input of dtype {x.dtype}: this model expects {self.describe()}. "
                "Fix: pass x.float() / 255 or the uint8 pixels"
            )
        if self.mean is None:
            return
        lo, hi = float(x.min()), float(x.max())
        if lo < -_RANGE_SLACK or hi > 1 + _RANGE_SLACK:
            raise InputError(
                f"input values lie in [{lo:.3g}, {hi:.3g}], but this model normalises inside "
                f"and expects {self.describe()}. Fix: pass the raw images (e.g. "
                "transforms.ToTensor() without Normalize); model.net takes normalised inputs"
            )


def contract_of(data: Any) -> InputContract:
    """The contract of a network trained on ``data`` (an ArrayDataset or a streamed split)."""
    h, w = data.image_size
    return InputContract(
        channels=int(data.in_channels),
        height=int(h),
        width=int(w),
        mean=tuple(float(v) for v in data.mean),
        std=tuple(float(v) for v in data.std),
    )


def contract_from_meta(meta: dict[str, Any], source: str) -> InputContract:
    """The contract a checkpoint's meta records; for a checkpoint older than contracts
    (format 1), the shipped dataset's published statistics, or none, with a warning."""
    stored = meta.get("input")
    if isinstance(stored, dict):
        return InputContract.from_dict(stored)
    from tasprune.datasets import DATASET_STATS

    size = meta.get("input_size") or [meta.get("in_channels", 3), 32, 32]
    c, h, w = (int(v) for v in size)
    dataset = str(meta.get("dataset", "")).strip().lower()
    stats = DATASET_STATS.get(dataset)
    if stats is not None:
        logger.warning(
            "%s was written before tasprune recorded input contracts; assuming the %s "
            "statistics (mean %s, std %s): the model expects N x %d x %d x %d images in [0, 1]",
            source,
            dataset,
            stats[0],
            stats[1],
            c,
            h,
            w,
        )
        return InputContract(c, h, w, stats[0], stats[1])
    logger.warning(
        "%s was written before tasprune recorded input contracts and its data (%s) has no "
        "known statistics: the model expects N x %d x %d x %d images normalised with the mean "
        "and std of its training data; normalise them yourself (retrain to record them)",
        source,
        dataset or "unknown",
        c,
        h,
        w,
    )
    return InputContract(c, h, w, None, None)


def _checking() -> bool:
    """False while tracing/exporting/compiling: the contract check is eager-only Python."""
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return False
    if torch.onnx.is_in_onnx_export():
        return False
    return not torch.compiler.is_compiling()


class WithPreprocess(nn.Module):
    """A trained network plus its input contract: ``forward(raw images) -> logits``.

    ``net`` is the bare network (normalised inputs), e.g. for fine-tuning or as a teacher;
    ``contract`` says what ``forward`` accepts. ``mean``/``std`` are buffers that are not
    saved in the state_dict (it stays the network's, under ``net.``): they come from the
    contract, which every checkpoint and export records.
    """

    mean: Tensor
    std: Tensor

    def __init__(self, net: nn.Module, contract: InputContract) -> None:
        super().__init__()
        self.net = net
        self.contract = contract
        c = contract.channels
        mean = contract.mean if contract.mean is not None else (0.0,) * c
        std = contract.std if contract.std is not None else (1.0,) * c
        self.register_buffer("mean", torch.tensor(mean).view(1, c, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, c, 1, 1), persistent=False)

    def preprocess(self, x: Tensor) -> Tensor:
        """Raw images (float in [0, 1] or uint8) -> the network's normalised input."""
        if _checking():
            self.contract.check(x)
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        return (x - self.mean) / self.std

    def forward(self, x: Tensor) -> Tensor:
        return self.net(self.preprocess(x))  # N x classes
