"""Depth choices read off a network: runs of residual blocks in one ``nn.Sequential``. A block
is residual when its own forward, traced with its children as leaves, sums its input onto
its output through a chain of sums (the stream followed through reshapes, as in Swin); a
forward that does not trace is asked at run time whether, with its branches zeroed, it
returns its input.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from tasprune.models.sources import Example, call

_ADDS = {operator.add, operator.iadd, torch.add}
_RESHAPES = ("reshape", "view", "flatten", "contiguous")


@dataclass
class Stage:
    """One depth choice: consecutive children of one container; depth d keeps the first d."""

    name: str
    container: str
    children: list[str]  # their names in the container
    blocks: list[str]  # their full module names


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
    """Runs of residual blocks of the same input and output shape in one ``nn.Sequential``."""
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    inputs: dict[str, Tensor] = {}
    hooks = []
    containers = [
        (n, m)
        for n, m in net.named_modules()
        if isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward
    ]
    for cname, cont in containers:
        for child, block in cont.named_children():
            bname = f"{cname}.{child}" if cname else child

            def hook(m: nn.Module, args: Any, out: Any, n: str = bname) -> None:
                if args and isinstance(args[0], Tensor) and isinstance(out, Tensor):
                    shapes[n] = (tuple(args[0].shape), tuple(out.shape))
                    inputs.setdefault(n, args[0].detach())

            hooks.append(block.register_forward_hook(hook))
    try:
        with torch.no_grad():
            call(net, example)
    finally:
        for h in hooks:
            h.remove()
    stages: dict[str, Stage] = {}
    for cname, cont in containers:
        skippable = []
        children = list(cont.named_children())
        for child, block in children:
            bname = f"{cname}.{child}" if cname else child
            io = shapes.get(bname)
            ok = (
                io is not None
                and io[0] == io[1]
                and any(p.requires_grad for p in block.parameters())
                and _is_residual(block, inputs.get(bname))
            )
            skippable.append(ok)
        i = 0
        while i < len(cont):
            if not skippable[i]:
                i += 1
                continue
            j = i
            while j < len(cont) and skippable[j]:
                j += 1
            first = i - 1 if i > 0 and _is_block(children[i - 1][1]) else i
            kids = [children[k][0] for k in range(first, j)]
            blocks = [f"{cname}.{k}" if cname else k for k in kids]
            if len(blocks) > 1:
                stages[blocks[0]] = Stage(blocks[0], cname, kids, blocks)
            i = j
    return stages


def _is_block(mod: nn.Module) -> bool:
    """A module with parameters (the downsampling block before a run), not an activation."""
    return any(True for _ in mod.parameters())
