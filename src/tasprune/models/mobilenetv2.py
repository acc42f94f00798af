"""MobileNetV2 (Sandler et al. 2018; torchvision's topology at width 1.0), built from any Shape.

stem 3x3/2 conv (32) -> 17 inverted residual blocks in 7 groups (t, c, n, s) -> 1x1 conv
(1280) -> global average pool -> dropout -> linear; ReLU6 everywhere except after the
projection convs. Block ``stage{k}.{j}`` (group k, repeat j) is: 1x1 expansion conv
(``expand``; absent when t = 1) -> 3x3 depthwise conv (``dw``) -> 1x1 linear projection
(``project``). The depthwise conv filters each channel of the expansion on its own, so its width
is the expansion's: the Shape lists ``expand`` and ``project`` only, never ``dw``.

Each group is a stage; depth search keeps its first block (the one that changes width or
stride) and may drop later ones, which are residual. A block that is residual in the unpruned
net stays residual: identity when its input and output widths are equal, a 1x1 projection
shortcut when a pruned shape makes them differ. Blocks without a residual never get one.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from torch import Tensor, nn

from tasprune.models.algebra import Counter, conv_out
from tasprune.models.ops import Ops, PlainOps
from tasprune.models.registry import ModelSpec, register_model
from tasprune.shape import Shape

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
    residual: bool  # has a residual connection in the unpruned net
    feed: str  # the conv that feeds it in the unpruned net (the dw width follows it when t = 1)

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
        cur, feed = self.stem, "stem"
        for k, (t, c, n, s) in enumerate(self.setting, start=1):
            blocks = []
            for j in range(n):
                stride = s if j == 0 else 1
                info = BlockInfo(f"stage{k}", j, t, stride, cur, c, stride == 1 and cur == c, feed)
                blocks.append(info)
                cur, feed = c, f"{info.name}.project"
            out.append((f"stage{k}", blocks))
        return out

    def blocks(self) -> Iterator[BlockInfo]:
        for _, blocks in self.stages():
            yield from blocks

    def full_shape(self) -> Shape:
        widths = {"stem": self.stem}
        depths = {f"stage{k}": n for k, (_, _, n, _) in enumerate(self.setting, start=1)}
        for b in self.blocks():
            if b.expansion != 1:
                widths[f"{b.name}.expand"] = round(b.in_w * b.expansion)
            widths[f"{b.name}.project"] = b.out_w
        widths["head"] = self.head
        return Shape(widths=widths, depths=depths)

    def residual_groups(self) -> list[list[str]]:
        """Per stage with repeats: the projection convs that write its residual stream."""
        groups: dict[str, list[str]] = {}
        for b in self.blocks():
            groups.setdefault(b.stage, []).append(f"{b.name}.project")
        return [g for g in groups.values() if len(g) > 1]

    def tied_widths(self) -> dict[str, str]:
        """Depthwise conv -> the Shape width it follows (its expansion, or its input's)."""
        return {
            f"{b.name}.dw": f"{b.name}.expand" if b.expansion != 1 else b.feed
            for b in self.blocks()
        }


class InvertedResidual(nn.Module):
    """[1x1 expand + ReLU6] -> 3x3 depthwise + ReLU6 -> 1x1 project (linear) [+ shortcut]."""

    # An identity shortcut tasprune may replace by a 1x1 projection where a pruned shape gives
    # the block different input and output widths (independent residual widths).
    tasprune_shortcut = "shortcut"

    def __init__(
        self,
        ops: Ops,
        info: BlockInfo,
        in_w: int,
        widths: Mapping[str, int],
        feed: str,
    ) -> None:
        super().__init__()
        name = info.name
        convs: list[str] = []
        hidden = in_w
        if info.expansion != 1:
            hidden = widths[f"{name}.expand"]
            self.expand = ops.conv_bn(f"{name}.expand", in_w, hidden, 1, 1, act="relu6")
            convs.append("expand")
            feed = f"{name}.expand"
        self.dw = ops.depthwise_bn(
            f"{name}.dw", width_of=feed, channels=hidden, kernel=3, stride=info.stride, act="relu6"
        )
        out_w = widths[f"{name}.project"]
        self.project = ops.conv_bn(f"{name}.project", hidden, out_w, 1, 1, act=None)
        self.convs = (*convs, "dw", "project")
        self.residual = info.residual
        if info.residual:
            self.shortcut = ops.shortcut(
                f"{name}.shortcut", in_w, out_w, 1, width_of=f"{name}.project"
            )
            self.add = ops.residual()
        self.out_width = out_w

    def forward(self, x: Tensor) -> Tensor:
        out = x
        for c in self.convs:
            out = getattr(self, c)(out)
        if self.residual:
            out = self.add(out, self.shortcut(x))
        return out


class MobileNetV2(nn.Module):
    """stem -> 7 stages of inverted residual blocks -> 1x1 head conv -> pool -> linear."""

    def __init__(
        self,
        arch: MobileNetV2Arch,
        shape: Shape,
        num_classes: int = 1000,
        in_channels: int = 3,
        ops: Ops | None = None,
    ) -> None:
        super().__init__()
        ops = ops or PlainOps()
        w = shape.widths
        self.stem = ops.conv_bn("stem", in_channels, w["stem"], 3, 2, act="relu6")
        cur, feed = w["stem"], "stem"
        self.stage_names: list[str] = []
        for stage, infos in arch.stages():
            blocks: list[nn.Module] = []
            for info in infos[: shape.depths[stage]]:
                block = InvertedResidual(ops, info, cur, w, feed)
                cur, feed = block.out_width, f"{info.name}.project"
                blocks.append(block)
            self.add_module(stage, ops.stage(stage, blocks))
            self.stage_names.append(stage)
        self.head = ops.conv_bn("head", cur, w["head"], 1, 1, act="relu6")
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(arch.dropout)
        self.fc = ops.linear("fc", w["head"], num_classes)
        self.num_features = w["head"]
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


def mobilenet_v2_cost(
    arch: MobileNetV2Arch, c: Counter, in_channels: int, hw: tuple[int, int], num_classes: int
) -> None:
    """The cost of `MobileNetV2`, written once for exact and expected algebras."""
    a = c.alg
    h, w = conv_out(hw[0], 3, 2), conv_out(hw[1], 3, 2)
    x = a.width("stem")
    c.conv(a.const(in_channels), x, 3, (h, w), stride=2, in_size=hw, image=True)
    for stage, infos in arch.stages():
        outs = []
        for info in infos:
            keep = a.keep(stage, info.index)
            bh, bw = conv_out(h, 3, info.stride), conv_out(w, 3, info.stride)
            hidden = x
            if info.expansion != 1:
                hidden = a.width(f"{info.name}.expand")
                c.conv(x, hidden, 1, (h, w), keep)
            c.conv(  # width tied to `hidden`
                hidden,
                hidden,
                3,
                (bh, bw),
                keep,
                stride=info.stride,
                in_size=(h, w),
                depthwise=True,
            )
            out = a.width(f"{info.name}.project")
            c.conv(hidden, out, 1, (bh, bw), keep)
            if info.residual:
                c.projection(x, out, 1, (bh, bw), keep)  # only when the widths differ
            x = out
            outs.append(out)
            if info.index == 0:
                h, w = bh, bw
        x = a.stage_output(stage, outs)
    head = a.width("head")
    c.conv(x, head, 1, (h, w))
    c.linear(head, num_classes)


@register_model
def mobilenet_v2() -> ModelSpec:
    arch = MobileNetV2Arch()

    def build(shape: Shape, num_classes: int, in_channels: int, ops: Ops) -> nn.Module:
        return MobileNetV2(arch, shape, num_classes, in_channels, ops)

    def cost(counter: Counter, in_channels: int, hw: tuple[int, int], num_classes: int) -> None:
        mobilenet_v2_cost(arch, counter, in_channels, hw, num_classes)

    return ModelSpec(
        name="mobilenet_v2",
        family="mobilenet_v2",
        build=build,
        full_shape=arch.full_shape,
        cost=cost,
        default_input=(3, 224, 224),
        description="MobileNetV2 1.0 (torchvision topology; depthwise widths tied to expansions)",
        residual_groups=arch.residual_groups,
        tied_widths=arch.tied_widths,
    )
