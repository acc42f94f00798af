"""Multi-head attention as a width choice: whole heads.

A multi-head attention module computes, per head h, softmax(q_h k_h^T) v_h and concatenates
the heads before an output projection. Its width choice is the number of heads kept (the
first k, in units of the head dimension): q, k and v lose the same rows, the output
projection the same input columns, and ``num_heads`` (with the attributes derived from it)
follows, as do the module's own tensors with one entry per head (a relative position bias
table), so the module's own forward runs unchanged on the smaller weights.

The searched network masks each head's v rows: a head with v = 0 adds nothing to the output
projection's input, exactly as if it were removed, so the searched mixture is the pruned
network (no normalisation statistics change, unlike masking the embedding width).

Read off the module (no graph op is interpreted): a module with an integer ``num_heads`` and
linear projections named as the common implementations name them (a fused ``qkv``; ``q`` and
``kv``; or ``q``, ``k``, ``v``; then ``proj``, ``o`` or ``out_proj``), whose widths agree.
Other attention modules keep their heads, with one log line naming them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# (q, k, v) producers: child names and how many of q/k/v each holds, in row order.
_PATTERNS: tuple[tuple[tuple[str, int], ...], ...] = (
    (("qkv", 3),),
    (("q", 1), ("kv", 2)),
    (("q", 1), ("k", 1), ("v", 1)),
    (("q_proj", 1), ("k_proj", 1), ("v_proj", 1)),
)
_OUTS = ("proj", "o", "out_proj", "o_proj")
# Integer attributes that hold num_heads * head_dim (they follow the head count).
_INNER = ("attn_dim", "inner_dim", "all_head_dim", "all_head_size")


@dataclass(frozen=True)
class Attention:
    """One multi-head attention module whose heads are a width choice."""

    name: str
    heads: int
    head_dim: int
    rows: tuple[tuple[str, int], ...]  # (linear, first row) of q, k and v, in that order
    out: str  # the linear reading the heads' concatenation

    @property
    def width(self) -> int:
        return self.heads * self.head_dim

    def producers(self) -> list[str]:
        return list(dict.fromkeys(layer for layer, _ in self.rows))


def is_attention(mod: nn.Module) -> bool:
    """A multi-head attention module: ``nn.MultiheadAttention``, or a module with an integer
    ``num_heads`` whose class names attention."""
    cls = type(mod).__name__
    heads = isinstance(getattr(mod, "num_heads", None), int)
    return isinstance(mod, nn.MultiheadAttention) or (
        heads and ("Attn" in cls or "Attention" in cls)
    )


def find_attention(net: nn.Module) -> tuple[list[Attention], list[tuple[str, str]]]:
    """The attention modules of ``net`` whose heads can be searched, and (name, class) of
    the others."""
    found: list[Attention] = []
    other: list[tuple[str, str]] = []
    for name, mod in net.named_modules():
        if not is_attention(mod):
            continue
        att = _read(name, mod)
        if att is None:
            other.append((name, type(mod).__name__))
        else:
            found.append(att)
    return found, other


def _read(name: str, mod: nn.Module) -> Attention | None:
    heads = getattr(mod, "num_heads", None)
    if isinstance(mod, nn.MultiheadAttention) or not isinstance(heads, int) or heads < 1:
        return None
    kids = dict(mod.named_children())
    out = next((o for o in _OUTS if isinstance(kids.get(o), nn.Linear)), None)
    if out is None:
        return None
    proj = kids[out]
    assert isinstance(proj, nn.Linear)
    width = int(proj.in_features)
    if width % heads:
        return None
    for pattern in _PATTERNS:
        mods = [kids.get(child) for child, _ in pattern]
        if not all(isinstance(m, nn.Linear) for m in mods):
            continue
        rows: list[tuple[str, int]] = []
        for (child, parts), m in zip(pattern, mods, strict=True):
            assert isinstance(m, nn.Linear)
            if m.out_features != parts * width:
                return None
            prefix = f"{name}.{child}" if name else child
            rows += [(prefix, i * width) for i in range(parts)]
        head_dim = width // heads
        if getattr(mod, "head_dim", head_dim) != head_dim:
            return None
        return Attention(name, heads, head_dim, tuple(rows), f"{name}.{out}" if name else out)
    return None


def prune_heads(net: nn.Module, att: Attention, width: int) -> None:
    """Keep the first ``width`` channels (whole heads) of ``att`` in ``net``, in place: the
    q, k and v rows, the output projection's input columns, and the head count."""
    keep = width // att.head_dim
    if keep >= att.heads:
        return
    by_layer: dict[str, list[int]] = {}
    for layer, first in att.rows:
        by_layer.setdefault(layer, []).extend(range(first, first + width))
    for layer, idx in by_layer.items():
        lin = net.get_submodule(layer)
        assert isinstance(lin, nn.Linear)
        index = torch.tensor(idx, device=lin.weight.device)
        lin.weight = nn.Parameter(lin.weight.detach().index_select(0, index).clone())
        if lin.bias is not None:
            lin.bias = nn.Parameter(lin.bias.detach().index_select(0, index).clone())
        lin.out_features = len(idx)
    out = net.get_submodule(att.out)
    assert isinstance(out, nn.Linear)
    out.weight = nn.Parameter(out.weight.detach()[:, :width].clone())
    out.in_features = width
    mod = net.get_submodule(att.name)
    for pname, t in [*mod.named_parameters(recurse=False), *mod.named_buffers(recurse=False)]:
        dims = [d for d, n in enumerate(t.shape) if n == att.heads]
        if len(dims) == 1:  # one entry per head (a relative position bias table)
            cut = t.detach().narrow(dims[0], 0, keep).clone()
            if isinstance(t, nn.Parameter):
                setattr(mod, pname, nn.Parameter(cut, requires_grad=t.requires_grad))
            else:
                setattr(mod, pname, cut)
    setattr(mod, "num_heads", keep)  # noqa: B010 (an int attribute of any module class)
    for attr in _INNER:
        if getattr(mod, attr, None) == att.width:
            setattr(mod, attr, width)
