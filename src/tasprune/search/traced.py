"""The searchable network of a traced model: the unpruned network itself, with each channel
group's width mixture applied where its channels are produced, and each stage's depth mixture
in its container.

Width: for group g with sampled candidates c_i and mixing weights w_i, the channels j of the
group's layers are scaled by sum_i w_i [j < c_i] (TAS's mixture of candidate widths, aligned
by zero-padding) at the sites the analysis chose (after the norm that follows each entry conv
of the group; layers whose input already carries the mixture zero the channels beyond the
widest candidate). The network runs at full width, so a search step costs about one plain step.
Depth: a stage's output is sum_d w_d x_d over the sampled kept-block counts d, where x_d is the
output after the first d blocks; blocks beyond the deepest sampled count are not run.
Parameter names are those of the plain network, so warm-starting and weight transfer are
name-based.

Two mixing options (the paper's), at the sites where a group's mixture enters after one conv
or BatchNorm: ``align="cwi"`` maps each sampled candidate's channels onto the widest sampled
one by channel-wise interpolation instead of zero-padding, and ``candidate_affine`` gives each
BatchNorm one affine per candidate width (extra parameters ``cand_weight``/``cand_bias`` on
that BatchNorm, started from its own affine; a derived network takes its width's). Both fold
into one K x K matrix and a bias applied as a 1x1 convolution over the K widest channels; at a
fixed shape they reduce to the pruned network, so expected and exact cost are unchanged.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tasprune.models.graph import out_channels_of
from tasprune.models.sources import optional_projections, resolve
from tasprune.models.traced import Stage, traced
from tasprune.search.choice import Choice, align_matrix

SuperNet = Any  # tasprune.search.supernet.SuperNet (which imports this module)


class _Widths:
    """Per forward, the mixture and support vector of every group (computed once per group)."""

    def __init__(self, net: SuperNet, model: str) -> None:
        self.net = net
        self.full = {n: g.full for n, g in traced(model).groups.items()}
        self._cache: dict[str, tuple[Any, Tensor | None, Tensor | None]] = {}

    def vectors(self, group: str, device: torch.device) -> tuple[Tensor | None, Tensor | None]:
        """(mixture, support) of ``group`` for the current selection; None when it is full."""
        sel = self.net.width_of[group].selected
        hit = self._cache.get(group)
        if hit is not None and hit[0] is sel:
            return hit[1], hit[2]
        full = self.full[group]
        if len(sel) == 1 and sel[0][1] == full and isinstance(sel[0][2], float):
            out: tuple[Tensor | None, Tensor | None] = (None, None)
        else:
            ar = torch.arange(full, device=device)
            mix: Tensor = sum(  # type: ignore[assignment]
                (ar < v).to(torch.float32) * w for _, v, w in sel
            )
            support = (ar < max(v for _, v, _ in sel)).to(torch.float32)
            out = (mix, support)
        self._cache[group] = (sel, *out)
        return out

    def hook(self, sites: list[tuple[Any, ...]]) -> Any:
        """A forward hook scaling the output channels of a layer by its mask ``sites``:
        (group, first channel, mixture or support) masks the group's channels from that
        channel on; (..., size, stride) masks each of the group's units as ``size`` channels
        every ``stride`` (an interleaved attention's v rows, one block per head)."""
        blocks = self._blocks(sites)

        def apply(module: nn.Module, args: Any, out: Tensor) -> Tensor:
            if not isinstance(out, Tensor) or out.dim() < 2:
                return out
            channels = out_channels_of(module)
            if out.shape[1] == channels:
                dim = 1
            elif out.shape[-1] == channels:
                dim = out.dim() - 1  # channels-last (a Linear or LayerNorm on N,H,W,C)
            else:
                return out
            return self._scaled(out, dim, channels, sites, blocks)

        return apply

    def pre_hook(self, sites: list[tuple[Any, ...]]) -> Any:
        """A forward pre-hook scaling the input channels of a linear (its last dim) or a conv
        (dim 1) by its mask ``sites`` (as `hook`'s)."""
        blocks = self._blocks(sites)

        def apply(module: nn.Module, args: Any) -> Any:
            x = args[0]
            dim = x.dim() - 1 if isinstance(module, nn.Linear) else 1
            channels = x.shape[dim]
            return (self._scaled(x, dim, channels, sites, blocks), *args[1:])

        return apply

    def _blocks(self, sites: list[tuple[Any, ...]]) -> dict[int, Tensor]:
        """A strided site's channel indices, unit by unit (fixed: computed once)."""
        return {
            i: (
                site[1]
                + torch.arange(self.full[site[0]])[:, None] * site[4]
                + torch.arange(site[3])
            ).flatten()
            for i, site in enumerate(sites)
            if len(site) == 5
        }

    def _scaled(
        self,
        out: Tensor,
        dim: int,
        channels: int,
        sites: list[tuple[Any, ...]],
        blocks: dict[int, Tensor],
    ) -> Tensor:
        """``out`` with its ``channels`` along ``dim`` scaled by the mask ``sites``."""
        plain = len(sites) == 1 and len(sites[0]) == 3 and sites[0][1] == 0
        if plain and self.full[sites[0][0]] == channels:
            m, sup = self.vectors(sites[0][0], out.device)  # the usual case: one group
            scale = m if sites[0][2] else sup
        else:
            scale = None
            for i, (group, offset, mix, *_) in enumerate(sites):
                m, sup = self.vectors(group, out.device)
                seg = m if mix else sup
                if seg is None:
                    continue
                if scale is None:
                    scale = out.new_ones(out.shape[dim])
                if i in blocks:
                    index = blocks[i].to(out.device)
                    size = index.numel() // seg.numel()
                    scale = scale.index_put((index,), seg.repeat_interleave(size))
                else:
                    scale = torch.cat([scale[:offset], seg, scale[offset + seg.numel() :]])
        if scale is None:
            return out
        scale = scale.to(out.dtype)
        if dim == out.dim() - 1:
            return out * scale
        return out * scale.view(-1, *([1] * (out.dim() - 2)))


def _depth_forwards(net: SuperNet, body: nn.Module, st: Stage) -> None:
    """The blocks of ``st`` mix the stage's outputs over its depths, wherever they sit (a
    Sequential, a ModuleList their parent loops over): each runs its own forward; the deepest
    selected one returns the weighted sum of the selected depths' outputs, the blocks after
    it return their input. Bound to each block, so a copy of the network (an EMA) runs its
    own blocks."""
    state: dict[str, Any] = {}

    def bound(j: int, original: Any) -> Any:
        def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            if j == 0:
                sel = net.depth_of[st.name].selected
                state["deepest"] = max(d for _, d, _ in sel)
                state["weights"] = {d: w for _, d, w in sel}
                state["outs"] = []
            if j >= state["deepest"]:
                return args[0]
            y = original(self, *args, **kwargs)
            if st.consumer is not None:
                return y  # concatenated: the segments are weighed where they are read
            if (w := state["weights"].get(j + 1)) is not None:
                state["outs"].append((y, w))
            if j + 1 == state["deepest"]:
                outs, state["outs"] = state["outs"], []
                if not (len(outs) == 1 and isinstance(outs[0][1], float) and outs[0][1] == 1.0):
                    y = sum(o * w for o, w in outs)
            return y

        return forward

    for j, name in enumerate(st.blocks):
        block = body.get_submodule(name)
        block.forward = types.MethodType(bound(j, type(block).forward), block)  # type: ignore[method-assign]
    if st.consumer is not None:
        body.get_submodule(st.consumer).register_forward_pre_hook(_segments_kept(net, st))


def _segments_kept(net: SuperNet, st: Stage) -> Any:
    """A pre-hook on the conv reading a concatenation of ``st``'s blocks: block j's segment
    scaled by P(depth > j) of the current selection (1 or 0 at a fixed shape: the pruned
    conv without those columns)."""

    def hook(m: nn.Module, args: Any) -> Any:
        x = args[0]
        sel = net.depth_of[st.name].selected
        keeps = [sum(w for _, d, w in sel if d > j) for j in range(len(st.segments))]
        if all(isinstance(k, float) and k == 1.0 for k in keeps):
            return None
        pieces, at = [], 0
        for (off, width), k in sorted(zip(st.segments, keeps, strict=True), key=lambda p: p[0]):
            if off > at:
                pieces.append(x.new_ones(off - at))
            kt = k if isinstance(k, Tensor) else x.new_tensor(float(k))
            pieces.append(kt.to(x.dtype).reshape(1).expand(width))
            at = off + width
        if at < x.shape[1]:
            pieces.append(x.new_ones(x.shape[1] - at))
        scale = torch.cat(pieces).view(1, -1, *([1] * (x.dim() - 2)))
        return (x * scale, *args[1:])

    return hook


def _normalised(bn: nn.BatchNorm2d, x: Tensor) -> Tensor:
    """``bn`` without its affine: the statistics (and their update) exactly as its forward."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    track = not bn.training or bn.track_running_stats
    return F.batch_norm(
        x,
        bn.running_mean if track else None,
        bn.running_var if track else None,
        None,
        None,
        batch_stats,
        factor,
        bn.eps,
    )


def mix_widths(
    y: Tensor,
    choice: Choice,
    align: str,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """The width mixture of ``choice``'s selection over ``y`` (N, C, ...), channels aligned by
    ``align`` onto the widest sampled candidate K (the rest zero); ``weight``/``bias``
    (candidates x C): one affine per candidate, applied before the alignment."""
    sel = choice.selected
    k = max(c for _, c, _ in sel)
    if len(sel) == 1 and isinstance(sel[0][2], float):  # a fixed width: the pruned network
        i, c, w = sel[0]
        out = y[:, :c] * w
        if weight is not None and bias is not None:
            view = (1, c) + (1,) * (y.dim() - 2)
            out = out * weight[i, :c].view(view) + bias[i, :c].view(view) * w
    else:
        m = y.new_zeros(k, k)
        b = y.new_zeros(k)
        for i, c, w in sel:
            a = align_matrix(c, k, align, y.device, y.dtype)  # K x c
            if weight is not None and bias is not None:
                m = m + F.pad(a * weight[i, :c] * w, (0, k - c))
                b = b + (a @ bias[i, :c]) * w
            else:
                m = m + F.pad(a * w, (0, k - c))
        out = torch.einsum("dc,nc...->nd...", m, y[:, :k])
        if weight is not None:
            out = out + b.view((1, k) + (1,) * (y.dim() - 2))
    if out.shape[1] == y.shape[1]:
        return out
    return torch.cat([out, y.new_zeros(y.shape[0], y.shape[1] - out.shape[1], *y.shape[2:])], 1)


def _candidate_bn(net: SuperNet, bn: nn.BatchNorm2d, group: str, align: str) -> None:
    """Give ``bn`` one affine per candidate of ``group`` and the mixture in its forward."""
    choice = net.width_of[group]
    n = len(choice.candidates)
    with torch.no_grad():
        bn.cand_weight = nn.Parameter(bn.weight.detach().clone().expand(n, -1).contiguous())
        bn.cand_bias = nn.Parameter(bn.bias.detach().clone().expand(n, -1).contiguous())

    def forward(x: Tensor) -> Tensor:
        weight, bias = _affines(bn)
        return mix_widths(_normalised(bn, x), choice, align, weight, bias)

    bn.forward = forward  # type: ignore[method-assign,assignment]


def _affines(bn: nn.Module) -> tuple[Tensor, Tensor]:
    """The per-candidate affine (candidates x C) of a BatchNorm `_candidate_bn` changed."""
    weight, bias = bn.cand_weight, bn.cand_bias
    assert isinstance(weight, Tensor) and isinstance(bias, Tensor)
    return weight, bias


def _aligned(net: SuperNet, group: str, align: str) -> Any:
    """A forward hook that replaces a layer's output by ``group``'s aligned mixture."""
    choice = net.width_of[group]

    def apply(module: nn.Module, args: Any, out: Tensor) -> Tensor:
        return mix_widths(out, choice, align)

    return apply


def candidate_affine_layers(body: nn.Module) -> dict[str, nn.BatchNorm2d]:
    """The BatchNorms of a searchable network that hold one affine per candidate."""
    return {n: m for n, m in body.named_modules() if hasattr(m, "cand_weight")}  # type: ignore[misc]


def reset_candidate_affine(body: nn.Module) -> None:
    """Every candidate's affine from its BatchNorm's own (after a warm start)."""
    with torch.no_grad():
        for bn in candidate_affine_layers(body).values():
            weight, bias = _affines(bn)
            weight.copy_(bn.weight.expand_as(weight))
            bias.copy_(bn.bias.expand_as(bias))


def plain_state(net: SuperNet, shape: Any) -> dict[str, Tensor]:
    """The searchable network's weights as the plain unpruned network's: each candidate-affine
    BatchNorm takes the affine of its group's width in ``shape`` (a width that is not a
    candidate: the narrowest candidate at least as wide)."""
    tr = traced(net.model_name)
    state = {k: v for k, v in net.net.state_dict().items() if ".cand_" not in f".{k}"}
    for name, bn in candidate_affine_layers(net.net).items():
        group = tr.masks[name][0][0]
        cands = net.width_of[group].candidates
        width = shape.widths[group]
        wider = [j for j, c in enumerate(cands) if c >= width]
        i = min(wider, key=lambda j: cands[j]) if wider else len(cands) - 1
        weight, bias = _affines(bn)
        state[f"{name}.weight"] = weight[i].detach().clone()
        state[f"{name}.bias"] = bias[i].detach().clone()
    return state


def searchable_network(net: SuperNet, model: str) -> nn.Module:
    """The unpruned network of ``model`` made searchable by ``net``'s width and depth choices."""
    tr = traced(model)
    body = resolve(model).build(net.num_classes, net.in_channels)
    removed = set()
    for name in optional_projections(body):
        if net.options.tie_residual:  # one width per stream: the projection is the identity
            body.set_submodule(name, nn.Identity())
            removed.add(name)
        else:  # stays the identity: the searched widths, not this conv, decide the stream
            body.get_submodule(name).requires_grad_(False)
    widths = _Widths(net, model)
    align = net.options.align
    per_candidate = net.options.candidate_affine
    for layer, sites in tr.masks.items():
        if layer in removed:
            continue
        mod = body.get_submodule(layer)
        group, offset, mix = sites[0][:3]
        single = (
            len(sites) == 1
            and offset == 0
            and len(sites[0]) == 3
            and mix
            and tr.groups[group].full == out_channels_of(mod)
            and isinstance(mod, (nn.Conv2d, nn.BatchNorm2d))
        )
        if single and per_candidate and isinstance(mod, nn.BatchNorm2d) and mod.affine:
            _candidate_bn(net, mod, group, align)
        elif single and align == "cwi":
            mod.register_forward_hook(_aligned(net, group, align))
        else:
            mod.register_forward_hook(widths.hook(sites))
    for layer, sites in tr.input_masks.items():
        body.get_submodule(layer).register_forward_pre_hook(widths.pre_hook(sites))
    for st in tr.stages.values():
        _depth_forwards(net, body, st)
    return body
