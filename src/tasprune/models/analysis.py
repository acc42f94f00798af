"""The search space of a network, read off its traced graph: the analysis takes a module
and the inputs it is called with, and assumes nothing else (no classifier, no input shape).

- **Width choices** are the channel groups of Torch-Pruning's dependency graph: every set of
  layers whose channels must change together (a residual stream, a depthwise conv and its
  producer, the segments a concatenation passes on) is one choice, named after its first
  layer. A grouped conv ties its input and output groups and restricts the candidates to
  whole groups. What produces the network's outputs (derived from the graph:
  `graph.output_layers`) and what the caller names in ``ignore`` keep their widths.
- **Depth choices** are runs of consecutive residual blocks (output = input + f(input) at the
  same shape) in one ``nn.Sequential``; a stage is the block before such a run plus the run,
  and its depth d keeps the first d blocks (the skipped ones become ``nn.Identity``).

`verify` then prunes every searchable group to about half on a copy, checks that the network
runs, keeps its outputs' shapes and costs what `layer_cost` predicts, and leaves the groups
that break it unsearched; `prune` makes the physically smaller network.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tasprune.errors import ConfigError
from tasprune.latency_table import Op
from tasprune.models.attention import Attention, find_attention, split_attention
from tasprune.models.depth import Stage, depth_stages
from tasprune.models.graph import (
    chunked,
    internal,
    out_channels_of,
    output_layers,
    output_shapes,
    scopes,
    tied_conv,
)
from tasprune.models.sources import Example, as_example, call
from tasprune.shape import Shape

logger = logging.getLogger(__name__)


# Where a layer's output channels are masked: (group, first channel, by the mixture (else by
# the support)), or with (size, stride) added: each unit of the group masks `size` channels,
# one block every `stride` channels (an interleaved attention's v rows, a block per head).
MaskSite = tuple[str, int, bool] | tuple[str, int, bool, int, int]


@dataclass
class Group:
    """One width choice: the layers whose channels change together."""

    name: str
    full: int
    roots: list[tuple[str, bool]]  # (layer, out?) roots of Torch-Pruning groups merged here
    multiple: int = 1  # candidates must be multiples (grouped convs keep whole groups)
    fixed: str | None = None  # why the width cannot be searched
    scope: str = ""  # the sub-module traced for it ("" = the whole network)
    embedding: bool = False  # the token stream an attention module reads (LayerNorm-normalised)
    # The roots' channels hold the width this many times, one segment after the other (a
    # chunk into equal parts, C2f's halves): every segment keeps the same leading channels.
    segments: int = 1


@dataclass
class Layer:
    """What the cost of one conv/linear depends on."""

    name: str
    cin: int
    cout: int
    in_groups: tuple[str, ...]  # the groups of its input channels (the rest is fixed)
    out_groups: tuple[str, ...]
    kernel: int  # kh * kw
    groups: int
    hw: int  # output positions (H*W for a conv, tokens for a linear)
    bias: bool
    stage: str | None
    index: int
    extra: int = 0  # per-filter parameters of its own besides weight and bias (a conv's gain)
    op: Op | None = None  # its geometry, for the latency table
    optional: bool = False  # a projection that exists only where its in and out widths differ
    weights: bool = True  # False: a product of activations (attention's token-token products)


class Traced:
    """The search space of one network: width and depth choices, mask sites, output layers.

    ``module`` is analysed on copies (never changed); ``example`` are the positional
    arguments it is called with (a tensor is one argument); ``ignore`` names modules whose
    output widths are kept besides the outputs' producers."""

    # the output shapes of the outputs' producers, call by call (verify's, computed once)
    head_shapes: dict[str, list[tuple[int, ...]]] | None = None

    def __init__(
        self,
        module: nn.Module,
        example: Any,
        *,
        name: str = "model",
        ignore: Sequence[str] = (),
    ) -> None:
        self.model = name
        self.example = as_example(example)
        # nn.MultiheadAttention as the equivalent SplitAttention, whose heads can be searched
        split = any(type(m) is nn.MultiheadAttention for m in module.modules())
        self.template = split_attention(copy.deepcopy(module)) if split else module
        net = copy.deepcopy(self.template).eval()
        try:
            with torch.no_grad():
                self.output_shapes = output_shapes(call(net, self.example))
        except Exception as err:  # the model's own message, in one line
            first = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
            raise ConfigError(
                f"{name} does not run on its example inputs ({type(err).__name__}: {first}). "
                "Fix: pass example inputs the model's forward accepts"
            ) from None
        self.outputs = output_layers(net, self.example)
        keep = {n: "produces the network's outputs" for n in self.outputs}
        ignored: set[str] = set()  # every module inside what ignore= names
        for prefix in ignore:
            for n, _ in net.named_modules():
                if within(n, prefix):
                    ignored.add(n)
                    keep.setdefault(n, f"inside {prefix}, which ignore= (or only=) leaves out")
        self.ignore = tuple(ignore)
        heads = find_attention(net)
        # the layers moving with an attention's heads root no group: the heads replace them
        inside = [m for att in heads[0] for m in att.inside()]
        self.groups, self.group_of, self.masks, self.per_channel = _channel_groups(
            net, name, self.example, keep, inside
        )
        # Where a layer's input channels are masked instead (talking heads' mixers)
        self.input_masks: dict[str, list[MaskSite]] = {}
        self.attention = self._head_groups(net, *heads)
        self.stages = {  # a run of blocks inside an ignored module keeps its depth
            n: st
            for n, st in depth_stages(net, self.example).items()
            if st.container not in ignored
        }
        self._drop_overlaps(net)
        # concatenated blocks whose segments are not one group each (or fixed) keep their depth
        unread = [n for n, st in self.stages.items() if st.consumer and self._segments(st) is None]
        self.drop_stages(unread)

    def drop_stages(self, names: list[str]) -> None:
        """Keep the depth of the stages ``names`` (and derive what follows from the stages)."""
        for n in names:
            del self.stages[n]
        self.stage_of: dict[str, tuple[str, int]] = {}
        for st in self.stages.values():
            for i, b in enumerate(st.blocks):
                self.stage_of[b] = (st.name, i)
        self.stage_outputs = self._stage_outputs()
        # the conv reading a concatenation of a stage's blocks -> (stage, block, the group of
        # the block's segment or None where its width is fixed, segment width)
        self.concat_parts: dict[str, list[tuple[str, int, str | None, int]]] = {}
        for st in self.stages.values():
            if st.consumer is not None:
                segments = self._segments(st)
                assert segments is not None  # unreadable ones were dropped
                self.concat_parts.setdefault(st.consumer, []).extend(segments)

    def _segments(self, st: Stage) -> list[tuple[str, int, str | None, int]] | None:
        """Each concatenated block's segment of ``st`` as (stage, block, its group or None
        where its width is fixed, width), or None when a segment is not one group."""
        reads = set(self.group_of.get((st.consumer or "", False), []))
        parts = []
        for j, (block, (_, width)) in enumerate(zip(st.blocks, st.segments, strict=True)):
            found = self._written_in(block) & reads
            if len(found) > 1:
                return None
            g = found.pop() if found else None
            if g is not None and self.groups[g].full != width:
                return None
            parts.append((st.name, j, g, width))
        return parts

    def _written_in(self, block: str) -> set[str]:
        """The groups of the output channels of the layers inside ``block``."""
        return {g for (lay, o), gs in self.group_of.items() if o and within(lay, block) for g in gs}

    def _head_groups(
        self, net: nn.Module, found: list[Attention], other: list[tuple[str, str]]
    ) -> dict[str, Attention]:
        """Each multi-head attention module's heads as one width choice (named after its
        first q/k/v projection), in place of the graph's groups there, which cannot follow
        the reshape into heads: q, k and v rows (per_channel counts how many of them a layer
        holds) and the output projection's input columns, in whole heads, masked at v.
        ``found`` and ``other``: `find_attention`'s."""
        if found:  # projections used through their weights (F.linear), not called, are not read
            layers = sorted({n for a in found for n in (*a.producers(), a.out)})
            called = {n for n, calls in call_shapes(net, self.example, layers).items() if calls}
            other += [
                (a.name, "its projections are not called as modules")
                for a in found
                if not {*a.producers(), a.out} <= called
            ]
            found = [a for a in found if {*a.producers(), a.out} <= called]
        for where, cls in other:
            logger.info(
                "%s: the heads of %s (%s) are not searched: its projections are not the "
                "q/k/v and output linears tasprune reads",
                self.model,
                where or "the top",
                cls,
            )
        order = {n: i for i, n in enumerate(dict(net.named_modules()))}
        out: dict[str, Attention] = {}
        for att in found:
            producers = att.producers()
            mixing = [(m, o) for m in att.mixers for o in (True, False)]
            following = [
                (f, o) for conv, bn in att.followers for f in (conv, bn) if f for o in (True, False)
            ]
            sides = [(p, True) for p in producers] + [(att.out, False)] + mixing + following
            stale = {g for side in sides for g in self.group_of.get(side, [])}
            if any(side[0] in self.outputs for side in sides):
                continue
            for g in stale:
                self.groups.pop(g, None)
            for key, gs in self.group_of.items():
                if stale & set(gs):
                    self.group_of[key] = [g for g in gs if g not in stale]
            for layer, sites in list(self.masks.items()):
                self.masks[layer] = [site for site in sites if site[0] not in stale]
                if not self.masks[layer]:  # it masked only the groups the heads replace
                    del self.masks[layer]
            gname = producers[0]
            self.groups[gname] = Group(
                gname,
                att.width,
                [(p, True) for p in producers],
                multiple=att.unit,
                fixed=None if att.heads > 1 else "a single head",
            )
            for p in producers:
                for g in self.group_of.get((p, False), []):
                    self.groups[g].embedding = True
                self.group_of[(p, True)] = [gname]
                self.masks.pop(p, None)
                # rows per unit of the choice: interleaved, a head's q, k and v rows
                rows = att.rows_per_unit(p)
                if rows > 1:
                    self.per_channel[(p, True, gname)] = rows
                norm = att.norm_of(p)
                if norm is not None:  # the batch norm on its rows (LeViT's LinearNorm)
                    self.group_of[(norm, True)] = [gname]
                    self.masks.pop(norm, None)
                    if rows > 1:
                        self.per_channel[(norm, True, gname)] = rows
            self.group_of[(att.out, False)] = [gname]
            for side in mixing:
                self.group_of[side] = [gname]
                self.masks.pop(side[0], None)
            for side in following:  # v's rows: value_dim per head
                if side[1] or isinstance(net.get_submodule(side[0]), nn.Conv2d):
                    self.group_of[side] = [gname]
                    self.per_channel[(*side, gname)] = att.value_dim
                self.masks.pop(side[0], None)
            if att.steps:  # by heads: the output projection's columns and the products per head
                self.per_channel[(att.out, False, gname)] = att.value_dim
                self.per_channel[(att.scores, True, gname)] = att.head_dim + att.value_dim
            out[gname] = att
            if att.masked_at_out:  # what a pruned head gives the others: the mixers' inputs,
                # and what it gives the output projection (v_local's part included)
                vd = att.value_dim
                self.input_masks[att.out] = [(gname, 0, True, vd, vd)]
                for m in att.mixers:
                    self.input_masks[m] = [(gname, 0, True)]
                continue
            v_layer, v_first = att.rows[att.masked]
            v_layer = att.norm_of(v_layer) or v_layer  # masked after the norm on its rows
            if att.steps:  # a head's v rows, one block every step rows
                step = att.steps[att.masked]
                self.masks[v_layer] = [(gname, v_first, True, att.size(att.masked), step)]
            else:
                self.masks[v_layer] = [(gname, v_first, True)]
        self.groups = dict(sorted(self.groups.items(), key=lambda kv: order.get(kv[0], len(order))))
        return out

    def _stage_outputs(self) -> dict[str, list[str]]:
        """Per stage, the group of each block's output (the group with a member that writes
        inside the block and one that reads outside it), when every block has one: what the
        layers after the stage read, at depth d block d-1's. One group for the whole stage
        when its residual stream is one group."""
        out: dict[str, list[str]] = {}
        for st in self.stages.values():
            if st.consumer is not None:
                continue  # every block's output is read (concatenated), none is "the last"
            per_block = []
            for block in st.blocks:
                reads = {
                    g
                    for (lay, o), gs in self.group_of.items()
                    if not o and not within(lay, block)
                    for g in gs
                }
                found = self._written_in(block) & reads
                if len(found) != 1:
                    break
                per_block.append(found.pop())
            if len(per_block) == len(st.blocks) and len(set(per_block)) > 1:
                out[st.name] = per_block
        return out

    def _drop_overlaps(self, net: nn.Module) -> None:
        """Groups that the graph maps onto more channels of a layer than it has (an op it
        cannot follow, such as a channel slice) keep their width, and that layer's channels
        count as fixed."""
        modules = dict(net.named_modules())
        for (layer, out), groups in list(self.group_of.items()):
            mod = modules.get(layer)
            if isinstance(mod, (nn.Conv1d, nn.Conv2d)):
                channels = mod.out_channels if out else mod.in_channels
            elif isinstance(mod, nn.Linear):
                channels = mod.out_features if out else mod.in_features
            elif mod is not None and out and out_channels_of(mod) > 0:
                channels = out_channels_of(mod)
            else:
                continue
            spans = sum(
                self.groups[g].full * self.per_channel.get((layer, out, g), 1) for g in groups
            )
            if spans > channels:
                for g in groups:
                    self.groups[g].fixed = (
                        f"its channels do not map onto {layer} (an op the graph cannot "
                        "follow, such as a channel slice or a conv along the channels)"
                    )
                self.group_of[(layer, out)] = []

    def full_shape(self) -> Shape:
        return Shape(
            widths={g.name: g.full for g in self.groups.values()},
            depths={s.name: len(s.blocks) for s in self.stages.values()},
        )

    def searchable_groups(self) -> dict[str, Group]:
        return {n: g for n, g in self.groups.items() if g.fixed is None}

    def where(self, module_name: str) -> tuple[str | None, int]:
        """(stage, block index) of a layer inside a skippable block, else (None, 0)."""
        for block, (stage, i) in self.stage_of.items():
            if within(module_name, block):
                return stage, i
        return None, 0


def within(name: str, prefix: str) -> bool:
    """Is the module ``name`` the module ``prefix`` or inside it?"""
    return name == prefix or name.startswith(prefix + ".")


def _resolve(parent: dict[str, str], g: str) -> str:
    while parent[g] != g:
        g = parent[g]
    return g


def _channel_groups(
    net: nn.Module, model: str, example: Example, keep: dict[str, str], inside: Sequence[str]
) -> tuple[
    dict[str, Group],
    dict[tuple[str, bool], list[str]],
    dict[str, list[MaskSite]],
    dict[tuple[str, bool, str], int],
]:
    """Torch-Pruning's coupled channel groups of ``net`` as width choices.

    Returns the groups and, for every (layer, out?) pair, the groups its channels belong to
    (several for the input of a layer after a concatenation), in channel order. A group that
    holds the output channels of a layer in ``keep`` (layer -> why) keeps its width. No group
    is rooted at a layer of ``inside`` (an attention's, whose heads replace its groups:
    Torch-Pruning's walk maps every channel through the heads' reshapes, for minutes).
    """

    names: dict[Any, str] = {m: n for n, m in net.named_modules()}
    names.update({p: f"param:{n}" for n, p in net.named_parameters()})  # unwrapped parameters
    modules = dict(net.named_modules())
    kept = [modules[n] for n in keep if n in modules]
    groups: dict[str, Group] = {}
    group_of: dict[tuple[str, bool], list[str]] = {}  # the groups of a layer's in/out channels
    offsets: dict[tuple[str, bool, str], int] = {}  # where a group's channels start in a layer
    spans: dict[tuple[str, bool, str], int] = {}  # how many of the layer's channels it spans
    parent: dict[str, str] = {}
    nodes: dict[Any, Any] = {}
    convs = (nn.Conv2d, nn.Linear)
    roots_not = kept + [modules[n] for n in inside]
    for scope, mod_scope, scope_example, dg, tp_groups in scopes(net, model, example, roots_not):
        nodes.update(dg.module2node)
        for tp_group in tp_groups:
            parts = 1
            if (whole := chunked(dg, tp_group)) is not None:
                tp_group, parts = whole
            root_dep = tp_group[0].dep
            root = names.get(root_dep.target.module)
            if root is None or root in groups:
                continue
            full = len(tp_group[0].idxs)
            if scope and not internal(mod_scope, scope_example, root_dep, full, names, scope):
                continue  # crosses the traced block's boundary: left unsearched
            root_out = root_dep.handler.__name__ == "prune_out_channels"
            gname = root
            g = Group(gname, full // parts, [(root, root_out)], scope=scope, segments=parts)
            why: str | None = None
            for dep, idxs in tp_group:
                mod = dep.target.module
                layer = names.get(mod)
                if layer is None:
                    continue
                out = dep.handler.__name__ == "prune_out_channels" or layer.startswith("param:")
                if out and layer in keep:
                    why = keep[layer]
                seg = group_of.setdefault((layer, out), [])
                if gname not in seg:
                    seg.append(gname)
                    offsets[(layer, out, gname)] = min(int(i) for i in idxs)
                    spans[(layer, out, gname)] = len(idxs)
            if why is not None:
                g.fixed = why
            groups[gname] = g
            parent[gname] = gname
    # A grouped (not depthwise) conv keeps whole groups: its input and output widths are tied
    # and move in steps of the group size.
    for layer, mod in net.named_modules():
        if not isinstance(mod, nn.Conv2d) or mod.groups == 1:
            continue
        gi, go = group_of.get((layer, False)), group_of.get((layer, True))
        if gi is None or go is None or len(gi) != 1 or len(go) != 1:
            continue
        ri, ro = _resolve(parent, gi[0]), _resolve(parent, go[0])
        if mod.in_channels != mod.out_channels:
            for r in (ri, ro):
                groups[r].fixed = f"grouped conv {layer} changes the width"
            continue
        if ri != ro:
            parent[ro] = ri
            groups[ri].roots += groups[ro].roots
            groups[ri].fixed = groups[ri].fixed or groups[ro].fixed
            if groups[ri].segments != groups[ro].segments:
                groups[ri].fixed = f"grouped conv {layer} reads a chunked part"
        per = mod.out_channels // mod.groups
        g = groups[ri]
        g.multiple = math.lcm(g.multiple, per)
    # A GroupNorm keeps whole groups: its width moves in steps of its channels per group
    # (the group count follows, `prune_with`), so the kept channels are normalised exactly as
    # in the unpruned network.
    for layer, mod in net.named_modules():
        if not isinstance(mod, nn.GroupNorm) or mod.num_groups == 1:
            continue
        roots = {_resolve(parent, g) for g in group_of.get((layer, True), [])}
        per = mod.num_channels // mod.num_groups
        for r in roots:
            if len(roots) > 1:
                groups[r].fixed = groups[r].fixed or f"GroupNorm {layer} spans several groups"
            groups[r].multiple = math.lcm(groups[r].multiple, per)
    merged = {n: g for n, g in groups.items() if parent[n] == n}
    group_of = {k: list(dict.fromkeys(_resolve(parent, g) for g in v)) for k, v in group_of.items()}
    # A group is named by the first layer (in module order) whose outputs are exactly its
    # channels, as the network was written (not a projection tasprune inserted); groups are
    # listed in module order.
    order = {n: i for i, n in enumerate(modules)}
    writers: dict[str, list[str]] = {}
    for (layer, out), gs in group_of.items():
        mod = modules.get(layer)
        optional = getattr(mod, "tasprune_optional", False)
        if out and len(gs) == 1 and isinstance(mod, convs) and not optional:
            writers.setdefault(gs[0], []).append(layer)
    rename: dict[str, str] = {}
    for gname in merged:
        first = min(writers.get(gname, [gname]), key=lambda n: order.get(n, len(order)))
        if first != gname and first not in merged and first not in rename.values():
            rename[gname] = first
    if rename:
        for old, new in rename.items():
            parent[old], parent[new] = new, new
            merged[new] = groups[new] = merged.pop(old)
            merged[new].name = new
        group_of = {k: [rename.get(g, g) for g in v] for k, v in group_of.items()}
        offsets = {(ly, o, rename.get(g, g)): v for (ly, o, g), v in offsets.items()}
        spans = {(ly, o, rename.get(g, g)): v for (ly, o, g), v in spans.items()}
    merged = dict(sorted(merged.items(), key=lambda kv: order.get(kv[0], len(order))))
    for grp in merged.values():
        if grp.full % grp.multiple:
            grp.fixed = (
                grp.fixed or f"width {grp.full} is not a multiple of its conv or norm groups"
            )
    resolved: dict[tuple[str, bool, str], int] = {}
    for (layer, out, gn), off in offsets.items():
        key = (layer, out, _resolve(parent, gn))
        resolved[key] = min(off, resolved.get(key, off))
    masks = _mask_sites(net, nodes, names, group_of, resolved)
    per_channel = {  # layer channels per group channel (a flatten before a Linear: H*W)
        (layer, out, _resolve(parent, gn)): n // groups[_resolve(parent, gn)].full
        for (layer, out, gn), n in spans.items()
        if n > groups[_resolve(parent, gn)].full
    }
    for layer, sites in masks.items():  # a chunked output: each part masked alike
        masks[layer] = [
            (g, off + s * merged[g].full, mix)
            for g, off, mix, *_ in sites
            for s in range(per_channel.get((layer, True, g), 1) if merged[g].segments > 1 else 1)
        ]
    return merged, group_of, masks, per_channel


def _mask_sites(
    net: nn.Module,
    nodes: dict[Any, Any],
    names: dict[Any, str],
    group_of: dict[tuple[str, bool], list[str]],
    offsets: dict[tuple[str, bool, str], int],
) -> dict[str, list[MaskSite]]:
    """Where the search applies each group's width mixture: layer -> [(group, first channel,
    mix?)]. A group's mixture is applied once per branch, after the normalisation that
    follows its conv (mix); layers whose input already carries the mixture (a depthwise conv
    tied to its producer, a norm after a concatenation) only zero the channels beyond the
    widest sampled candidate (support). ``group_of`` and ``offsets`` name merged groups."""
    norm = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
    prunable = (nn.Conv2d, nn.Linear)

    def neighbour(node: Any, forward: bool) -> Any:
        """The next (or previous) named layer through single-input element-wise ops."""
        for _ in range(8):
            nxt = node.outputs if forward else node.inputs
            if len(nxt) != 1:
                return None
            node = nxt[0]
            if names.get(node.module) is not None:
                return node
        return None

    sites: dict[str, list[MaskSite]] = {}
    modules = dict(net.named_modules())
    for (layer, out), groups in group_of.items():
        mod = modules.get(layer)
        if not out or mod is None or not isinstance(mod, (*prunable, *norm)):
            continue
        node = nodes.get(mod)
        if isinstance(mod, prunable):
            after = neighbour(node, True) if node is not None else None
            if (
                after is not None
                and isinstance(after.module, norm)
                and group_of.get((names[after.module], True)) == groups
            ):
                continue  # its norm carries the mixture
            tied = set(groups) if tied_conv(mod) else set()
            tied |= set(group_of.get((layer, False), []))
            sites[layer] = [(g, offsets[(layer, True, g)], g not in tied) for g in groups]
            continue
        before = neighbour(node, False) if node is not None else None
        conv = names.get(before.module) if before is not None else None
        entry: set[str] = set()
        if conv is not None and isinstance(modules.get(conv), prunable):
            tied = set(group_of.get((conv, False), []))
            entry = set() if tied_conv(modules[conv]) else {g for g in groups if g not in tied}
        sites[layer] = [(g, offsets[(layer, True, g)], g in entry) for g in groups]
    return sites


def call_shapes(
    net: nn.Module, example: Example, names: Sequence[str]
) -> dict[str, list[tuple[int, ...]]]:
    """The output shapes of the sub-modules ``names``, call by call, in one forward of ``net``
    on ``example`` (an empty list: not called)."""
    shapes: dict[str, list[tuple[int, ...]]] = {n: [] for n in names}

    def hook(name: str) -> Any:
        def record(m: nn.Module, args: Any, out: Any) -> None:
            shapes[name].append(tuple(out.shape) if isinstance(out, torch.Tensor) else ())

        return record

    hooks = [net.get_submodule(n).register_forward_hook(hook(n)) for n in shapes]
    try:
        with torch.no_grad():
            call(net, example)
    finally:
        for h in hooks:
            h.remove()
    return shapes
