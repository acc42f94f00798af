"""ResNets (He et al. 2016), built from any Shape: one definition for the CIFAR and the
ImageNet variants.

A `ResNetArch` says what differs: the stem (CIFAR: 3x3 stride-1 conv of 16 channels; ImageNet:
7x7 stride-2 conv of 64 and a 3x3 stride-2 max-pool), the planes per stage (16/32/64 or
64/128/256/512), the blocks per stage, and how a strided projection shortcut downsamples
(CIFAR: 2x2 avg-pool then 1x1 conv + BN; ImageNet, as torchvision: a strided 1x1 conv + BN).
Blocks are basic (3x3, 3x3) or bottleneck (1x1, 3x3, 1x1, expansion 4); the stride is on the
first 3x3 conv (torchvision's v1.5). A block whose input and output widths differ, or that
downsamples, has a projection shortcut, so every per-conv width choice gives a valid network.
Parameter names: ``stem``, ``layer{s}.{j}.conv{k}``, ``layer{s}.{j}.shortcut``, ``fc`` (see
`tasprune.models.torchvision_compat` for loading torchvision checkpoints).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor, nn

from tasprune.models.algebra import Counter, conv_out
from tasprune.models.ops import Ops
from tasprune.models.registry import ModelSpec, register_model
from tasprune.shape import Shape


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
    def conv_names(self) -> tuple[str, ...]:
        return ("conv1", "conv2") if self.block == "basic" else ("conv1", "conv2", "conv3")

    @property
    def kernels(self) -> tuple[int, ...]:
        return (3, 3) if self.block == "basic" else (1, 3, 1)

    @property
    def strided_index(self) -> int:
        """Which conv of a block carries the stride: the first 3x3 one."""
        return self.kernels.index(3)

    def full_shape(self) -> Shape:
        widths = {"stem": self.stem}
        depths = {}
        for s, (planes, blocks) in enumerate(zip(self.planes, self.layers, strict=True), start=1):
            depths[f"layer{s}"] = blocks
            for j in range(blocks):
                for c in self.conv_names:
                    last = c == self.conv_names[-1]
                    widths[f"layer{s}.{j}.{c}"] = planes * (self.expansion if last else 1)
        return Shape(widths=widths, depths=depths)

    def residual_groups(self) -> list[list[str]]:
        """Per stage, the convs that write its residual stream. The stem joins layer1's group
        only where their widths match in the unpruned net (basic blocks; not a bottleneck
        net, whose layer1 writes 4x the stem's channels)."""
        last = self.conv_names[-1]
        groups = []
        for s, blocks in enumerate(self.layers, start=1):
            group = [f"layer{s}.{j}.{last}" for j in range(blocks)]
            if s == 1 and self.planes[0] * self.expansion == self.stem:
                group.insert(0, "stem")
            groups.append(group)
        return groups


def _stride(stage: int, index: int) -> int:
    return 2 if stage > 1 and index == 0 else 1


class Block(nn.Module):
    """Basic (3x3, 3x3) or bottleneck (1x1, 3x3, 1x1) block, stride on the first 3x3 conv."""

    # An identity shortcut tasprune may replace by a 1x1 projection where a pruned shape gives
    # the block different input and output widths (independent residual widths).
    tasprune_shortcut = "shortcut"

    def __init__(
        self,
        ops: Ops,
        name: str,
        in_w: int,
        widths: Mapping[str, int],
        arch: ResNetArch,
        stride: int,
    ) -> None:
        super().__init__()
        convs = arch.conv_names
        prev = in_w
        for i, (c, kernel) in enumerate(zip(convs, arch.kernels, strict=True)):
            w = widths[f"{name}.{c}"]
            last = i == len(convs) - 1
            conv_stride = stride if i == arch.strided_index else 1
            self.add_module(
                c,
                ops.conv_bn(
                    f"{name}.{c}", prev, w, kernel, conv_stride, act=None if last else "relu"
                ),
            )
            prev = w
        self.convs = convs
        self.shortcut = ops.shortcut(
            f"{name}.shortcut",
            in_w,
            prev,
            stride,
            width_of=f"{name}.{convs[-1]}",
            pool=arch.pool_shortcut,
        )
        self.add = ops.residual()
        self.act = nn.ReLU(inplace=True)
        self.out_width = prev

    def forward(self, x: Tensor) -> Tensor:
        out = x
        for c in self.convs:
            out = getattr(self, c)(out)
        return self.act(self.add(out, self.shortcut(x)))


class ResNet(nn.Module):
    """stem conv (+ max-pool) -> stages of residual blocks -> global average pool -> linear."""

    def __init__(
        self,
        arch: ResNetArch,
        shape: Shape,
        num_classes: int = 10,
        in_channels: int = 3,
        ops: Ops | None = None,
    ) -> None:
        super().__init__()
        from tasprune.models.ops import PlainOps

        ops = ops or PlainOps()
        w = shape.widths
        self.stem = ops.conv_bn(
            "stem", in_channels, w["stem"], arch.stem_kernel, arch.stem_stride, act="relu"
        )
        self.maxpool = nn.MaxPool2d(3, 2, 1) if arch.maxpool else None
        cur = w["stem"]
        self.stage_names: list[str] = []
        for s in range(1, len(arch.layers) + 1):
            blocks: list[nn.Module] = []
            for j in range(shape.depths[f"layer{s}"]):
                block = Block(ops, f"layer{s}.{j}", cur, w, arch, _stride(s, j))
                cur = block.out_width
                blocks.append(block)
            self.add_module(f"layer{s}", ops.stage(f"layer{s}", blocks))
            self.stage_names.append(f"layer{s}")
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = ops.linear("fc", cur, num_classes)
        self.num_features = cur
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


def resnet_cost(
    arch: ResNetArch, c: Counter, in_channels: int, hw: tuple[int, int], num_classes: int
) -> None:
    """The cost of `ResNet`, written once for the exact and the expected algebra."""
    a = c.alg
    k, st = arch.stem_kernel, arch.stem_stride
    h, w = conv_out(hw[0], k, st), conv_out(hw[1], k, st)
    x = a.width("stem")
    c.conv(a.const(in_channels), x, k, (h, w), stride=st, in_size=hw, image=True)
    if arch.maxpool:
        h, w = conv_out(h, 3, 2), conv_out(w, 3, 2)  # max-pool 3x3/2, padding 1: no MACs
    for s in range(1, len(arch.layers) + 1):
        stage = f"layer{s}"
        outs = []
        for j in range(arch.layers[s - 1]):
            keep = a.keep(stage, j)
            stride = _stride(s, j)
            bh, bw = conv_out(h, 3, stride), conv_out(w, 3, stride)
            cin = x
            for i, (name, kernel) in enumerate(zip(arch.conv_names, arch.kernels, strict=True)):
                cout = a.width(f"{stage}.{j}.{name}")
                # Convs up to the strided one see the block's input size, the rest its output.
                size = (h, w) if i < arch.strided_index else (bh, bw)
                seen = (h, w) if i <= arch.strided_index else (bh, bw)
                conv_stride = stride if i == arch.strided_index else 1
                c.conv(cin, cout, kernel, size, keep, stride=conv_stride, in_size=seen)
                cin = cout
            # At the output resolution: as many MACs as pool + 1x1 conv or a strided 1x1 conv.
            c.projection(x, cin, stride, (bh, bw), keep)
            x = cin
            outs.append(x)
            if j == 0:
                h, w = bh, bw
        x = a.stage_output(stage, outs)
    c.linear(x, num_classes)


def _spec(
    name: str, arch: ResNetArch, description: str, default_input: tuple[int, int, int]
) -> ModelSpec:
    def build(shape: Shape, num_classes: int, in_channels: int, ops: Ops) -> nn.Module:
        return ResNet(arch, shape, num_classes, in_channels, ops)

    def cost(counter: Counter, in_channels: int, hw: tuple[int, int], num_classes: int) -> None:
        resnet_cost(arch, counter, in_channels, hw, num_classes)

    return ModelSpec(
        name=name,
        family="resnet",
        build=build,
        full_shape=arch.full_shape,
        cost=cost,
        default_input=default_input,
        description=description,
        residual_groups=arch.residual_groups,
    )


def _cifar(depth: int, block: str = "basic") -> ModelSpec:
    arch = ResNetArch.cifar(block, depth)
    text = f"CIFAR ResNet-{depth} ({block} blocks, {arch.layers[0]} per stage)"
    return _spec(f"cifar_resnet{depth}", arch, text, (3, 32, 32))


def _imagenet(depth: int, block: str, layers: tuple[int, int, int, int]) -> ModelSpec:
    arch = ResNetArch.imagenet(block, layers)
    text = f"ImageNet ResNet-{depth} (torchvision v1.5 topology, {block} blocks {list(layers)})"
    return _spec(f"resnet{depth}", arch, text, (3, 224, 224))


@register_model
def cifar_resnet20() -> ModelSpec:
    return _cifar(20)


@register_model
def cifar_resnet32() -> ModelSpec:
    return _cifar(32)


@register_model
def cifar_resnet44() -> ModelSpec:
    return _cifar(44)


@register_model
def cifar_resnet56() -> ModelSpec:
    return _cifar(56)


@register_model
def cifar_resnet110() -> ModelSpec:
    return _cifar(110)


@register_model
def cifar_resnet164() -> ModelSpec:
    return _cifar(164, "bottleneck")


@register_model
def resnet18() -> ModelSpec:
    return _imagenet(18, "basic", (2, 2, 2, 2))


@register_model
def resnet34() -> ModelSpec:
    return _imagenet(34, "basic", (3, 4, 6, 3))


@register_model
def resnet50() -> ModelSpec:
    return _imagenet(50, "bottleneck", (3, 4, 6, 3))
