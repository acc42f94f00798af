"""ImageNet ResNets (torchvision's v1.5 topology: stride on the 3x3 conv), built from any Shape.

7x7 stride-2 stem conv + BN + ReLU, 3x3 stride-2 max-pool, four stages of 64/128/256/512
planes (basic blocks, or bottlenecks with expansion 4), global average pool, linear. A block
whose input and output widths differ, or that downsamples, gets a projection shortcut; as in
torchvision it is a strided 1x1 conv + BN (no avg-pool). Parameter names follow tasprune's
scheme (``stem``, ``layer{s}.{j}.conv{k}``, ``layer{s}.{j}.shortcut``); see
`tasprune.models.torchvision_compat` for loading torchvision checkpoints.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor, nn

from tasprune.models.algebra import Counter, conv_out
from tasprune.models.ops import Ops, PlainOps
from tasprune.models.registry import ModelSpec, register_model
from tasprune.shape import Shape

PLANES = (64, 128, 256, 512)
STEM = 64


@dataclass(frozen=True)
class ImageNetResNetArch:
    """Block type and blocks per stage of an ImageNet ResNet."""

    block: str  # "basic" | "bottleneck"
    layers: tuple[int, int, int, int]

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
        widths = {"stem": STEM}
        depths = {}
        for s, (planes, blocks) in enumerate(zip(PLANES, self.layers, strict=True), start=1):
            depths[f"layer{s}"] = blocks
            for j in range(blocks):
                for c in self.conv_names:
                    last = c == self.conv_names[-1]
                    widths[f"layer{s}.{j}.{c}"] = planes * (self.expansion if last else 1)
        return Shape(widths=widths, depths=depths)

    def residual_groups(self) -> list[list[str]]:
        """Per stage, the convs that write its residual stream.

        The stem joins layer1's group only where their widths match in the unpruned net
        (ResNet-18/34: 64 = 64; not ResNet-50, whose layer1 writes 256 channels).
        """
        last = self.conv_names[-1]
        groups = []
        for s, blocks in enumerate(self.layers, start=1):
            group = [f"layer{s}.{j}.{last}" for j in range(blocks)]
            if s == 1 and PLANES[0] * self.expansion == STEM:
                group.insert(0, "stem")
            groups.append(group)
        return groups


def _stride(stage: int, index: int) -> int:
    return 2 if stage > 1 and index == 0 else 1


class Block(nn.Module):
    """Basic (3x3, 3x3) or bottleneck (1x1, 3x3, 1x1) block, stride on the 3x3 conv."""

    def __init__(
        self,
        ops: Ops,
        name: str,
        in_w: int,
        widths: Mapping[str, int],
        arch: ImageNetResNetArch,
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
            f"{name}.shortcut", in_w, prev, stride, width_of=f"{name}.{convs[-1]}", pool=False
        )
        self.add = ops.residual()
        self.act = nn.ReLU(inplace=True)
        self.out_width = prev

    def forward(self, x: Tensor) -> Tensor:
        out = x
        for c in self.convs:
            out = getattr(self, c)(out)
        return self.act(self.add(out, self.shortcut(x)))


class ImageNetResNet(nn.Module):
    """stem 7x7/2 -> max-pool 3x3/2 -> 4 stages of blocks -> global average pool -> linear."""

    def __init__(
        self,
        arch: ImageNetResNetArch,
        shape: Shape,
        num_classes: int = 1000,
        in_channels: int = 3,
        ops: Ops | None = None,
    ) -> None:
        super().__init__()
        ops = ops or PlainOps()
        w = shape.widths
        self.stem = ops.conv_bn("stem", in_channels, w["stem"], 7, 2, act="relu")
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cur = w["stem"]
        self.stage_names: list[str] = []
        for s in range(1, len(PLANES) + 1):
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
        x = self.maxpool(self.stem(x))  # N, stem, H/4, W/4
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return x  # N, C_last, H/32, W/32

    def forward_head(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(x).flatten(1))  # N, classes

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def imagenet_resnet_cost(
    arch: ImageNetResNetArch, c: Counter, in_channels: int, hw: tuple[int, int], num_classes: int
) -> None:
    """The cost of `ImageNetResNet`, written once for exact and expected algebras."""
    a = c.alg
    h, w = conv_out(hw[0], 7, 2), conv_out(hw[1], 7, 2)
    x = a.width("stem")
    c.conv(a.const(in_channels), x, 7, (h, w), stride=2, in_size=hw, image=True)
    h, w = conv_out(h, 3, 2), conv_out(w, 3, 2)  # max-pool 3x3/2, padding 1: no MACs
    for s in range(1, len(PLANES) + 1):
        stage = f"layer{s}"
        outs = []
        for j in range(arch.layers[s - 1]):
            keep = a.keep(stage, j)
            stride = _stride(s, j)
            bh, bw = conv_out(h, 3, stride), conv_out(w, 3, stride)
            cin = x
            for i, (name, kernel) in enumerate(zip(arch.conv_names, arch.kernels, strict=True)):
                cout = a.width(f"{stage}.{j}.{name}")
                size = (h, w) if i < arch.strided_index else (bh, bw)  # convs before the stride
                conv_stride = stride if i == arch.strided_index else 1
                seen = (h, w) if i <= arch.strided_index else (bh, bw)  # its input's size
                c.conv(cin, cout, kernel, size, keep, stride=conv_stride, in_size=seen)
                cin = cout
            # Strided 1x1 conv: at the output resolution, as many MACs as pool + 1x1 conv.
            c.projection(x, cin, stride, (bh, bw), keep)
            x = cin
            outs.append(x)
            if j == 0:
                h, w = bh, bw
        x = a.stage_output(stage, outs)
    c.linear(x, num_classes)


def _spec(name: str, block: str, layers: tuple[int, int, int, int], depth: int) -> ModelSpec:
    arch = ImageNetResNetArch(block, layers)

    def build(shape: Shape, num_classes: int, in_channels: int, ops: Ops) -> nn.Module:
        return ImageNetResNet(arch, shape, num_classes, in_channels, ops)

    def cost(counter: Counter, in_channels: int, hw: tuple[int, int], num_classes: int) -> None:
        imagenet_resnet_cost(arch, counter, in_channels, hw, num_classes)

    return ModelSpec(
        name=name,
        family="imagenet_resnet",
        build=build,
        full_shape=arch.full_shape,
        cost=cost,
        default_input=(3, 224, 224),
        description=(
            f"ImageNet ResNet-{depth} (torchvision v1.5 topology, {block} blocks {list(layers)})"
        ),
        residual_groups=arch.residual_groups,
    )


@register_model
def resnet18() -> ModelSpec:
    return _spec("resnet18", "basic", (2, 2, 2, 2), 18)


@register_model
def resnet34() -> ModelSpec:
    return _spec("resnet34", "basic", (3, 4, 6, 3), 34)


@register_model
def resnet50() -> ModelSpec:
    return _spec("resnet50", "bottleneck", (3, 4, 6, 3), 50)
