"""The network's graph as Torch-Pruning traces it, and the physical pruning on it: the
dependency graph (coupled channel groups), the sub-modules that can be traced when the whole
cannot, the layers whose outputs are the network's outputs, and `prune_with`, which removes
channels and blocks in place. One builder of the graph for the analysis, the pruning, the
padding of exports and the channel ordering.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from tasprune.errors import ConfigError
from tasprune.models.sources import Example, as_example, call

logger = logging.getLogger(__name__)

PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Linear)
ROOTS = (nn.Conv2d, nn.Linear)  # the layers whose output channels root a width choice


def output_layers(net: nn.Module, example: Example) -> set[str]:
    """The conv/linear layers whose outputs reach the network's outputs through no other
    conv/linear (a classifier, a detection head's box and class convs, a segmenter's last
    conv): their output channels are the outputs' channels, so their widths are kept.
    Derived from the autograd graph of one forward on ``example``, whatever the outputs'
    structure (tensors, tuples, dicts, lists)."""
    produced: dict[Any, str] = {}

    def hook(name: str) -> Any:
        def record(m: nn.Module, args: Any, out: Any) -> None:
            if isinstance(out, Tensor) and out.grad_fn is not None:
                produced[out.grad_fn] = name

        return record

    hooks = [
        mod.register_forward_hook(hook(name))
        for name, mod in net.named_modules()
        if isinstance(mod, PRUNABLE)
    ]
    inputs = tuple(
        x.detach().clone().requires_grad_(True)
        if isinstance(x, Tensor) and x.is_floating_point()
        else x
        for x in example
    )
    try:
        with eval_mode(net), torch.enable_grad():
            out = call(net, inputs)
    finally:
        for h in hooks:
            h.remove()
    stack = [t.grad_fn for t in tree_flatten(out)[0] if isinstance(t, Tensor)]
    found: set[str] = set()
    seen: set[Any] = set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if fn in produced:
            found.add(produced[fn])
            continue
        stack.extend(f for f, _ in fn.next_functions)
    return found


def scopes(
    net: nn.Module, model: str, example: Example, kept: list[nn.Module]
) -> list[tuple[str, nn.Module, Example, Any, list[Any]]]:
    """(name, module, example input, dependency graph, its channel groups) of what can be
    traced: the whole network, or, when its graph cannot be followed (e.g. a channel
    shuffle), the largest sub-modules that can; groups inside those are searched, the rest
    keeps its width. Groups are rooted at the layers not in ``kept``: a kept layer's output
    channels (a detector's class conv, whose walk runs through its loss index by index)
    are never walked."""
    try:
        dg = dependency_graph(net, example)
        return [("", net, example, dg, grouped(dg, kept))]
    except Exception as err:
        reason = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
    inputs = module_inputs(net, example)
    found: list[tuple[str, nn.Module, Example, Any, list[Any]]] = []

    def visit(prefix: str, mod: nn.Module) -> None:
        for child, sub in mod.named_children():
            name = f"{prefix}.{child}" if prefix else child
            if not any(True for _ in sub.children()):
                continue
            if name not in inputs:  # never called itself (a ModuleList the parent walks)
                visit(name, sub)
                continue
            x = (torch.zeros(inputs[name]),)
            try:
                dg = dependency_graph(sub, x)
                found.append((name, sub, x, dg, grouped(dg, kept)))
            except Exception:
                visit(name, sub)

    visit("", net)
    if not found:
        raise ConfigError(
            f"{model}: its graph cannot be traced ({reason}). Fix: use another model, or a "
            "module without data-dependent control flow"
        )
    logger.info(
        "%s: the whole graph cannot be traced (%s); searching inside %d blocks",
        model,
        reason,
        len(found),
    )
    return found


_MAX_INDICES = 1 << 18  # more channels than any layer has: index lists that only grow


class GraphRunaway(RuntimeError):
    """Torch-Pruning's walk of one group did not end (ever new index sets around a cycle)."""


@contextlib.contextmanager
def bounded(dg: Any) -> Iterator[None]:
    """Stop a group walk of ``dg`` that grows past 8 entries per node of the graph or maps
    onto more channels than any layer has: Torch-Pruning 1.6 can walk for ever where index
    mappings of different sizes meet in a cycle (YOLO11's C2PSA attention, which reshapes q,
    k and v of one conv into heads, and flattens them)."""
    from torch_pruning.dependency.group import Group

    add, limit = Group.add_dep, 8 * len(dg.module2node) + 64

    def add_dep(group: Any, dep: Any, idxs: Any) -> None:
        if len(group.items) > limit or len(idxs) > _MAX_INDICES:
            raise GraphRunaway("a channel group's walk does not end (Torch-Pruning 1.6)")
        add(group, dep, idxs)

    Group.add_dep = add_dep
    try:
        yield
    finally:
        Group.add_dep = add


def grouped(dg: Any, kept: list[nn.Module]) -> list[Any]:
    """The channel groups of ``dg`` rooted at its convs and linears outside ``kept``, each
    walked within `bounded`'s limit (a `GraphRunaway` otherwise: the graph is then searched
    inside its sub-modules)."""
    with bounded(dg), quiet():
        return list(dg.get_all_groups(ignored_layers=list(kept), root_module_types=ROOTS))


def module_inputs(net: nn.Module, example: Example) -> dict[str, tuple[int, ...]]:
    """The shape of the (single tensor) input of every sub-module in one forward."""
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = []
    for name, mod in net.named_modules():
        if name:

            def hook(m: nn.Module, args: Any, n: str = name) -> None:
                if len(args) == 1 and isinstance(args[0], Tensor):
                    shapes.setdefault(n, tuple(args[0].shape))

            hooks.append(mod.register_forward_pre_hook(hook))
    try:
        with eval_mode(net), torch.no_grad():
            call(net, example)
    finally:
        for h in hooks:
            h.remove()
    return shapes


def output_shapes(out: Any) -> list[tuple[int, ...]]:
    """The shapes of every tensor in a network's outputs, in order (any structure)."""
    from torch.utils._pytree import tree_flatten

    return [tuple(t.shape) for t in tree_flatten(out)[0] if isinstance(t, Tensor)]


def internal(
    block: nn.Module, example: Example, root_dep: Any, full: int, names: dict[Any, str], scope: str
) -> bool:
    """Does pruning this group leave ``block``'s output shape as it is (a group that lives
    inside the block)? Tried on a copy with its last channel removed."""

    if full < 2:
        return False
    with eval_mode(block), torch.no_grad():
        ref = call(block, example)
    twin = copy.deepcopy(block)
    mod = twin.get_submodule(names[root_dep.target.module][len(scope) + 1 :])
    try:
        dg = dependency_graph(twin, example)
        prune_group(dg, mod, root_dep.handler, [full - 1])
        with eval_mode(twin), torch.no_grad():
            out = call(twin, example)
    except Exception:
        return False
    return output_shapes(out) == output_shapes(ref)  # any output structure (a dict of maps)


def tied_conv(mod: nn.Module) -> bool:
    """A grouped or depthwise conv: its output channels follow its input channels."""
    return isinstance(mod, nn.Conv2d) and mod.groups > 1


def dependency_graph(net: nn.Module, example: Example | Tensor) -> Any:
    """Torch-Pruning's dependency graph of ``net`` called on ``example`` (a tensor or the
    positional arguments; its notices about unwrapped parameters such as layer scales are
    expected: they are pruned along their channel dimension)."""

    # The graph is read off autograd: it is built with gradients on (also under a caller's
    # no_grad) and every parameter requiring them (a frozen teacher's included), then restored.
    frozen = [p for p in net.parameters() if not p.requires_grad]
    try:
        for p in frozen:
            p.requires_grad_(True)
        with warnings.catch_warnings(), torch.enable_grad(), _chunks_as_slices() as chunks:
            warnings.simplefilter("ignore")
            dg = _graph_class()().build_dependency(
                net, example_inputs=list(as_example(example)), forward_fn=lambda m, x: m(*x)
            )
        dg.tasprune_chunks = chunks
        return dg
    finally:
        for p in frozen:
            p.requires_grad_(False)


def _graph_class() -> type:
    """Torch-Pruning's DependencyGraph, told the width of a channel slice: 1.6 takes a
    slice's input width for its own, so a concatenation of slices (C2f's chunked halves)
    gets wrong offsets and no index mapping."""
    import torch_pruning as tp

    class Graph(tp.DependencyGraph):  # type: ignore[misc]
        def get_out_channels(self, module_or_node: Any) -> Any:
            node = module_or_node
            if not isinstance(node, tp.dependency.Node):
                node = self.module2node.get(module_or_node)
            op = getattr(node, "module", None)
            if isinstance(op, tp.ops._SliceOp) and op.dim == 1:
                sizes = getattr(node.grad_fn, "_saved_self_sym_sizes", None)
                if sizes is not None and len(sizes) > 1:
                    return len(range(*slice(op.start, op.end, op.step).indices(int(sizes[1]))))
            return super().get_out_channels(module_or_node)

    return Graph


def chunked(dg: Any, group: Any) -> Any:
    """``group`` whole when its channels are chunked into equal parts (C2f's ``chunk(2)``):
    (the group rooted on the chunked tensor's producer with all its channels, the parts), or
    None. Torch-Pruning couples each part with its own consumers, so it may hand out a part
    alone; the parts are segments of one width choice, pruned alike."""
    import torch_pruning as tp

    chunks: dict[Any, tuple[int, int]] = getattr(dg, "tasprune_chunks", {})
    found = [chunks[item.dep.target.grad_fn] for item in group if item.dep.target.grad_fn in chunks]
    if not found:
        return None
    parts, channels = found[0]
    for item in group:
        mod = item.dep.target.module
        if not dg.is_out_channel_pruning_fn(item.dep.handler):
            continue
        if isinstance(mod, nn.Conv2d) and mod.out_channels == channels:
            fn = tp.prune_conv_out_channels
        elif isinstance(mod, nn.Linear) and mod.out_features == channels:
            fn = tp.prune_linear_out_channels
        else:
            continue
        with quiet():
            return dg.get_pruning_group(mod, fn, idxs=list(range(channels))), parts
    return None


_LAYERS = ("Convolution", "BatchNorm", "Addmm", "Linear", "LayerNorm", "GroupNorm")
_MOVES = ("View", "Reshape", "Cat", "Split", "Slice", "Transpose", "Permute", "Select", "Index")


def _layer_output(x: Tensor) -> bool:
    """Is ``x`` a layer's output channels (a conv, linear or norm, through activations)? Only
    those are chunked as slices: a chunk of rearranged channels (ShuffleNet's, after its
    channel shuffle) stays Torch-Pruning's, which cannot follow it, so only the blocks are
    searched, as before."""
    fn = x.grad_fn
    for _ in range(8):
        if fn is None:
            return False
        name = fn.name()
        if any(k in name for k in _LAYERS):
            return True
        following = [f for f, _ in fn.next_functions if f is not None]
        if len(following) != 1 or any(k in name for k in _MOVES):
            return False
        fn = following[0]
    return False


@contextlib.contextmanager
def _chunks_as_slices() -> Iterator[dict[Any, tuple[int, int]]]:
    """While the graph is traced, a ``chunk`` along the channels returns one slice per part
    and is recorded (the chunked tensor's grad_fn -> (parts, channels)). Torch-Pruning 1.6 maps a split's
    i-th consumer to its i-th part, which is wrong when a part feeds several layers or none
    (C2f: the second half feeds the first bottleneck and the concatenation); slices are
    mapped by their own offsets."""
    chunks: dict[Any, tuple[int, int]] = {}
    tensor_chunk, torch_chunk = torch.Tensor.chunk, torch.chunk

    def chunk(x: Tensor, parts: int, dim: int = 0) -> tuple[Tensor, ...]:
        if x.dim() < 2 or dim % x.dim() != 1 or x.shape[1] % parts or not _layer_output(x):
            return tuple(tensor_chunk(x, parts, dim))
        size = x.shape[1] // parts
        chunks[x.grad_fn] = (parts, int(x.shape[1]))
        return tuple(x[:, i * size : (i + 1) * size] for i in range(parts))

    torch.Tensor.chunk = chunk  # type: ignore[method-assign,assignment]
    torch.chunk = chunk  # type: ignore[assignment]
    try:
        yield chunks
    finally:
        torch.Tensor.chunk = tensor_chunk  # type: ignore[method-assign]
        torch.chunk = torch_chunk


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Torch-Pruning's index-mapping walk warns "Maximum recursive depth reached!" on deep
    graphs (a detector's); the walk's result is checked by the analysis, so it is not shown."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Maximum recursive depth")
        yield


def prune_group(dg: Any, module: nn.Module, fn: Any, idxs: list[int]) -> None:
    """Prune channels ``idxs`` of ``module`` (Torch-Pruning's handler ``fn``) and everything
    coupled to them in ``dg``."""
    with quiet():
        dg.get_pruning_group(module, fn, idxs=idxs).prune()


@contextlib.contextmanager
def eval_mode(net: nn.Module) -> Iterator[None]:
    was = net.training
    net.eval()
    try:
        yield
    finally:
        net.train(was)


def out_channels_of(mod: nn.Module) -> int:
    """The output channels of a conv, linear or normalisation layer (0 when it has none)."""
    for attr in ("out_channels", "out_features", "num_features", "num_channels"):
        value = getattr(mod, attr, None)
        if isinstance(value, int):
            return value
    shape = getattr(mod, "normalized_shape", None)
    return int(shape[0]) if shape else 0
