"""The cost of a traced network in the one cost language (`tasprune.models.algebra`): per
conv/linear the widths of its input and output groups, its kernel, groups and the output size
one call gives it; other parameters scale with their group's width; each block weighted by its
keep probability. The same function gives exact integers on a shape and the differentiable
expectation under the search's distributions, and equals `torch.utils.flop_counter`'s count
of the physically pruned network (checked by the analysis on every network).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from tasprune.errors import ConfigError
from tasprune.latency_table import Op
from tasprune.models.algebra import Counter, ExactAlgebra
from tasprune.models.analysis import Layer, output_shapes
from tasprune.models.graph import out_channels_of
from tasprune.models.sources import Example, call, images_in

if TYPE_CHECKING:
    from tasprune.models.analysis import Traced

# (layers, other parameters: (name, numel, groups, channels, stage, block index), the rest:
# MACs per image outside every conv/linear the analysis reads, constant under pruning)
Layers = tuple[
    tuple[Layer, ...],
    tuple[tuple[str, int, tuple[str, ...], int, str | None, int], ...],
    int,
]


def countable_attention() -> Any:
    """Scaled dot-product attention on its math kernel, whose matrix products the FLOP
    counter sees (the fused CPU kernels escape it: their attention would count as 0)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


@contextlib.contextmanager
def counting(net: nn.Module) -> Iterator[FlopCounterMode]:
    """Count the FLOPs of no-grad calls of ``net``: `torch.utils.flop_counter` with attention
    on its countable kernel (`countable_attention`) and ``net``'s parameters frozen meanwhile
    (the counter's module tracker fails on a view of a parameter taken under no_grad, which
    still requires grad: CaiT's class token)."""
    frozen = [p for p in net.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        with FlopCounterMode(display=False) as fc, torch.no_grad(), countable_attention():
            yield fc
    finally:
        for p in frozen:
            p.requires_grad_(True)


def cost_layers(
    tr: Traced, net: nn.Module, example: Example, fix: str = "use larger images or another model"
) -> Layers:
    """The conv/linear layers of ``net`` (an unpruned network ``tr`` describes) and its other
    parameters, with the sizes one call on ``example`` gives them (``fix``: what to say when
    the network does not run on it)."""
    net = net.eval()
    image = example[0] if example and isinstance(example[0], Tensor) else None
    in_channels = int(image.shape[1]) if image is not None and image.dim() == 4 else 0
    # Every call of a layer: one shared by several inputs (a detection head applied to each
    # pyramid level) costs the sum of its calls.
    sizes: dict[str, list[tuple[tuple[int, ...], tuple[int, ...]]]] = {}
    hooks = []
    for name, mod in net.named_modules():
        if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            hooks.append(
                mod.register_forward_hook(
                    lambda m, i, o, n=name: sizes.setdefault(n, []).append(
                        (tuple(i[0].shape), tuple(o.shape))
                    )
                )
            )
    try:
        with counting(net) as fc:
            call(net, example)
    except Exception as err:  # the model's own message, in one line
        shapes = [s[1:] if len(s) == 4 else s for s in output_shapes(example)]
        described = ", ".join("x".join(map(str, s)) for s in shapes) or "its example"
        raise ConfigError(
            f"{tr.model} does not run on a {described} input: "
            f"{str(err).splitlines()[0][:200]}. Fix: {fix}"
        ) from None
    finally:
        for h in hooks:
            h.remove()
    # Costs are per image: the example's images, else the batch of the first conv/linear call
    # (several rows per image where a layer runs on windows or crops: TNT's first conv).
    first = next((calls[0][0][0] for calls in sizes.values() if calls[0][0]), 1) or 1
    images = images_in(example) or first
    layers: list[Layer] = []
    others: list[tuple[str, int, tuple[str, ...], int, str | None, int]] = []
    for name, mod in net.named_modules():
        stage, index = tr.where(name)
        if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            if name not in sizes:
                continue  # never called (an unused head)
            calls = sizes[name]
            inp = calls[0][0]
            conv = isinstance(mod, (nn.Conv1d, nn.Conv2d))
            # output positions: a conv's batch x spatial size, a linear's rows
            pos = sum(
                out[0] * math.prod(out[2:]) if conv else math.prod(out[:-1]) for _, out in calls
            )
            pos //= images
            layers.append(
                Layer(
                    name,
                    mod.in_channels if conv else mod.in_features,  # type: ignore[arg-type]
                    mod.out_channels if conv else mod.out_features,  # type: ignore[arg-type]
                    tuple(tr.group_of.get((name, False), ())),
                    tuple(tr.group_of.get((name, True), ())),
                    math.prod(mod.kernel_size) if conv else 1,  # type: ignore[arg-type]
                    mod.groups if conv else 1,  # type: ignore[arg-type]
                    pos,
                    mod.bias is not None,
                    stage,
                    index,
                    sum(
                        p.numel()
                        for n, p in mod.named_parameters(recurse=False)
                        if n not in ("weight", "bias")
                    ),
                    op_of(mod, inp, in_channels, name in tr.outputs),
                    bool(getattr(mod, "tasprune_optional", False)),
                )
            )
            continue
        own = list(mod.named_parameters(recurse=False))
        for att in tr.attention.values():
            if att.name == name:
                layers.append(_scores(tr, att, sizes, images, stage, index))
        if not own:
            continue
        groups = tuple(tr.group_of.get((name, True), ()))
        if groups:  # a normalisation layer of a group: all its parameters scale
            channels = out_channels_of(mod) or sum(tr.groups[g].full for g in groups)
            numel = sum(p.numel() for _, p in own)
            others.append((name, numel, groups, channels, stage, index))
            continue
        for pname, p in own:  # a parameter the graph prunes itself (a layer scale)
            full = f"{name}.{pname}" if name else pname
            groups = tuple(tr.group_of.get((f"param:{full}", True), ()))
            channels = sum(tr.groups[g].full for g in groups) or 1
            others.append((full, p.numel(), groups, channels, stage, index))
    found: Layers = (tuple(layers), tuple(others), 0)
    # What the counter sees beyond the layers read here (token products of an attention
    # whose heads are not read, say): a constant, checked by the analysis under pruning.
    c = Counter(ExactAlgebra(tr.full_shape()))
    traced_cost(tr, c, found)
    # the inserted projections run at full width here, where the cost gives them none
    projections = sum(
        ly.cin * ly.cout // ly.groups * ly.kernel * ly.hw for ly in layers if ly.optional
    )
    rest = int(fc.get_total_flops() // 2) // images - int(c.flops) - projections
    return (found[0], found[1], rest) if rest > 0 else found


def _scores(
    tr: Traced,
    att: Any,
    sizes: dict[str, list[tuple[tuple[int, ...], tuple[int, ...]]]],
    images: int,
    stage: str | None,
    index: int,
) -> Layer:
    """The token-token products of one attention module (q k^T and the weights times v) as
    a layer without weights: per attention instance (a batch row, a window) q tokens x k
    tokens x the heads' width, twice (across channels: tokens x head width x the heads'
    width, twice); read off the outputs of its q and k projections."""
    group = tr.group_of[(att.rows[0][0], True)][0]
    calls_q = sizes[att.rows[0][0]]
    calls_k = sizes[att.rows[1][0]]

    def tokens(shape: tuple[int, ...], layer: str) -> int:  # a 1x1 conv's: its positions
        conv = isinstance(tr.template.get_submodule(layer), nn.Conv2d)
        return math.prod(shape[2:]) if conv else math.prod(shape[1:-1])

    # contiguous: both products per channel of the choice; interleaved (the choice counts
    # heads): per head head_dim + value_dim (`Traced.per_channel`)
    # across channels (XCiT's): per channel, the head's other channels x tokens, twice
    twice = 1 if att.steps else 2
    pos = 0
    for (_, q), (_, k) in zip(calls_q, calls_k, strict=True):
        pairs = att.head_dim if att.across else tokens(k, att.rows[1][0])
        pos += twice * q[0] * tokens(q, att.rows[0][0]) * pairs
    (_, q), (_, k) = calls_q[0], calls_k[0]
    op = Op(
        "attention",
        size=(tokens(q, att.rows[0][0]), tokens(k, att.rows[1][0])),
        head_dim=att.head_dim,
        instances=max(1, q[0] // images),
        value_dim=att.value_dim if att.steps else 0,
        across=att.across,
    )
    return Layer(
        att.scores,
        1,
        att.heads * (att.head_dim + att.value_dim) if att.steps else att.width,
        (),
        (group,),
        1,
        1,
        pos // images,
        False,
        stage,
        index,
        op=op,
        weights=False,
    )


# A side of a layer: its groups as (group, channels per group channel, the stage whose mixed
# output it reads or None, the (stage, block) of each further segment of the group that is
# there only while that block is kept), the fixed rest of its channels, and the fixed-width
# segments there only while their block is kept (channels, stage, block). The segments are a
# concatenation of every block's output (YOLO's C2f).
Keeps = tuple[tuple[str, int], ...]
Side = tuple[tuple[tuple[str, int, str | None, Keeps], ...], int, tuple[tuple[int, str, int], ...]]
_PLANS: dict[int, tuple[Layers, Any]] = {}


def _plan(tr: Traced, found: Layers) -> Any:
    """What `traced_cost` reads of every layer that does not depend on the shape: each side's
    groups, their multiplicities and fixed rest, computed once per (analysis, layers)."""
    hit = _PLANS.get(id(found))
    if hit is not None and hit[0] is found and hit[1][0] is tr:
        return hit[1][1]
    # A layer after a stage whose blocks write their own output widths reads the width of the
    # last kept block: the stage's output, mixed over its depths.
    last = {blocks[-1]: stage for stage, blocks in tr.stage_outputs.items()}

    def side(layer: str, out: bool, groups: tuple[str, ...], total: int) -> Side:
        parts = []
        concat = [] if out else tr.concat_parts.get(layer, [])
        for g in groups:
            stage = last.get(g) if not out else None
            if stage is not None and tr.where(layer)[0] == stage:
                stage = None
            keeps = tuple((st, j) for st, j, bg, _ in concat if bg == g)
            m = tr.per_channel.get((layer, out, g), 1)
            parts.append((g, m - len(keeps), stage, keeps))
        rest = total - sum(tr.groups[g].full * (m + len(k)) for g, m, _, k in parts)
        fixed = tuple((w, st, j) for st, j, bg, w in concat if bg is None)
        return tuple(parts), rest - sum(w for w, _, _ in fixed), fixed

    layers, others, _ = found
    plan = (
        [
            (
                ly,
                side(ly.name, False, ly.in_groups, ly.cin),
                side(ly.name, True, ly.out_groups, ly.cout),
            )
            for ly in layers
        ],
        [
            (numel, side(name, True, groups, channels) if groups else None, channels, stage, index)
            for name, numel, groups, channels, stage, index in others
        ],
    )
    _PLANS[id(found)] = (found, (tr, plan))
    return plan


def traced_cost(tr: Traced, c: Counter, found: Layers) -> None:
    """The cost of a traced network (``found``: its `cost_layers` at some input), written
    once for the exact and the expected algebra."""
    a = c.alg
    layers, others = _plan(tr, found)

    def parts(spec: Side, full: bool = False) -> list[Any]:
        """(count, channels per count) making up a layer side's channels: its searched groups
        (a group may span several channels per group channel, after a flatten; a segment
        of a concatenated block counts as kept as its block), then the fixed rest. ``full``:
        every block's segment counted (the latency table's widths)."""
        groups, rest, fixed = spec

        def times(m: int, keeps: Keeps) -> Any:
            if full or not keeps:
                return m + len(keeps)
            return m + sum(a.keep(st, j) for st, j in keeps)

        out = [
            (
                a.width(g)
                if stage is None
                else a.stage_output(stage, [a.width(b) for b in tr.stage_outputs[stage]]),
                times(m, keeps),
            )
            for g, m, stage, keeps in groups
        ]
        out += [(a.const(w), 1 if full else a.keep(st, j)) for w, st, j in fixed]
        return [*out, (a.const(rest), 1)] if rest > 0 else out

    def mean(ps: list[Any]) -> Any:
        return sum(a.mean(p) * m for p, m in ps)

    for ly, in_side, out_side in layers:
        keep = a.keep(ly.stage, ly.index) if ly.stage else 1
        cin = parts(in_side)
        cout = parts(out_side)
        optional = ly.optional and len(cin) == len(cout) == 1
        if optional:  # exists only where its in and out widths differ
            (x, mx), (y, my) = cin[0], cout[0]
            weights = a.proj(x, y, 1) * (mx * my)
        elif ly.groups > 1:  # whole groups are kept: in-channels per group stay fixed
            weights = mean(cout) * (ly.cin // ly.groups)
        else:
            weights = sum(a.prod(x, y) * (mx * my) for x, mx in cin for y, my in cout)
        c.flops = c.flops + keep * weights * (ly.kernel * ly.hw)
        if ly.weights:  # else a product of activations
            c.params = c.params + keep * weights * ly.kernel
        if c.table is not None and ly.op is not None and optional:
            c.layer_latency(ly.op, a.total(cin), a.total(cout), keep, differ=True)
        elif c.table is not None and ly.op is not None:
            # a concatenation's segments at full depth: the table is read at whole widths
            tied = ly.op.per_group is not None
            width_out = a.total(cout)
            width_in = width_out if tied else a.total(parts(in_side, full=True))
            c.layer_latency(ly.op, width_in, width_out, keep)
        if ly.bias:
            c.params = c.params + keep * mean(cout)
        if ly.extra:
            c.params = c.params + keep * mean(cout) * (ly.extra // ly.cout)
    for numel, spec, channels, stage, index in others:
        keep = a.keep(stage, index) if stage else 1
        if spec is not None:
            share = mean(parts(spec))
            c.params = c.params + keep * share * (numel // channels)
        else:
            c.params = c.params + keep * numel
    c.flops = c.flops + found[2]


def op_of(mod: nn.Module, inp: tuple[int, ...], in_channels: int, head: bool) -> Op:
    """The latency-table geometry of a conv or linear that saw an input of shape ``inp``
    (``head``: it produces the network's outputs, which are never padded)."""
    if isinstance(mod, nn.Linear):
        return Op("linear", size=tuple(inp[1:-1]), head=head)
    assert isinstance(mod, (nn.Conv1d, nn.Conv2d))
    pad = mod.padding if isinstance(mod.padding, tuple) else (0,) * len(mod.kernel_size)
    per_group = None
    if mod.groups > 1:
        per_group = (mod.in_channels // mod.groups, mod.out_channels // mod.groups)
    return Op(
        "conv2d" if isinstance(mod, nn.Conv2d) else "conv1d",
        tuple(mod.kernel_size),
        tuple(mod.stride),
        tuple(int(p) for p in pad),
        tuple(mod.dilation),
        tuple(inp[2:]),
        per_group,
        image=mod.in_channels == in_channels and inp[1] == in_channels,
        head=head,
    )
