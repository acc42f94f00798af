"""The layers the shipped networks are made of (conv + BN + activation, a projection
shortcut). Plain modules: tasprune searches and prunes them like any other network."""

from __future__ import annotations

from torch import Tensor, nn


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


def shortcut(in_w: int, out_w: int, stride: int, pool: bool = True) -> nn.Module:
    """The identity, or a `Projection` where the block changes width or resolution."""
    if stride != 1 or in_w != out_w:
        return Projection(in_w, out_w, stride, pool)
    return nn.Identity()
