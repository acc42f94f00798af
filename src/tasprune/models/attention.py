"""Multi-head attention as a width choice: whole heads.

A multi-head attention module computes, per head h, softmax(q_h k_h^T) v_h and concatenates
the heads before an output projection. Its width choice is the number of heads kept (the
first k, in units of the head dimension): q, k and v lose the same rows, the output
projection the same input columns, and ``num_heads`` (with the attributes derived from it)
follows, as do the module's own tensors with one entry per head (a relative position bias
table), so the module's own forward runs unchanged on the smaller weights.

The searched network masks each head's v rows (the part that reaches the output: DaViT's channel
attention weighs q): a head with v = 0 adds nothing to the output projection's input, exactly as
if it were removed, so the searched mixture is the pruned network (no normalisation statistics
change, unlike masking the embedding width). Where heads mix before that (talking heads) or v
reaches the output another way (a depthwise conv on v), the output projection's input is
masked instead (`Attention.masked_at_out`).

Read off the module (no graph op is interpreted): a module with an integer ``num_heads`` (or
``n_heads``) and projections (linears or 1x1 convs) named as the common implementations name
them (a fused ``qkv`` or ``to_qkv``; ``q`` and ``kv``; ``qk`` and ``v``; or ``q``, ``k``, ``v``
(or ``wq``, ...); then ``proj``, ``o``, ``out_proj`` or ``merge``), whose widths agree, in the
contiguous or a by-heads layout (`Attention`). Other attention modules keep their heads, with
one log line naming them.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.models.maxvit import RelativePositionalMultiHeadAttention
from torchvision.models.swin_transformer import ShiftedWindowAttention, ShiftedWindowAttentionV2

from tasprune.models.torchvision_attention import (
    MaxVitAttention,
    SplitAttention,
    SwinAttention,
    SwinAttentionV2,
)

# (q, k, v) producers: child names and how many of q/k/v each holds, in row order.
_PATTERNS: tuple[tuple[tuple[str, int], ...], ...] = (
    (("qkv", 3),),
    (("q", 1), ("kv", 2)),
    (("qk", 2), ("v", 1)),
    (("q", 1), ("k", 1), ("v", 1)),
    (("q_proj", 1), ("k_proj", 1), ("v_proj", 1)),
    (("wq", 1), ("wk", 1), ("wv", 1)),
    (("to_qkv", 3),),
)
_OUTS = ("proj", "o", "out_proj", "o_proj", "merge")
_HEADS = ("num_heads", "n_heads")  # the head count's attribute
# Attention across channels (cross-covariance: XCiT, EdgeNeXt, DaViT), whose products are per
# channel pair within a head: read only as the subclasses that say so (``across_channels``), whose
# forward reads the head width off qkv (timm's derives it from the input's); else kept (logged).
_ACROSS_CHANNELS = ("XCA", "CrossCovarianceAttn", "ChannelAttention")
# Integer attributes that hold num_heads * head_dim (they follow the head count).
_INNER = ("attn_dim", "inner_dim", "all_head_dim", "all_head_size", "hidden_dim")
# ... and those that hold num_heads * the q/k or v width in the interleaved layout
_INNER_INTERLEAVED = ("key_attn_dim", "val_attn_dim", "out_dim", "dh")


@dataclass(frozen=True)
class Attention:
    """One multi-head attention module whose heads are a width choice.

    Two layouts of the q, k and v rows: *contiguous* (all heads' q, then all heads' k, then
    v: head h's rows of each part at its first row + h x head_dim), and *interleaved* (one
    fused projection whose rows go head by head, [q | k | v] of head 0, then of head 1: timm's
    LeViT, EfficientFormer, TinyViT and MaxxViT's ``head_first``), where v may be wider than
    q and k. The width choice counts channels (whole heads of ``head_dim``) in the contiguous
    layout and heads in the interleaved one (`unit`)."""

    name: str
    heads: int
    head_dim: int  # q's and k's width per head (v's too, unless v_dim says otherwise)
    rows: tuple[tuple[str, int], ...]  # (projection, head 0's first row) of q, k and v
    out: str  # the projection reading the heads' concatenation
    v_dim: int = 0  # v's width per head where it differs from head_dim
    # per part (q, k, v): rows from one head's block to the next's (interleaved); (): contiguous
    steps: tuple[int, ...] = ()
    across: bool = False  # products per channel pair within a head over the tokens (XCiT's)
    masked: int = 2  # the part whose rows the search zeroes: what reaches the output (v)
    # (projection, the batch norm on its rows: LeViT's LinearNorm): cut and masked with it
    norms: tuple[tuple[str, str], ...] = ()
    # talking heads: layers mixing the heads (heads -> heads linears or 1x1 convs applied to
    # the scores or weights: CaiT's proj_l/proj_w), cut in rows and columns with the heads;
    # the search then masks their inputs and the output projection's (what a pruned head
    # would have given the others), not v
    mixers: tuple[str, ...] = ()
    # depthwise convs on v's rows whose output joins the heads' (EfficientFormerV2's v_local),
    # each with the batch norm on its rows or None: cut with v, and v is then masked at the
    # output projection's input, as with mixers
    followers: tuple[tuple[str, str | None], ...] = ()

    @property
    def masked_at_out(self) -> bool:
        """The search masks the output projection's input (and the mixers'), not v."""
        return bool(self.mixers or self.followers)

    @property
    def value_dim(self) -> int:
        return self.v_dim or self.head_dim

    @property
    def unit(self) -> int:
        """The width choice's step: one head's channels, or one head (interleaved)."""
        return 1 if self.steps else self.head_dim

    def size(self, part: int) -> int:
        """q's, k's (0, 1) or v's (2) rows per head."""
        return self.value_dim if part == 2 else self.head_dim

    def rows_per_unit(self, layer: str) -> int:
        """The rows of ``layer`` one unit of the width choice holds."""
        parts = [i for i, (name, _) in enumerate(self.rows) if name == layer]
        return sum(self.size(i) for i in parts) if self.steps else len(parts)

    def norm_of(self, layer: str) -> str | None:
        """The batch norm on ``layer``'s rows, if any."""
        return dict(self.norms).get(layer)

    @property
    def width(self) -> int:
        """The width choice's full value: every head's channels, or the head count."""
        return self.heads * self.unit

    @property
    def scores(self) -> str:
        """The name of its token products as a layer of the cost (`layer_cost`)."""
        return f"{self.name}:scores"

    def producers(self) -> list[str]:
        return list(dict.fromkeys(layer for layer, _ in self.rows))

    def inside(self) -> list[str]:
        """The layers whose channels move with the heads and nothing else: the q/k/v
        projections, the mixers and the followers' convs (not the output projection, whose
        output is the embedding)."""
        return [*self.producers(), *self.mixers, *(conv for conv, _ in self.followers)]

    def part_rows(self, part: int, heads: Sequence[int]) -> list[int]:
        """The rows of q (part 0), k (1) or v (2) of ``heads``, in that order."""
        first, size = self.rows[part][1], self.size(part)
        step = self.steps[part] if self.steps else size
        return [first + h * step + i for h in heads for i in range(size)]

    def out_columns(self, heads: Sequence[int]) -> list[int]:
        """The output projection's input columns that read ``heads``, in that order."""
        return [h * self.value_dim + i for h in heads for i in range(self.value_dim)]


def is_attention(mod: nn.Module) -> bool:
    """A multi-head attention module: ``nn.MultiheadAttention``, or a module with an integer
    ``num_heads`` whose class names attention (XCiT's cross-covariance ``XCA`` included)."""
    cls = type(mod).__name__
    heads = head_count(mod) is not None
    named = "Attn" in cls or "Attention" in cls or cls in _ACROSS_CHANNELS
    return isinstance(mod, nn.MultiheadAttention) or (heads and named)


def find_attention(net: nn.Module) -> tuple[list[Attention], list[tuple[str, str]]]:
    """The attention modules of ``net`` whose heads can be searched, and (name, class) of
    the others."""
    found: list[Attention] = []
    other: list[tuple[str, str]] = []
    for name, mod in attention_modules(net):
        att = _read(name, mod)
        if att is None:
            other.append((name, type(mod).__name__))
        else:
            found.append(att)
    return found, other


def attention_modules(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """The multi-head attention modules of ``net`` (`is_attention`), innermost: a wrapper
    around one (MaxViT's PartitionAttentionLayer, which also holds its head count) is not."""
    return [
        (n, m)
        for n, m in net.named_modules()
        if is_attention(m) and not any(is_attention(s) for s in m.modules() if s is not m)
    ]


def head_count(mod: nn.Module) -> int | None:
    """The head count an attention module holds (``num_heads``, ``n_heads``), None if none."""
    return next((h for a in _HEADS if isinstance(h := getattr(mod, a, None), int)), None)


def _projection(mod: nn.Module | None) -> bool:
    """A linear, or a 1x1 conv (an attention on a feature map): rows are output channels."""
    if isinstance(mod, nn.Conv2d):
        return mod.kernel_size == (1, 1) and mod.groups == 1
    return isinstance(mod, nn.Linear)


def _rows(mod: nn.Module) -> int:
    """A projection's output rows (a linear's or a 1x1 conv's weight: out x in [x 1 x 1])."""
    return int(mod.weight.shape[0])  # type: ignore[union-attr,index]


def _columns(mod: nn.Module) -> int:
    """A projection's input columns."""
    return int(mod.weight.shape[1])  # type: ignore[union-attr,index]


def _cut(mod: nn.Linear | nn.Conv2d, dim: int, index: Tensor) -> None:
    """Keep the projection's output rows (``dim`` 0, its bias too) or input columns (1) at
    ``index``, in place, its width attribute following."""
    mod.weight = nn.Parameter(mod.weight.detach().index_select(dim, index).clone())
    if dim == 0 and mod.bias is not None:
        mod.bias = nn.Parameter(mod.bias.detach().index_select(0, index).clone())
    linear = isinstance(mod, nn.Linear)
    attr = ("out_features", "in_features")[dim] if linear else ("out_channels", "in_channels")[dim]
    setattr(mod, attr, len(index))


def _linear(mod: nn.Module, child: str) -> tuple[str, str | None] | None:
    """(path, path of the batch norm on its rows or None) of the projection that child
    ``child`` of ``mod`` is: a projection; a projection and a batch norm on its rows (LeViT's
    LinearNorm, ConvNorm); or the last of a sequence after parameter-free modules (an
    activation, a subsampling: LeViT's ``proj``, its downsampling attention's ``q``)."""
    sub = getattr(mod, child, None)
    if not isinstance(sub, nn.Module):
        return None
    if _projection(sub):
        return child, None
    kids = list(sub.named_children())
    if _normed(kids) and _projection(kids[0][1]):
        return f"{child}.{kids[0][0]}", f"{child}.{kids[1][0]}"
    if isinstance(sub, nn.Sequential) and kids:
        if _has_parameters([k for _, k in kids[:-1]]):
            return None
        return _under(child, _linear(sub, kids[-1][0]))
    if "proj" in dict(kids):  # a module ending in its projection (EfficientFormerV2's
        return _under(child, _linear(sub, "proj"))  # LocalGlobalQuery)
    return None


def _under(child: str, link: tuple[str, str | None] | None) -> tuple[str, str | None] | None:
    """A (projection, norm) found inside ``child``, as paths from its parent."""
    if link is None:
        return None
    return f"{child}.{link[0]}", None if link[1] is None else f"{child}.{link[1]}"


def _normed(kids: list[tuple[str, nn.Module]]) -> bool:
    """Children that are a layer, a batch norm on its rows and nothing with parameters after
    (LeViT's LinearNorm, Ultralytics' Conv with its identity activation)."""
    norms = (nn.BatchNorm1d, nn.BatchNorm2d)
    rest = [k for _, k in kids[2:]]
    return len(kids) >= 2 and isinstance(kids[1][1], norms) and not _has_parameters(rest)


def _has_parameters(mods: list[nn.Module]) -> bool:
    return any(True for m in mods for _ in m.parameters())


def _depthwise(mod: nn.Module, child: str, channels: int) -> tuple[str, str | None] | None:
    """(path, its batch norm's path or None) of child ``child`` of ``mod`` when it is a
    depthwise conv on ``channels`` channels (or one with a batch norm on its rows)."""
    sub = getattr(mod, child, None)
    kids = list(sub.named_children()) if isinstance(sub, nn.Module) else []
    conv: nn.Module | None = sub if isinstance(sub, nn.Conv2d) else None
    norm: str | None = None
    if _normed(kids):
        conv, norm = kids[0][1], f"{child}.{kids[1][0]}"
    if not isinstance(conv, nn.Conv2d) or not conv.in_channels == conv.out_channels == channels:
        return None
    if conv.groups != channels:
        return None
    return (child if conv is sub else f"{child}.{kids[0][0]}"), norm


def _read(name: str, mod: nn.Module) -> Attention | None:
    heads = head_count(mod)
    if isinstance(mod, nn.MultiheadAttention) or heads is None or heads < 1:
        return None
    across = bool(getattr(type(mod), "across_channels", False))
    if type(mod).__name__ in _ACROSS_CHANNELS and not across:
        return None
    out = next((link for o in _OUTS if (link := _linear(mod, o)) is not None), None)
    if out is None:
        return None
    mixers = tuple(
        f"{name}.{c}" if name else c
        for c, sub in mod.named_children()
        if _projection(sub) and _rows(sub) == _columns(sub) == heads
    )
    width = _columns(mod.get_submodule(out[0]))  # the heads' concatenation: heads x v's width
    if width % heads:
        return None
    prefix = f"{name}." if name else ""
    links = {c: _linear(mod, c) for c in ("qkv", "to_qkv", "q", "kv", "k", "v")}
    interleaved = _interleaved(mod, links, heads, width)
    if interleaved is not None:
        norms = tuple((prefix + p, prefix + n) for p, n in filter(None, links.values()) if n)
        rows = tuple((prefix + layer, first) for layer, first in interleaved.rows)
        v_rows = interleaved.heads * interleaved.value_dim
        followers = tuple(
            (prefix + f[0], None if f[1] is None else prefix + f[1])
            for c in dict(mod.named_children())
            if (f := _depthwise(mod, c, v_rows)) is not None
        )
        return dataclasses.replace(
            interleaved,
            name=name,
            rows=rows,
            out=prefix + out[0],
            norms=norms,
            mixers=mixers,
            followers=followers,
        )
    if getattr(mod, "head_first", False) or hasattr(mod, "val_dim"):
        return None  # a layout of its own, not read
    kids = dict(mod.named_children())
    for pattern in _PATTERNS:
        mods = [kids.get(child) for child, _ in pattern]
        if not all(_projection(m) for m in mods):
            continue
        found: list[tuple[str, int]] = []
        for (child, parts), m in zip(pattern, mods, strict=True):
            assert m is not None
            if _rows(m) != parts * width:
                return None
            found += [(prefix + child, i * width) for i in range(parts)]
        head_dim = width // heads
        if getattr(mod, "head_dim", head_dim) != head_dim:
            return None
        masked = int(getattr(type(mod), "output_part", 2))
        # with talking heads the choice counts heads (whole heads mix), else channels
        steps = (head_dim,) * 3 if mixers else ()
        return Attention(
            name,
            heads,
            head_dim,
            tuple(found),
            prefix + out[0],
            steps=steps,
            across=across,
            masked=masked,
            mixers=mixers,
        )
    return None


def _interleaved(
    mod: nn.Module, links: dict[str, tuple[str, str | None] | None], heads: int, width: int
) -> Attention | None:
    """An attention whose rows go head by head (the choice counts heads), its layer names
    relative to ``mod`` (its name and output projection left blank), None if it is not one:
    recognised by the attributes timm's and Ultralytics' implementations carry, never guessed
    from the weights' shapes. With ``key_dim`` (q's and k's width per head; v's is ``val_dim``,
    else read off the output projection): one fused projection with [q | k | v] per head
    (LeViT, EfficientFormer, TinyViT, Ultralytics' Attention), q of its own and [k | v] per head
    (LeViT's downsampling attention), or q, k and v of their own (EfficientFormerV2). With
    ``head_first``: one fused projection chunked per head (MaxxViT)."""
    fused = next((link[0] for c in ("qkv", "to_qkv") if (link := links[c]) is not None), None)
    kd, vd = getattr(mod, "key_dim", None), getattr(mod, "val_dim", None)

    def rows_of(layer: str) -> int:
        return _rows(mod.get_submodule(layer))

    if isinstance(kd, int):
        vd = vd if isinstance(vd, int) else width // heads
        if vd * heads != width:
            return None
        v_dim = vd if vd != kd else 0
        q, kv, k, v = (links[c] for c in ("q", "kv", "k", "v"))
        if fused is not None and rows_of(fused) == heads * (2 * kd + vd):
            rows = ((fused, 0), (fused, kd), (fused, 2 * kd))
            return Attention("", heads, kd, rows, "", v_dim, (2 * kd + vd,) * 3)
        if q and kv and rows_of(q[0]) == heads * kd and rows_of(kv[0]) == heads * (kd + vd):
            rows = ((q[0], 0), (kv[0], 0), (kv[0], kd))
            return Attention("", heads, kd, rows, "", v_dim, (kd, kd + vd, kd + vd))
        if q and k and v and rows_of(q[0]) == rows_of(k[0]) == heads * kd:
            if rows_of(v[0]) != width:
                return None
            rows = ((q[0], 0), (k[0], 0), (v[0], 0))
            return Attention("", heads, kd, rows, "", v_dim, (kd, kd, vd))
        return None
    if getattr(mod, "head_first", False) is True and fused is not None:
        d = width // heads
        if rows_of(fused) == 3 * width:
            rows = ((fused, 0), (fused, d), (fused, 2 * d))
            return Attention("", heads, d, rows, "", 0, (3 * d,) * 3)
    return None


def _per_head(mod: nn.Module, att: Attention) -> list[tuple[str, Tensor, int]]:
    """(name, tensor, dim) of the tensors of ``mod`` and its children other than the
    projections with one entry per head along one dim (a relative position bias table),
    named by its class's ``head_tensors`` where it has them."""
    named = getattr(type(mod), "head_tensors", None)
    if named is not None:
        return [(n, getattr(mod, n), d) for n, d in named]
    start = len(att.name) + 1 if att.name else 0  # the children holding what moves with the
    projections = {p[start:].split(".")[0] for p in (*att.inside(), att.out)}  # heads
    found = []
    tensors = [*mod.named_parameters(recurse=False), *mod.named_buffers(recurse=False)]
    for child, sub in mod.named_children():  # a table in a child (MaxxViT's rel_pos), not
        if child not in projections and not _projection(sub):  # a norm's per-channel weight
            own = [*sub.named_parameters(), *sub.named_buffers()]
            tensors += [(f"{child}.{n}", t) for n, t in own if t.dim() >= 2]
    for pname, t in tensors:
        dims = [d for d, n in enumerate(t.shape) if n == att.heads]
        # one value per head (a relative position bias table), not an index (a table's)
        if len(dims) == 1 and t.is_floating_point():
            found.append((pname, t, dims[0]))
    return found


def _row_tensors(net: nn.Module, att: Attention, layer: str) -> list[Tensor]:
    """The tensors with one entry per row of producer ``layer``: its weight and bias, and
    those of the batch norm on its rows (affine and running statistics)."""
    lin = _projection_at(net, layer)
    found = [lin.weight] + ([lin.bias] if lin.bias is not None else [])
    norm = att.norm_of(layer)
    if norm is not None:
        found += [t for _, t in _channel_tensors(net.get_submodule(norm))]
    return found


def _channel_tensors(bn: nn.Module) -> list[tuple[str, Tensor]]:
    """A batch norm's tensors with one entry per channel (affine, running statistics)."""
    own = [*bn.named_parameters(recurse=False), *bn.named_buffers(recurse=False)]
    return [(name, t) for name, t in own if t.dim()]


def _cut_norm(bn: nn.Module, index: Tensor) -> None:
    """Keep a batch norm's channels at ``index`` (affine and running statistics), in place."""
    for name, t in _channel_tensors(bn):
        _set_tensor(bn, name, t.detach().index_select(0, index).clone(), t)
    bn.num_features = len(index)  # type: ignore[assignment]


def _set_tensor(mod: nn.Module, name: str, value: Tensor, like: Tensor) -> None:
    owner, _, attr = name.rpartition(".")
    target = mod.get_submodule(owner) if owner else mod
    if isinstance(like, nn.Parameter):
        setattr(target, attr, nn.Parameter(value, requires_grad=like.requires_grad))
    else:
        setattr(target, attr, value)


def _projection_at(net: nn.Module, name: str) -> nn.Linear | nn.Conv2d:
    mod = net.get_submodule(name)
    assert isinstance(mod, (nn.Linear, nn.Conv2d))
    return mod


def _forget_cached(mod: nn.Module) -> None:
    """Drop what the module cached from its per-head tensors (timm's attention bias cache)."""
    for sub in mod.modules():
        if isinstance(getattr(sub, "attention_bias_cache", None), dict):
            setattr(sub, "attention_bias_cache", {})  # noqa: B010


def permute_heads(net: nn.Module, att: Attention, order: list[int]) -> None:
    """Reorder the heads of ``att`` in ``net`` in place (new head j is old head order[j]):
    the same function, computed with the heads in another order."""
    every = range(att.heads)
    with torch.no_grad():
        for layer in att.producers():
            lin = _projection_at(net, layer)
            rows = torch.arange(lin.weight.shape[0])
            for part, (name, _) in enumerate(att.rows):
                if name == layer:
                    rows[att.part_rows(part, every)] = torch.tensor(att.part_rows(part, order))
            for t in _row_tensors(net, att, layer):
                t.copy_(t[rows.to(t.device)])
        out = _projection_at(net, att.out)
        columns = torch.tensor(att.out_columns(order), device=out.weight.device)
        out.weight.copy_(out.weight[:, columns])
        index = torch.tensor(order)
        mod = net.get_submodule(att.name)
        for _, t, dim in _per_head(mod, att):
            t.copy_(t.index_select(dim, index.to(t.device)))
        for name in getattr(type(mod), "head_rows", ()):
            t = mod.get_parameter(name)
            t[: att.heads].copy_(t[: att.heads].index_select(0, index.to(t.device)))
        for name in att.mixers:
            mixer = _projection_at(net, name)
            at = index.to(mixer.weight.device)
            mixer.weight.copy_(mixer.weight[at][:, at])
            if mixer.bias is not None:
                mixer.bias.copy_(mixer.bias[at])
        rows = torch.tensor(att.out_columns(order))
        for conv_name, norm in att.followers:
            tensors: list[Tensor] = [*net.get_submodule(conv_name).parameters(recurse=False)]
            if norm is not None:
                tensors += [t for _, t in _channel_tensors(net.get_submodule(norm))]
            for t in tensors:
                t.copy_(t[rows.to(t.device)])
    _forget_cached(mod)


def prune_heads(net: nn.Module, att: Attention, width: int) -> None:
    """Keep the first ``width`` (`Attention.width`'s units: whole heads) of ``att`` in ``net``,
    in place: the q, k and v rows, the output projection's input columns, the head count and
    what follows it."""
    keep = width // att.unit
    if keep >= att.heads:
        return
    kept = range(keep)
    by_layer: dict[str, list[int]] = {}
    for part, (layer, _) in enumerate(att.rows):
        by_layer.setdefault(layer, []).extend(att.part_rows(part, kept))
    for layer, idx in by_layer.items():
        lin = _projection_at(net, layer)
        index = torch.tensor(sorted(idx), device=lin.weight.device)
        _cut(lin, 0, index)
        norm = att.norm_of(layer)
        if norm is not None:
            _cut_norm(net.get_submodule(norm), index)
    out = _projection_at(net, att.out)
    _cut(out, 1, torch.tensor(att.out_columns(kept), device=out.weight.device))
    for name in att.mixers:
        mixer = _projection_at(net, name)
        heads = torch.arange(keep, device=mixer.weight.device)
        _cut(mixer, 0, heads)
        _cut(mixer, 1, heads)
    for conv_name, norm in att.followers:  # v's channels, as the heads' concatenation
        conv = net.get_submodule(conv_name)
        assert isinstance(conv, nn.Conv2d)
        index = torch.tensor(att.out_columns(kept), device=conv.weight.device)
        _cut(conv, 0, index)
        conv.in_channels = conv.groups = len(index)
        if norm is not None:
            _cut_norm(net.get_submodule(norm), index)
    mod = net.get_submodule(att.name)
    for pname, t, dim in _per_head(mod, att):
        _set_tensor(mod, pname, t.detach().narrow(dim, 0, keep).clone(), t)
    for attr in _HEADS:
        if isinstance(getattr(mod, attr, None), int):
            setattr(mod, attr, keep)
    per_head = {att.head_dim * att.heads: att.head_dim}
    if att.steps:
        per_head[att.value_dim * att.heads] = att.value_dim
    for attr in _INNER + (_INNER_INTERLEAVED if att.steps else ()):
        value = getattr(mod, attr, None)
        if isinstance(value, int) and value in per_head:
            setattr(mod, attr, keep * per_head[value])
    _forget_cached(mod)


def split_attention(net: nn.Module) -> nn.Module:
    """``net`` with every ``nn.MultiheadAttention`` it can split replaced by a
    `SplitAttention`, and torchvision MaxViT's and Swin's attention made a `MaxVitAttention`,
    `SwinAttention` or `SwinAttentionV2`, and the timm attention modules of
    `tasprune.models.timm_attention` its subclasses (in place; the same function and state
    dict), returned."""
    timm_subclasses: dict[type, type] = {}
    if "timm" in sys.modules:  # a timm model is built only where timm is imported
        from tasprune.models.timm_attention import SUBCLASSES as timm_subclasses
    if "ultralytics.nn.modules.block" in sys.modules:  # likewise an Ultralytics model
        from tasprune.models.ultralytics_attention import SUBCLASSES as more

        timm_subclasses = {**timm_subclasses, **more}
    for name, mod in list(net.named_modules()):
        if type(mod) in timm_subclasses:
            sub = timm_subclasses[type(mod)]
            if getattr(sub, "takes", lambda m: True)(mod):
                mod.__class__ = sub
                getattr(sub, "adopt", lambda m: None)(mod)
            continue
        if type(mod) is RelativePositionalMultiHeadAttention:
            mod.__class__ = MaxVitAttention
            continue
        if type(mod) is ShiftedWindowAttention:
            mod.__class__ = SwinAttention
            continue
        if type(mod) is ShiftedWindowAttentionV2:
            mod.__class__ = SwinAttentionV2
            continue
        plain = (
            type(mod) is nn.MultiheadAttention
            and mod._qkv_same_embed_dim
            and mod.bias_k is None
            and not mod.add_zero_attn
        )
        if plain and name:
            net.set_submodule(name, SplitAttention(mod))  # type: ignore[arg-type]
    return net
