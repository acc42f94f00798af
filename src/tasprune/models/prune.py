"""The physically smaller network: TAS keeps the first k channels of every group, so the
network of a shape is the unpruned one with channels k.. of each group removed in every
producer and consumer (Torch-Pruning's graph, through concatenations) and skipped blocks
replaced by identities. Weights are carried over by the same operation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tasprune.models.analysis import Traced
from tasprune.models.attention import prune_heads
from tasprune.models.depth import Cats, Skip, Stage, segments_of
from tasprune.models.graph import dependency_graph, eval_mode, module_inputs, prune_group
from tasprune.models.sources import Example, call
from tasprune.shape import Shape


def prune_with(tr: Traced, net: nn.Module, shape: Shape, example: Example) -> nn.Module:
    """Make ``net`` (an unpruned network ``tr`` describes, any weights) the network of
    ``shape`` in place: channels k.. of every group removed in every producer and consumer
    (Torch-Pruning's graph, traced on ``example``), skipped blocks replaced by identities."""
    import torch_pruning as tp

    widths = dict(shape.widths)
    for stage, blocks in tr.stage_outputs.items():  # what follows reads the last kept block's
        widths[blocks[-1]] = widths[blocks[shape.depths[stage] - 1]]
    cut = {n: widths[n] for n, g in tr.groups.items() if widths[n] < g.full}
    if cut:
        mods = dict(net.named_modules())
        grouped = {  # (weight, groups) of grouped convs before pruning
            n: (m.weight.detach().clone(), m.groups)
            for n, m in mods.items()
            if isinstance(m, nn.Conv2d) and 1 < m.groups < m.in_channels
        }
        norms = {  # GroupNorms and their channels per group, which stay (whole groups go)
            n: m.num_channels // m.num_groups
            for n, m in mods.items()
            if isinstance(m, nn.GroupNorm)
        }
        extra = {  # convs with per-filter parameters of their own, and their width
            n: m.out_channels
            for n, m in mods.items()
            if isinstance(m, nn.Conv2d)
            and any(p not in ("weight", "bias") for p, _ in m.named_parameters(recurse=False))
        }
        scoped = {tr.groups[n].scope for n in cut}
        inputs = module_inputs(net, example) if scoped != {""} else {}
        graphs: dict[str, Any] = {}
        with eval_mode(net):
            for scope in scoped:
                mod = net.get_submodule(scope) if scope else net
                x = (torch.zeros(inputs[scope]),) if scope else example
                graphs[scope] = dependency_graph(mod, x)
        for gname, k in cut.items():
            if gname in tr.attention:
                continue  # whole heads, below
            g = tr.groups[gname]
            dg = graphs[g.scope]
            for layer, out in g.roots:
                mod = mods[layer]
                linear = isinstance(mod, nn.Linear)
                if out:
                    fn = tp.prune_linear_out_channels if linear else tp.prune_conv_out_channels
                else:
                    fn = tp.prune_linear_in_channels if linear else tp.prune_conv_in_channels
                cut_idxs = [s * g.full + j for s in range(g.segments) for j in range(k, g.full)]
                prune_group(dg, mod, fn, cut_idxs)
        for gname, att in tr.attention.items():
            if gname in cut:
                prune_heads(net, att, cut[gname])
        for gname, k in cut.items():
            if tr.groups[gname].segments > 1:
                _chunk_width(net, tr, gname, k)
        for n, full_out in extra.items():
            # A conv subclass's own per-filter tensors (e.g. the gain of a weight-standardised
            # conv) that the graph does not prune: the kept filters are the first ones.
            conv = mods[n]
            assert isinstance(conv, nn.Conv2d)
            for pname, p in list(conv.named_parameters(recurse=False)):
                if pname not in ("weight", "bias") and p.shape[:1] == (full_out,):
                    setattr(conv, pname, nn.Parameter(p.detach()[: conv.out_channels].clone()))
        for n, per in norms.items():
            norm = mods[n]
            assert isinstance(norm, nn.GroupNorm)
            norm.num_groups = norm.num_channels // per
        for n, (weight, groups) in grouped.items():
            # Whole groups are kept (Torch-Pruning would keep their count and thin each).
            conv = mods[n]
            assert isinstance(conv, nn.Conv2d)
            k, per_out = conv.out_channels, weight.shape[0] // groups
            conv.groups, conv.in_channels = k // per_out, k
            conv.weight = nn.Parameter(weight[:k].contiguous())
    shallow = [
        (st, shape.depths[st.name])
        for st in tr.stages.values()
        if st.consumer is not None and shape.depths[st.name] < len(st.blocks)
    ]
    if shallow:
        _drop_concatenated(net, shallow, example)
    for st in tr.stages.values():
        if st.consumer is None:
            cont = net.get_submodule(st.container)
            for child in st.children[shape.depths[st.name] :]:
                setattr(cont, child, nn.Identity() if st.plain else Skip())
    drop_equal_projections(net)
    return net


def _drop_concatenated(net: nn.Module, shallow: list[tuple[Stage, int]], example: Example) -> None:
    """Blocks ``depth``.. of each concatenated stage leave their container, and their segments
    the input of the conv that reads the concatenation (where they sit at the pruned widths:
    read off one forward)."""
    outs: dict[str, Any] = {}  # a block's or a conv's name -> its output or input
    hooks = []
    for st, _ in shallow:
        for b in st.blocks:
            hook = net.get_submodule(b).register_forward_hook(
                lambda m, a, o, b=b: outs.setdefault(b, o)
            )
            hooks.append(hook)
        c = st.consumer or ""
        hooks.append(
            net.get_submodule(c).register_forward_pre_hook(
                lambda m, a, c=c: outs.setdefault(c, a[0])
            )
        )
    cats = Cats()
    try:
        with eval_mode(net), torch.no_grad(), cats:
            call(net, example)
    finally:
        for h in hooks:
            h.remove()
    for st, depth in shallow:
        conv = net.get_submodule(st.consumer or "")
        assert isinstance(conv, nn.Conv2d)
        segments = segments_of(cats, [outs[b] for b in st.blocks], outs[st.consumer or ""])
        assert segments is not None, f"{st.consumer} no longer reads {st.container}'s blocks"
        dropped = {c for off, w in segments[depth:] for c in range(off, off + w)}
        keep = [c for c in range(conv.in_channels) if c not in dropped]
        conv.weight = nn.Parameter(conv.weight.detach()[:, keep].contiguous())
        conv.in_channels = len(keep)
        cont = net.get_submodule(st.container)
        assert isinstance(cont, (nn.ModuleList, nn.Sequential))
        del cont[depth:]


def _chunk_width(net: nn.Module, tr: Traced, gname: str, width: int) -> None:
    """A chunked group's part width recorded on the module that holds all its layers (C2f's
    ``c``, which Ultralytics' export path splits by): its int attributes equal to the unpruned
    part width take the pruned one."""
    layers = [layer.split(".") for (layer, _), gs in tr.group_of.items() if gname in gs]
    common: list[str] = []
    for parts in zip(*layers, strict=False):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    if not common:
        return  # spread over the whole network: no one module owns the chunk
    owner = net.get_submodule(".".join(common))
    full = tr.groups[gname].full
    for attr, value in list(vars(owner).items()):
        if type(value) is int and value == full and not attr.startswith("_"):
            setattr(owner, attr, width)


def drop_equal_projections(net: nn.Module) -> None:
    """The inserted projections (`sources.insert_projections`) whose input and output widths
    ended equal become identities again: a pruned network has a projection only where a block
    changes width."""
    for name, mod in list(net.named_modules()):
        optional = getattr(mod, "tasprune_optional", False) and isinstance(mod, nn.Conv2d)
        if optional and mod.in_channels == mod.out_channels:
            net.set_submodule(name, nn.Identity())
