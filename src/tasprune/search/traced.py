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
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from tasprune.models.graph import out_channels_of
from tasprune.models.traced import Stage, build_source, traced

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

    def hook(self, sites: list[tuple[str, int, bool]]) -> Any:
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
            if len(sites) == 1 and sites[0][1] == 0 and self.full[sites[0][0]] == channels:
                m, sup = self.vectors(sites[0][0], out.device)  # the usual case: one group
                scale = m if sites[0][2] else sup
            else:
                scale = None
                for group, offset, mix in sites:
                    m, sup = self.vectors(group, out.device)
                    seg = m if mix else sup
                    if seg is None:
                        continue
                    if scale is None:
                        scale = out.new_ones(out.shape[dim])
                    scale = torch.cat([scale[:offset], seg, scale[offset + seg.numel() :]])
            if scale is None:
                return out
            scale = scale.to(out.dtype)
            if dim == out.dim() - 1:
                return out * scale
            return out * scale.view(-1, *([1] * (out.dim() - 2)))

        return apply


def _stage_forward(net: SuperNet, container: nn.Sequential, stages: list[Stage]) -> Any:
    """A forward for ``container`` that mixes the outputs of its stages over depths."""
    starts = {st.children[0]: st for st in stages}

    def forward(x: Tensor) -> Tensor:
        kids = list(container.named_children())
        i = 0
        while i < len(kids):
            name, mod = kids[i]
            st = starts.get(name)
            if st is None:
                x = mod(x)
                i += 1
                continue
            sel = net.depth_of[st.name].selected
            deepest = max(d for _, d, _ in sel)
            weights = {d: w for _, d, w in sel}
            outs: list[tuple[Tensor, Any]] = []
            for j, child in enumerate(st.children[:deepest]):
                x = container.get_submodule(child)(x)
                if j + 1 in weights:
                    outs.append((x, weights[j + 1]))
            if not (len(outs) == 1 and isinstance(outs[0][1], float) and outs[0][1] == 1.0):
                x = sum(o * w for o, w in outs)  # type: ignore[assignment]
            i += len(st.children)
        return x

    return forward


def searchable_network(net: SuperNet, model: str) -> nn.Module:
    """The unpruned network of ``model`` made searchable by ``net``'s width and depth choices."""
    tr = traced(model)
    body = build_source(model, net.num_classes, net.in_channels)
    widths = _Widths(net, model)
    for layer, sites in tr.masks.items():
        body.get_submodule(layer).register_forward_hook(widths.hook(sites))
    by_container: dict[str, list[Stage]] = {}
    for st in tr.stages.values():
        by_container.setdefault(st.container, []).append(st)
    for cname, stages in by_container.items():
        cont = body.get_submodule(cname)
        assert isinstance(cont, nn.Sequential)
        cont.forward = _stage_forward(net, cont, stages)  # type: ignore[method-assign]
    return body
