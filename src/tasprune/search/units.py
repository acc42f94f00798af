"""Reusable searchable units: a width choice, a searchable conv+BN, a stage of skippable blocks.

A `Choice` holds the candidates of one decision and, during a forward, the sampled candidates
with their mixing weights; the architecture logits themselves live in the `SuperNet`. Any model
family written against `tasprune.models.ops.Ops` becomes searchable through `SearchOps`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tasprune.models.ops import activation


@dataclass
class Choice:
    """One categorical decision (a width or a depth) and what the current forward selected.

    ``selected`` holds (candidate index, value, weight) triples; the weight is a 0-d tensor
    carrying gradient to the logits, or a float for a fixed choice.
    """

    name: str
    kind: str  # "width" | "depth"
    candidates: list[int]
    key: str | None  # key of the logits in the SuperNet, None for a fixed choice
    members: list[str] = field(default_factory=list)  # conv or stage names sharing it
    selected: list[tuple[int, int, Tensor | float]] = field(default_factory=list)

    @property
    def searchable(self) -> bool:
        return self.key is not None and len(self.candidates) > 1

    def select_value(self, value: int) -> None:
        """Fix the choice to one value (weight 1), e.g. the argmax or a given Shape."""
        if value not in self.candidates:
            raise ValueError(f"{self.name}: {value} is not a candidate {self.candidates}")
        self.selected = [(self.candidates.index(value), value, 1.0)]

    def select_full(self) -> None:
        self.selected = [(len(self.candidates) - 1, self.candidates[-1], 1.0)]

    @property
    def max_selected(self) -> int:
        return max(v for _, v, _ in self.selected)


_MATRIX_CACHE: dict[tuple[int, int, str, str, torch.dtype], Tensor] = {}


def align_matrix(src: int, dst: int, mode: str, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(dst, src) matrix that maps ``src`` channels onto ``dst >= src`` channels.

    "cwi": channel-wise interpolation, i.e. adaptive average pooling along the channel axis
    (output j averages inputs floor(j*src/dst) .. ceil((j+1)*src/dst)-1). "pad": zero-padding.
    """
    cache_key = (src, dst, mode, str(device), dtype)
    hit = _MATRIX_CACHE.get(cache_key)
    if hit is not None:
        return hit
    m = torch.zeros(dst, src, dtype=torch.float64)
    if mode == "pad":
        m[:src, :src] = torch.eye(src, dtype=torch.float64)
    elif mode == "cwi":
        for j in range(dst):
            start = (j * src) // dst
            end = -((-(j + 1) * src) // dst)  # ceil
            m[j, start:end] = 1.0 / (end - start)
    else:
        raise ValueError(f"unknown channel alignment {mode!r}; use 'cwi' or 'pad'")
    out = m.to(device=device, dtype=dtype)
    _MATRIX_CACHE[cache_key] = out
    return out


def align_channels(x: Tensor, dst: int, mode: str) -> Tensor:
    """Resize N,C,H,W features to ``dst`` channels along the channel axis."""
    c = x.shape[1]
    if c == dst:
        return x
    m = align_matrix(c, dst, mode, x.device, x.dtype)
    return F.conv2d(x, m[:, :, None, None])


class SearchableConvBN(nn.Module):
    """Conv + BatchNorm whose out-width is a mixture of sampled candidate widths.

    The conv runs once at the largest sampled width K on whatever input width arrives (weight
    sliced to [:K, :C_in]). Batch statistics of a channel do not depend on the candidate, so
    the K channels are normalised once; each candidate keeps its own affine parameters. The
    per-candidate affine, channel alignment and mixing weights fold into one K x K matrix and a
    bias, applied as a single 1x1 convolution that is differentiable in the mixing weights.
    """

    def __init__(
        self,
        in_w: int,
        out_w: int,
        kernel: int,
        stride: int,
        act: str | None,
        choice: Choice,
        align: str = "cwi",
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_w, out_w, kernel, stride, kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_w, affine=False)
        n = len(choice.candidates)
        self.cand_weight = nn.Parameter(torch.ones(n, out_w))  # each candidate's BN scale
        self.cand_bias = nn.Parameter(torch.zeros(n, out_w))  # each candidate's BN shift
        self.act = activation(act)
        self.choice = choice
        self.align = align

    def _normalise(self, y: Tensor, k: int) -> Tensor:
        bn = self.bn
        use_batch = self.training or bn.running_mean is None
        assert bn.running_mean is not None and bn.running_var is not None
        if self.training and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
        # Slices are views: F.batch_norm updates the first k running statistics in place.
        return F.batch_norm(
            y,
            bn.running_mean[:k],
            bn.running_var[:k],
            None,
            None,
            use_batch,
            bn.momentum if bn.momentum is not None else 0.1,
            bn.eps,
        )

    def forward(self, x: Tensor) -> Tensor:
        sel = self.choice.selected
        k_max = max(v for _, v, _ in sel)
        w = self.conv.weight[:k_max, : x.shape[1]]
        y = F.conv2d(x, w, None, self.conv.stride, self.conv.padding)  # N, K, H', W'
        y = self._normalise(y, k_max)
        if len(sel) == 1:  # one candidate: plain affine BN, times its weight
            i, _, wt = sel[0]
            scale = self.cand_weight[i, :k_max] * wt
            shift = self.cand_bias[i, :k_max] * wt
            out = y * scale[None, :, None, None] + shift[None, :, None, None]
        else:
            mix = y.new_zeros(k_max, k_max)
            bias = y.new_zeros(k_max)
            for i, k, wt in sel:
                a = align_matrix(k, k_max, self.align, y.device, y.dtype)  # K, k
                mix = mix + F.pad(a * self.cand_weight[i, :k] * wt, (0, k_max - k))
                bias = bias + (a @ self.cand_bias[i, :k]) * wt
            out = F.conv2d(y, mix[:, :, None, None], bias)
        return self.act(out)


class SearchProjection(nn.Module):
    """Projection shortcut of the supernet; its width follows the block's last conv.

    ``pool=False``: a strided 1x1 conv instead of avg-pool + 1x1 conv (torchvision's downsample).
    """

    def __init__(
        self, in_w: int, out_w: int, stride: int, follow: Choice, pool: bool = True
    ) -> None:
        super().__init__()
        self.pool: nn.Module = (
            nn.AvgPool2d(stride, stride, ceil_mode=True) if pool and stride > 1 else nn.Identity()
        )
        self.conv = nn.Conv2d(in_w, out_w, 1, 1 if pool else stride, 0, bias=False)
        self.bn = nn.BatchNorm2d(out_w)
        self.follow = follow

    def forward(self, x: Tensor) -> Tensor:
        k = self.follow.max_selected
        y = F.conv2d(self.pool(x), self.conv.weight[:k, : x.shape[1]], None, self.conv.stride)
        return _bn_prefix(self.bn, y, k, self.training)


class SearchableDepthwiseBN(nn.Module):
    """Depthwise conv + BN of the supernet, whose width is tied to the conv that feeds it.

    Its input already is the mixture (over sampled widths) of that conv, so it has no choice of
    its own: it filters whatever K channels arrive (weight sliced to [:K], groups=K) and
    normalises them with the first K channels of one BatchNorm.
    """

    def __init__(
        self, channels: int, kernel: int, stride: int, act: str | None, follow: Choice
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            channels, channels, kernel, stride, kernel // 2, groups=channels, bias=False
        )
        self.bn = nn.BatchNorm2d(channels)
        self.act = activation(act)
        self.follow = follow  # the width choice this conv's width is tied to

    def forward(self, x: Tensor) -> Tensor:
        k = x.shape[1]
        conv = self.conv
        y = F.conv2d(x, conv.weight[:k], None, conv.stride, conv.padding, 1, k)  # N, K, H', W'
        bn = self.bn
        if self.training and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
        return self.act(_bn_prefix(bn, y, k, self.training))


def _bn_prefix(bn: nn.BatchNorm2d, y: Tensor, k: int, training: bool) -> Tensor:
    """``bn`` restricted to its first ``k`` channels (statistics, affine) applied to ``y``."""
    assert bn.running_mean is not None and bn.running_var is not None
    return F.batch_norm(
        y,
        bn.running_mean[:k],
        bn.running_var[:k],
        bn.weight[:k],
        bn.bias[:k],
        training,
        bn.momentum if bn.momentum is not None else 0.1,
        bn.eps,
    )


class PadAdd(nn.Module):
    """Residual addition of tensors of different widths: the narrower one is zero-padded."""

    def forward(self, branch: Tensor, shortcut: Tensor) -> Tensor:
        cb, cs = branch.shape[1], shortcut.shape[1]
        if cb == cs:
            return branch + shortcut
        if cb < cs:
            branch = F.pad(branch, (0, 0, 0, 0, 0, cs - cb))
        else:
            shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, cb - cs))
        return branch + shortcut


class SliceLinear(nn.Linear):
    """Linear layer that accepts any input width up to its full in-features."""

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight[:, : x.shape[1]], self.bias)


class SearchableStage(nn.Sequential):
    """A stage of blocks whose depth is a mixture over candidate depths.

    Blocks run in order; the stage output is the weighted sum of the outputs after each
    selected depth, aligned to the widest of them. With one selected depth only the blocks up
    to it run. The children keep the plain model's names ("0", "1", ...).
    """

    def __init__(self, blocks: list[nn.Module], choice: Choice, align: str = "cwi") -> None:
        super().__init__(*blocks)
        self.choice = choice
        self.align = align

    def forward(self, x: Tensor) -> Tensor:
        sel = self.choice.selected
        deepest = max(v for _, v, _ in sel)
        weights = {v: wt for _, v, wt in sel}
        outs: list[tuple[Tensor, Tensor | float]] = []
        for j, block in enumerate(self):
            if j >= deepest:
                break
            x = block(x)
            if (j + 1) in weights:
                outs.append((x, weights[j + 1]))
        if len(outs) == 1 and isinstance(outs[0][1], float) and outs[0][1] == 1.0:
            return outs[0][0]
        width = max(o.shape[1] for o, _ in outs)
        total: Tensor | None = None
        for o, wt in outs:
            term = align_channels(o, width, self.align) * wt
            total = term if total is None else total + term
        assert total is not None
        return total
