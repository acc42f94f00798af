"""ResNets (He et al. 2016): one definition for the CIFAR and the ImageNet variants.

A `ResNetArch` says what differs: the stem (CIFAR: 3x3 stride-1 conv of 16 channels; ImageNet:
7x7 stride-2 conv of 64 and a 3x3 stride-2 max-pool), the planes per stage (16/32/64 or
64/128/256/512), the blocks per stage, and how a strided projection shortcut downsamples
(CIFAR: 2x2 avg-pool then 1x1 conv + BN; ImageNet, as torchvision: a strided 1x1 conv + BN).
Blocks are basic (3x3, 3x3) or bottleneck (1x1, 3x3, 1x1, expansion 4); the stride is on the
first 3x3 conv (torchvision's v1.5). Parameter names: ``stem``, ``layer{s}.{j}.conv{k}``,
``layer{s}.{j}.shortcut``, ``fc`` (see `tasprune.models.torchvision_compat` for loading
torchvision checkpoints). A plain network: tasprune reads its search space off the graph.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from tasprune.models.layers import ConvBN, shortcut
from tasprune.models.zoo import ship


@dataclass(frozen=True)
class ResNetArch:
    """What one ResNet variant is made of."""

    block: str  # "basic" | "bottleneck"
    layers: tuple[int, ...]  # blocks per stage
    planes: tuple[int, ...]  # planes per stage (a bottleneck's last conv writes 4x)
    stem: int  # stem conv width
    stem_kernel: int
    stem_stride: int
    maxpool: bool  # 3x3 stride-2 max-pool after the stem
    pool_shortcut: bool  # strided projection: avg-pool + 1x1 conv (else a strided 1x1 conv)

    @staticmethod
    def cifar(block: str, depth: int) -> ResNetArch:
        """depth = 6N+2 (basic) or 9N+2 (bottleneck): N blocks in each of 3 stages."""
        n = (depth - 2) // (6 if block == "basic" else 9)
        return ResNetArch(block, (n, n, n), (16, 32, 64), 16, 3, 1, False, True)

    @staticmethod
    def imagenet(block: str, layers: tuple[int, int, int, int]) -> ResNetArch:
        return ResNetArch(block, layers, (64, 128, 256, 512), 64, 7, 2, True, False)

    @property
    def expansion(self) -> int:
        return 1 if self.block == "basic" else 4

    @property
    def kernels(self) -> tuple[int, ...]:
        return (3, 3) if self.block == "basic" else (1, 3, 1)


class Block(nn.Module):
    """Basic (3x3, 3x3) or bottleneck (1x1, 3x3, 1x1) block, stride on the first 3x3 conv."""

    # An identity shortcut tasprune may replace by a 1x1 projection where a pruned shape gives
    # the block different input and output widths (independent residual widths).
    tasprune_shortcut = "shortcut"

    def __init__(self, in_w: int, planes: int, arch: ResNetArch, stride: int) -> None:
        super().__init__()
        kernels = arch.kernels
        strided = kernels.index(3)  # the first 3x3 conv carries the stride
        self.convs = tuple(f"conv{i + 1}" for i in range(len(kernels)))
        prev = in_w
        for i, (name, kernel) in enumerate(zip(self.convs, kernels, strict=True)):
            last = i == len(kernels) - 1
            w = planes * arch.expansion if last else planes
            act = None if last else "relu"
            self.add_module(name, ConvBN(prev, w, kernel, stride if i == strided else 1, act))
            prev = w
        self.shortcut = shortcut(in_w, prev, stride, arch.pool_shortcut)
        self.act = nn.ReLU(inplace=True)
        self.out_width = prev

    def forward(self, x: Tensor) -> Tensor:
        out = x
        for name in self.convs:
            out = getattr(self, name)(out)
        return self.act(out + self.shortcut(x))


class ResNet(nn.Module):
    """stem conv (+ max-pool) -> stages of residual blocks -> global average pool -> linear."""

    def __init__(self, arch: ResNetArch, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = ConvBN(in_channels, arch.stem, arch.stem_kernel, arch.stem_stride, "relu")
        self.maxpool = nn.MaxPool2d(3, 2, 1) if arch.maxpool else None
        cur = arch.stem
        self.stage_names: list[str] = []
        for s, (planes, blocks) in enumerate(zip(arch.planes, arch.layers, strict=True), 1):
            stage = []
            for j in range(blocks):
                block = Block(cur, planes, arch, 2 if s > 1 and j == 0 else 1)
                cur = block.out_width
                stage.append(block)
            self.add_module(f"layer{s}", nn.Sequential(*stage))
            self.stage_names.append(f"layer{s}")
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cur, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d) and m.affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.stem(x)  # N, stem, H / stem_stride, W / stem_stride
        if self.maxpool is not None:
            x = self.maxpool(x)
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return x  # N, C_last, H', W'

    def forward_head(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(x).flatten(1))  # N, classes

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _register(name: str, arch: ResNetArch, text: str, size: tuple[int, int, int]) -> None:
    @ship(name, size, text)
    def build(num_classes: int, in_channels: int) -> nn.Module:
        return ResNet(arch, num_classes, in_channels)


for _depth in (20, 32, 44, 56, 110):
    _arch = ResNetArch.cifar("basic", _depth)
    _text = f"CIFAR ResNet-{_depth} (basic blocks, {_arch.layers[0]} per stage)"
    _register(f"cifar_resnet{_depth}", _arch, _text, (3, 32, 32))
_register(
    "cifar_resnet164",
    ResNetArch.cifar("bottleneck", 164),
    "CIFAR ResNet-164 (bottleneck blocks, 18 per stage)",
    (3, 32, 32),
)
for _depth, _block, _layers in (
    (18, "basic", (2, 2, 2, 2)),
    (34, "basic", (3, 4, 6, 3)),
    (50, "bottleneck", (3, 4, 6, 3)),
):
    _register(
        f"resnet{_depth}",
        ResNetArch.imagenet(_block, _layers),
        f"ImageNet ResNet-{_depth} (torchvision v1.5 topology, {_block} blocks {list(_layers)})",
        (3, 224, 224),
    )
