"""CIFAR-style ResNets (He et al. 2016, 3 stages of 16/32/64 planes), built from any Shape.

Basic blocks (ResNet-20/32/44/56/110) and bottleneck blocks (ResNet-164). A block whose input
and output widths differ, or that downsamples, has a projection shortcut (2x2 avg-pool when
strided, then 1x1 conv + BN), so every per-conv width choice gives a valid network.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor, nn

from tasprune.models.algebra import Counter, conv_out
from tasprune.models.ops import Ops
from tasprune.models.registry import ModelSpec, register_model
from tasprune.shape import Shape

STAGES = 3
BASE = 16


@dataclass(frozen=True)
class CifarResNetArch:
    """Block type and depth of a CIFAR ResNet (depth = 6N+2 basic, 9N+2 bottleneck)."""

    block: str  # "basic" | "bottleneck"
    depth: int

    @property
    def blocks_per_stage(self) -> int:
        return (self.depth - 2) // (6 if self.block == "basic" else 9)

    @property
    def conv_names(self) -> tuple[str, ...]:
        return ("conv1", "conv2") if self.block == "basic" else ("conv1", "conv2", "conv3")

    def full_shape(self) -> Shape:
        widths = {"stem": BASE}
        depths = {}
        for s in range(1, STAGES + 1):
            planes = BASE * 2 ** (s - 1)
            depths[f"layer{s}"] = self.blocks_per_stage
            for j in range(self.blocks_per_stage):
                for c in self.conv_names:
                    last = c == self.conv_names[-1]
                    widths[f"layer{s}.{j}.{c}"] = planes * (
                        4 if last and self.block != "basic" else 1
                    )
        return Shape(widths=widths, depths=depths)

    def residual_groups(self) -> list[list[str]]:
        """Per stage, the convs that write the residual stream (stage 1 includes the stem)."""
        groups = []
        for s in range(1, STAGES + 1):
            # The stem writes layer1's residual stream only where their widths agree (basic).
            group = ["stem"] if s == 1 and self.block == "basic" else []
            last = self.conv_names[-1]
            group += [f"layer{s}.{j}.{last}" for j in range(self.blocks_per_stage)]
            groups.append(group)
        return groups


def _stride(stage: int, index: int) -> int:
    return 2 if stage > 1 and index == 0 else 1


class ResidualBlock(nn.Module):
    """Basic (3x3, 3x3) or bottleneck (1x1, 3x3, 1x1) residual block of the given widths."""

    def __init__(
        self,
        ops: Ops,
        name: str,
        in_w: int,
        widths: Mapping[str, int],
        convs: tuple[str, ...],
        stride: int,
    ) -> None:
        super().__init__()
        layers = []
        prev = in_w
        kernels = (3, 3) if len(convs) == 2 else (1, 3, 1)
        strides = (stride, 1) if len(convs) == 2 else (1, stride, 1)
        for i, c in enumerate(convs):
            w = widths[f"{name}.{c}"]
            last = i == len(convs) - 1
            layers.append(
                (
                    c,
                    ops.conv_bn(
                        f"{name}.{c}", prev, w, kernels[i], strides[i], act=None if last else "relu"
                    ),
                )
            )
            prev = w
        for c, layer in layers:
            self.add_module(c, layer)
        self.convs = convs
        last_name = f"{name}.{convs[-1]}"
        self.shortcut = ops.shortcut(f"{name}.shortcut", in_w, prev, stride, width_of=last_name)
        self.add = ops.residual()
        self.act = nn.ReLU(inplace=True)
        self.out_width = prev

    def forward(self, x: Tensor) -> Tensor:
        out = x
        for c in self.convs:
            out = getattr(self, c)(out)
        return self.act(self.add(out, self.shortcut(x)))


class CifarResNet(nn.Module):
    """stem 3x3 conv -> 3 stages of residual blocks -> global average pool -> linear."""

    def __init__(
        self,
        arch: CifarResNetArch,
        shape: Shape,
        num_classes: int = 10,
        in_channels: int = 3,
        ops: Ops | None = None,
    ) -> None:
        super().__init__()
        from tasprune.models.ops import PlainOps

        ops = ops or PlainOps()
        w = shape.widths
        self.stem = ops.conv_bn("stem", in_channels, w["stem"], 3, 1, act="relu")
        cur = w["stem"]
        self.stage_names: list[str] = []
        for s in range(1, STAGES + 1):
            blocks: list[nn.Module] = []
            for j in range(shape.depths[f"layer{s}"]):
                block = ResidualBlock(ops, f"layer{s}.{j}", cur, w, arch.conv_names, _stride(s, j))
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
        x = self.stem(x)  # N, stem, H, W
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return x  # N, C_last, H/4, W/4

    def forward_head(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(x).flatten(1))  # N, classes

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def cifar_resnet_cost(
    arch: CifarResNetArch, c: Counter, in_channels: int, hw: tuple[int, int], num_classes: int
) -> None:
    """The cost of `CifarResNet`, written once for exact and expected algebras."""
    a = c.alg
    h, w = hw
    x = a.width("stem")
    c.conv(a.const(in_channels), x, 3, (h, w), image=True)
    for s in range(1, STAGES + 1):
        stage = f"layer{s}"
        outs = []
        for j in range(arch.blocks_per_stage):
            keep = a.keep(stage, j)
            stride = _stride(s, j)
            bh, bw = conv_out(h, 3, stride), conv_out(w, 3, stride)
            cin = x
            for i, name in enumerate(arch.conv_names):
                cout = a.width(f"{stage}.{j}.{name}")
                kernel = 3 if (arch.block == "basic" or i == 1) else 1
                # The strided conv is the first 3x3 one; 1x1 convs before it see the input size.
                before_stride = arch.block != "basic" and i == 0
                strided = i == (0 if arch.block == "basic" else 1)
                size = (h, w) if before_stride else (bh, bw)
                seen = (h, w) if strided or before_stride else (bh, bw)  # its input's size
                c.conv(cin, cout, kernel, size, keep, stride=stride if strided else 1, in_size=seen)
                cin = cout
            c.projection(x, cin, stride, (bh, bw), keep)
            x = cin
            outs.append(x)
            if j == 0:
                h, w = bh, bw
        x = a.stage_output(stage, outs)
    c.linear(x, num_classes)


def _spec(name: str, block: str, depth: int) -> ModelSpec:
    arch = CifarResNetArch(block, depth)

    def build(shape: Shape, num_classes: int, in_channels: int, ops: Ops) -> nn.Module:
        return CifarResNet(arch, shape, num_classes, in_channels, ops)

    def cost(counter: Counter, in_channels: int, hw: tuple[int, int], num_classes: int) -> None:
        cifar_resnet_cost(arch, counter, in_channels, hw, num_classes)

    return ModelSpec(
        name=name,
        family="cifar_resnet",
        build=build,
        full_shape=arch.full_shape,
        cost=cost,
        default_input=(3, 32, 32),
        description=f"CIFAR ResNet-{depth} ({block} blocks, {arch.blocks_per_stage} per stage)",
        residual_groups=arch.residual_groups,
    )


@register_model
def cifar_resnet20() -> ModelSpec:
    return _spec("cifar_resnet20", "basic", 20)


@register_model
def cifar_resnet32() -> ModelSpec:
    return _spec("cifar_resnet32", "basic", 32)


@register_model
def cifar_resnet44() -> ModelSpec:
    return _spec("cifar_resnet44", "basic", 44)


@register_model
def cifar_resnet56() -> ModelSpec:
    return _spec("cifar_resnet56", "basic", 56)


@register_model
def cifar_resnet110() -> ModelSpec:
    return _spec("cifar_resnet110", "basic", 110)


@register_model
def cifar_resnet164() -> ModelSpec:
    return _spec("cifar_resnet164", "bottleneck", 164)
