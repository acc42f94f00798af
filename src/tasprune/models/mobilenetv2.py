"""MobileNetV2 (Sandler et al. 2018; torchvision's topology at width 1.0).

stem 3x3/2 conv (32) -> 17 inverted residual blocks in 7 groups (t, c, n, s) -> 1x1 conv
(1280) -> global average pool -> dropout -> linear; ReLU6 everywhere except after the
projection convs. Block ``stage{k}.{j}`` (group k, repeat j) is: 1x1 expansion conv
(``expand``; absent when t = 1) -> 3x3 depthwise conv (``dw``) -> 1x1 linear projection
(``project``) [+ identity shortcut where input and output widths and sizes agree]. A plain
network: tasprune reads its search space off the graph (the depthwise conv's width follows
its expansion there, a stage's later blocks may be skipped).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from torch import Tensor, nn

from tasprune.models.layers import ConvBN
from tasprune.models.zoo import ship

# (expansion t, out channels c, repeats n, stride s of the first repeat), torchvision's order.
SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


@dataclass(frozen=True)
class BlockInfo:
    """One inverted residual block of the unpruned net."""

    stage: str
    index: int
    expansion: int
    stride: int
    in_w: int  # unpruned input width
    out_w: int  # unpruned output width
    residual: bool  # has a residual connection

    @property
    def name(self) -> str:
        return f"{self.stage}.{self.index}"


@dataclass(frozen=True)
class MobileNetV2Arch:
    """Widths of the unpruned MobileNetV2 (torchvision, width multiplier 1.0)."""

    setting: tuple[tuple[int, int, int, int], ...] = SETTING
    stem: int = 32
    head: int = 1280
    dropout: float = 0.2  # before the classifier, training only

    def stages(self) -> list[tuple[str, list[BlockInfo]]]:
        """(stage name, its blocks) per group of the setting."""
        out: list[tuple[str, list[BlockInfo]]] = []
        cur = self.stem
        for k, (t, c, n, s) in enumerate(self.setting, start=1):
            blocks = []
            for j in range(n):
                stride = s if j == 0 else 1
                info = BlockInfo(f"stage{k}", j, t, stride, cur, c, stride == 1 and cur == c)
                blocks.append(info)
                cur = c
            out.append((f"stage{k}", blocks))
        return out

    def blocks(self) -> Iterator[BlockInfo]:
        for _, blocks in self.stages():
            yield from blocks


class InvertedResidual(nn.Module):
    """[1x1 expand + ReLU6] -> 3x3 depthwise + ReLU6 -> 1x1 project (linear) [+ shortcut]."""

    # An identity shortcut tasprune may replace by a 1x1 projection where a pruned shape gives
    # the block different input and output widths (independent residual widths).
    tasprune_shortcut = "shortcut"

    def __init__(self, info: BlockInfo) -> None:
        super().__init__()
        convs: list[str] = []
        hidden = info.in_w * info.expansion
        if info.expansion != 1:
            self.expand = ConvBN(info.in_w, hidden, 1, 1, "relu6")
            convs.append("expand")
        self.dw = ConvBN(hidden, hidden, 3, info.stride, "relu6", groups=hidden)
        self.project = ConvBN(hidden, info.out_w, 1, 1, None)
        self.convs = (*convs, "dw", "project")
        self.residual = info.residual
        if info.residual:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = x
        for c in self.convs:
            out = getattr(self, c)(out)
        if self.residual:
            out = out + self.shortcut(x)
        return out


class MobileNetV2(nn.Module):
    """stem -> 7 stages of inverted residual blocks -> 1x1 head conv -> pool -> linear."""

    def __init__(
        self, arch: MobileNetV2Arch | None = None, num_classes: int = 1000, in_channels: int = 3
    ) -> None:
        super().__init__()
        arch = arch or MobileNetV2Arch()
        self.stem = ConvBN(in_channels, arch.stem, 3, 2, "relu6")
        self.stage_names: list[str] = []
        cur = arch.stem
        for stage, infos in arch.stages():
            self.add_module(stage, nn.Sequential(*(InvertedResidual(i) for i in infos)))
            self.stage_names.append(stage)
            cur = infos[-1].out_w
        self.head = ConvBN(cur, arch.head, 1, 1, "relu6")
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(arch.dropout)
        self.fc = nn.Linear(arch.head, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        """torchvision's initialisation."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d) and m.affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.stem(x)  # N, 32, H/2, W/2
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return self.head(x)  # N, 1280, H/32, W/32

    def forward_head(self, x: Tensor) -> Tensor:
        return self.fc(self.dropout(self.pool(x).flatten(1)))  # N, classes

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


@ship(
    "mobilenet_v2",
    (3, 224, 224),
    "MobileNetV2 1.0 (torchvision topology)",
)
def mobilenet_v2(num_classes: int, in_channels: int) -> nn.Module:
    return MobileNetV2(MobileNetV2Arch(), num_classes, in_channels)
