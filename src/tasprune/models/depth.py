"""Depth choices read off a network: runs of residual blocks among the children of one module
(an ``nn.Sequential``, a ``ModuleList`` its parent loops over, any module whose forward calls
its children in turn). Read at run time: each block of a run is called once, on the previous
block's output, which nothing but that block reads (a concatenation of every block's output,
as in YOLO's C2f, makes no run). A block is residual when its own forward, traced with its
children as leaves, sums its input onto its output through a chain of sums (the stream
followed through reshapes, as in Swin); a forward that does not trace is asked at run time
whether, with its branches zeroed, it returns its input.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from tasprune.models.sources import Example, call

_ADDS = {operator.add, operator.iadd, torch.add}
_CATS = (torch.cat, torch.concat, torch.concatenate)
_RESHAPES = ("reshape", "view", "flatten", "contiguous")


@dataclass
class Stage:
    """One depth choice: consecutive children of one container; depth d keeps the first d."""

    name: str
    container: str
    children: list[str]  # their names in the container
    blocks: list[str]  # their full module names
    plain: bool = True  # every block is called on one tensor alone (else a dropped one is `Skip`)
    # A concatenation of every block's output (YOLO's C2f) feeds this conv: a dropped block's
    # segment leaves its input. (offset, width) of each block's segment in that input.
    consumer: str | None = None
    segments: list[tuple[int, int]] = field(default_factory=list)


class Skip(nn.Identity):
    """A dropped block that was called with more than its input (a mask, say): returns the
    input."""

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        return x


@dataclass
class _Call:
    """A child's first call in the analysed forward."""

    x: Tensor
    out: Tensor
    out_fn: Any  # the output's autograd node when it was returned (before any in-place op)
    plain: bool
    times: int = 1


class _Leaves(torch.fx.Tracer):
    """Traces a block's own forward only: every sub-module is one opaque call."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def _is_residual(block: nn.Module, x: Tensor | None = None) -> bool:
    """Does ``block`` add its own input to its output (y = x + f(x), or a chain of such sums:
    a transformer block adds attention, then the MLP, onto the same stream)? Read off its
    forward's graph; a forward that does not trace (it unpacks shapes, say) is asked at run
    time on its input ``x``."""
    import torch.fx as fx

    try:
        graph = _Leaves().trace(block)
    except Exception:
        return x is not None and _passes_input(block, x)
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    if not inputs or any(not n.args for n in inputs[1:]):
        return False  # more than one input without a default
    modules = dict(block.named_modules())
    same: set[fx.Node] = {inputs[0]}  # the stream: the input, its identities, sums onto it
    for n in graph.nodes:
        through = isinstance(modules.get(n.target), nn.Identity) or getattr(
            modules.get(n.target), "tasprune_optional", False
        )  # an identity, or a projection inserted as one
        if n.op == "call_module" and through and n.args:
            if n.args[0] in same:
                same.add(n)
            continue
        if n.op == "call_method" and n.target in _RESHAPES and n.args and n.args[0] in same:
            same.add(n)  # the stream reshaped (a Swin block flattens its tokens in between)
            continue
        is_add = (n.op == "call_function" and n.target in _ADDS) or (
            n.op == "call_method" and n.target in ("add", "add_")
        )
        if is_add and any(a in same for a in n.args[:2]):
            if _reaches_output(n, modules):
                return True
            same.add(n)
    return False


def _passes_input(block: nn.Module, x: Tensor) -> bool:
    """With the outputs of its children that hold parameters zeroed (its branches), does
    ``block`` return its (positive) input exactly? Then its output is its input plus what
    those branches add."""
    kids = [
        m
        for m in block.children()
        if any(True for _ in m.parameters()) and not getattr(m, "tasprune_optional", False)
    ]
    if not kids:
        return False

    def zero(m: nn.Module, args: Any, out: Any) -> Any:
        return torch.zeros_like(out) if isinstance(out, Tensor) else out

    hooks = [m.register_forward_hook(zero) for m in kids]
    probe = x.abs() + 0.5  # positive: an activation after the sum passes it unchanged
    try:
        with torch.no_grad():
            y = block(probe)
    except Exception:
        return False
    finally:
        for h in hooks:
            h.remove()
    return isinstance(y, Tensor) and torch.equal(y, probe)


def _reaches_output(node: Any, modules: dict[str, nn.Module]) -> bool:
    """Does ``node`` flow to the graph's output through parameter-free ops only?"""
    while node.op != "output":
        users = list(node.users)
        if len(users) != 1:
            return False
        node = users[0]
        if node.op == "call_module" and any(True for _ in modules[node.target].parameters()):
            return False
    return True


def depth_stages(net: nn.Module, example: Example) -> dict[str, Stage]:
    """Runs of residual blocks of the same input and output shape among one module's children,
    each called once on the previous one's output, which only that block reads."""
    calls: dict[str, _Call] = {}
    hooks = []
    parents = [(n, m) for n, m in net.named_modules() if sum(1 for _ in m.children()) > 1]
    for pname, parent in parents:
        for child, block in parent.named_children():
            bname = f"{pname}.{child}" if pname else child

            def hook(m: nn.Module, args: Any, kwargs: Any, out: Any, n: str = bname) -> None:
                if n in calls:
                    calls[n].times += 1
                elif args and isinstance(args[0], Tensor) and isinstance(out, Tensor):
                    plain = len(args) == 1 and not kwargs
                    calls[n] = _Call(args[0], out, out.grad_fn, plain)

            hooks.append(block.register_forward_hook(hook, with_kwargs=True))
    cats = Cats()
    for n, m in net.named_modules():
        if isinstance(m, nn.Conv2d) and m.groups == 1:  # a conv that may read a concatenation

            def pre(m: nn.Module, args: Any, n: str = n) -> None:
                if args and (i := cats.index.get(id(args[0]))) is not None:
                    cats.consumer.setdefault(i, n)

            hooks.append(m.register_forward_pre_hook(pre))
    try:
        with torch.enable_grad(), cats:
            result = call(net, example)
    finally:
        for h in hooks:
            h.remove()
    readers = _readers(result)
    stages: dict[str, Stage] = {}
    for cname, cont in parents:
        children = list(cont.named_children())
        names = [f"{cname}.{c}" if cname else c for c, _ in children]
        got = [c if (c := calls.get(n)) is not None and c.times == 1 else None for n in names]

        skippable = []
        for k, (_, block) in enumerate(children):
            c = got[k]
            skippable.append(
                c is not None
                and c.x.shape == c.out.shape
                and any(p.requires_grad for p in block.parameters())
                and _is_residual(block, c.x.detach())
            )
        i = 0
        while i < len(children):
            if not skippable[i]:
                i += 1
                continue
            j = i + 1
            while j < len(children) and skippable[j] and _feeds(got[j - 1], got[j], readers):
                j += 1
            first = (
                i - 1
                if i > 0 and _is_block(children[i - 1][1]) and _feeds(got[i - 1], got[i], readers)
                else i
            )
            kids = [children[k][0] for k in range(first, j)]
            if len(kids) > 1:
                blocks = names[first:j]
                plain = all(c is not None and c.plain for c in got[first:j])
                stages[blocks[0]] = Stage(blocks[0], cname, kids, blocks, plain)
            i = j
        if len(children) > 1 and not any(st.container == cname for st in stages.values()):
            found: tuple[str, list[tuple[int, int]]] | None = None
            if isinstance(cont, (nn.ModuleList, nn.Sequential)):  # shortened when pruned
                found = _concatenated(got, children, readers, cats)
            if found is not None:
                plain = all(c is not None and c.plain for c in got)
                kids = [c for c, _ in children]
                stages[names[0]] = Stage(names[0], cname, kids, names, plain, *found)
    return stages


class Cats(TorchFunctionMode):
    """Records every concatenation of one forward: (its input tensors, dim, output)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[list[Tensor], int, Tensor]] = []
        self.index: dict[int, int] = {}  # id of an output -> its call
        self.consumer: dict[int, str] = {}  # call -> the conv reading its output (filled by hooks)

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _CATS and isinstance(out, Tensor) and out.dim() > 1:
            tensors = args[0] if args else kwargs.get("tensors")
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            self.index[id(out)] = len(self.calls)
            self.calls.append((list(tensors), int(dim) % out.dim(), out))
        return out


def segments_of(cats: Cats, outs: list[Tensor], into: Tensor) -> list[tuple[int, int]] | None:
    """(offset, width) of each of ``outs`` along the channels of the concatenation that
    is ``into``, or None when no recorded concatenation is."""
    for tensors, dim, out in cats.calls:
        if out is not into or dim != 1:
            continue
        offsets: dict[int, int] = {}
        at = 0
        for t in tensors:
            offsets.setdefault(id(t), at)
            at += int(t.shape[1])
        if all(id(o) in offsets for o in outs):
            return [(offsets[id(o)], int(o.shape[1])) for o in outs]
    return None


def _concatenated(
    got: list[_Call | None],
    children: list[tuple[str, nn.Module]],
    readers: dict[Any, set[Any]],
    cats: Cats,
) -> tuple[str, list[tuple[int, int]]] | None:
    """The children of one module as concatenated blocks (YOLO's C2f: each block runs on the
    previous one's output, and every block's output is also concatenated for one conv):
    (that conv, each block's segment of its input), or None."""
    calls = [c for c in got if c is not None]
    if len(calls) != len(children) or any(
        c.x.shape != c.out.shape or c.out_fn is None for c in calls
    ):
        return None
    if not all(any(p.requires_grad for p in m.parameters()) for _, m in children):
        return None
    if any(b.x is not a.out for a, b in zip(calls, calls[1:], strict=False)):
        return None
    for i, conv in cats.consumer.items():
        x = cats.calls[i][2]
        found = segments_of(cats, [c.out for c in calls], x)
        if found is None or x.grad_fn is None or len(readers.get(x.grad_fn, ())) != 1:
            continue
        cat = {x.grad_fn}
        for k, c in enumerate(calls):  # each output: read by the next block and the cat only
            inside = _inside(calls[k + 1].out_fn, c.out_fn) if k + 1 < len(calls) else set()
            if not readers.get(c.out_fn, set()) <= inside | cat:
                return None
        return conv, found
    return None


def _feeds(a: _Call | None, b: _Call | None, readers: dict[Any, set[Any]]) -> bool:
    """Does the output of call ``a`` go to call ``b`` (its input), and to nothing else?"""
    if a is None or b is None or b.x is not a.out or a.out_fn is None:
        return False
    return readers.get(a.out_fn, set()) <= _inside(b.out_fn, a.out_fn)


def _readers(out: Any) -> dict[Any, set[Any]]:
    """Every autograd node of the graph that produced ``out`` -> the nodes that read it."""
    stack = [t.grad_fn for t in tree_flatten(out)[0] if isinstance(t, Tensor)]
    readers: dict[Any, set[Any]] = {}
    seen: set[Any] = set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        for f, _ in fn.next_functions:
            if f is not None:
                readers.setdefault(f, set()).add(fn)
                stack.append(f)
    return readers


def _inside(out_fn: Any, in_fn: Any) -> set[Any]:
    """The autograd nodes between a block's input (``in_fn``) and its output (``out_fn``)."""
    found: set[Any] = set()
    stack = [out_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn is in_fn or fn in found:
            continue
        found.add(fn)
        stack.extend(f for f, _ in fn.next_functions)
    return found


def _is_block(mod: nn.Module) -> bool:
    """A module with parameters (the downsampling block before a run), not an activation."""
    return any(True for _ in mod.parameters())
