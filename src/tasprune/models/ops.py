"""Layer factories: one model definition, built either as a plain network or as a supernet.

A model family writes its topology once against the `Ops` interface. `PlainOps` builds the
physically sized network of a Shape; the search package provides ops that build searchable
units with the same parameter names, so weights move between the two without renaming.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor, nn

from tasprune.models.algebra import needs_projection


class Ops(Protocol):
    """What a model definition asks of its layer factory."""

    def conv_bn(
        self, name: str, in_w: int, out_w: int, kernel: int, stride: int, *, act: str | None
    ) -> nn.Module: ...

    def shortcut(
        self, name: str, in_w: int, out_w: int, stride: int, width_of: str, *, pool: bool = True
    ) -> nn.Module: ...

    def depthwise_bn(
        self, name: str, width_of: str, channels: int, kernel: int, stride: int, *, act: str | None
    ) -> nn.Module:
        """Depthwise conv + BN whose width is tied to the conv ``width_of`` that feeds it."""
        ...

    def residual(self) -> nn.Module: ...

    def stage(self, name: str, blocks: list[nn.Module]) -> nn.Module: ...

    def linear(self, name: str, in_w: int, out_w: int) -> nn.Module: ...


def activation(act: str | None) -> nn.Module:
    if act is None:
        return nn.Identity()
    if act == "relu":
        return nn.ReLU(inplace=True)
    if act == "relu6":
        return nn.ReLU6(inplace=True)
    raise ValueError(f"unknown activation {act!r}")


class ConvBN(nn.Sequential):
    """conv (no bias) -> BatchNorm -> optional activation."""

    def __init__(
        self, in_w: int, out_w: int, kernel: int, stride: int, act: str | None, groups: int = 1
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_w, out_w, kernel, stride, kernel // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_w)
        self.act = activation(act)


class Projection(nn.Module):
    """Shortcut of a block that changes width/resolution: [2x2 avg-pool] -> 1x1 conv -> BN.

    ``pool=False`` gives torchvision's downsample instead: a strided 1x1 conv (same MACs at the
    output resolution, but it reads only every ``stride``-th pixel).
    """

    def __init__(self, in_w: int, out_w: int, stride: int, pool: bool = True) -> None:
        super().__init__()
        self.pool: nn.Module = (
            nn.AvgPool2d(stride, stride, ceil_mode=True) if pool and stride > 1 else nn.Identity()
        )
        conv_stride = 1 if pool else stride
        self.conv = nn.Conv2d(in_w, out_w, 1, conv_stride, 0, bias=False)
        self.bn = nn.BatchNorm2d(out_w)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(self.pool(x)))


class Add(nn.Module):
    """Residual addition of two equally wide tensors."""

    def forward(self, branch: Tensor, shortcut: Tensor) -> Tensor:
        return branch + shortcut


class PlainOps:
    """Builds the physically sized network of a Shape."""

    def conv_bn(
        self, name: str, in_w: int, out_w: int, kernel: int, stride: int, *, act: str | None
    ) -> nn.Module:
        return ConvBN(in_w, out_w, kernel, stride, act)

    def shortcut(
        self, name: str, in_w: int, out_w: int, stride: int, width_of: str, *, pool: bool = True
    ) -> nn.Module:
        if needs_projection(in_w, out_w, stride):
            return Projection(in_w, out_w, stride, pool)
        return nn.Identity()

    def depthwise_bn(
        self, name: str, width_of: str, channels: int, kernel: int, stride: int, *, act: str | None
    ) -> nn.Module:
        return ConvBN(channels, channels, kernel, stride, act, groups=channels)

    def residual(self) -> nn.Module:
        return Add()

    def stage(self, name: str, blocks: list[nn.Module]) -> nn.Module:
        return nn.Sequential(*blocks)

    def linear(self, name: str, in_w: int, out_w: int) -> nn.Module:
        return nn.Linear(in_w, out_w)
