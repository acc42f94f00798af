"""Any network as a tasprune model: a source (`sources`) analysed once (`analysis`), costed in
the one algebra (`layer_cost`) and pruned physically (`graph.prune_with`), behind the same
`ModelSpec` every model has.

A model name resolves to its source; the analysis of a source is cached per name (a registered
instance's name carries a fingerprint of its architecture, so two networks never share one).
The source (name + build arguments) and the shape rebuild the network; no module is pickled.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from torch import Tensor, nn

from tasprune.models.algebra import Counter
from tasprune.models.analysis import Group, Layer, Traced
from tasprune.models.depth import Stage
from tasprune.models.layer_cost import Layers, cost_layers, traced_cost
from tasprune.models.prune import prune_with
from tasprune.models.sources import (
    build_source,
    canonical,
    from_weights,
    min_side,
    optional_projections,
    register_module,
    resolve,
    source_name,
)
from tasprune.models.verify import verify
from tasprune.shape import Shape

logger = logging.getLogger(__name__)

__all__ = [
    "Group",
    "Layer",
    "Stage",
    "Traced",
    "analyse",
    "build_pruned",
    "build_source",
    "canonical",
    "from_weights",
    "min_side",
    "prune",
    "pruned_state",
    "register_module",
    "source_name",
    "traced",
    "traced_spec",
]

# Caches keyed by the source's key: a module instance registered again with another example
# or ignore= is analysed again.
_ANALYSES: dict[Any, Traced] = {}
_LAYERS: dict[Any, Layers] = {}
_SPECS: dict[Any, Any] = {}
_RESIDUAL: dict[Any, list[list[str]]] = {}


def traced(model: str) -> Traced:
    """The analysis of ``model``'s source (cached per name)."""
    src = resolve(model)
    tr = _ANALYSES.get(src.key)
    if tr is None:
        channels = src.trace_input[0] if src.trace_input is not None else 3
        with _own_rng():
            net = src.build(src.trace_classes, channels)
            tr = analyse(net, src.trace_example(), name=model, ignore=src.ignore)
        _ANALYSES[src.key] = tr
    return tr


def _own_rng() -> Any:
    """The global RNG as it was, after: filling a cache (building a network to analyse or
    cost) must not move it, or a seeded run would depend on what ran before it in the
    process (the first ``SuperNet``/``create_model`` of a model would start elsewhere)."""
    return torch.random.fork_rng(devices=[])


def analyse(module: nn.Module, example: Any, *, name: str = "model", ignore: Any = ()) -> Traced:
    """The search space of ``module`` called on ``example`` (a tensor or its forward's
    positional arguments), checked against the network (`verify`)."""
    tr = Traced(module, example, name=name, ignore=ignore)
    verify(tr)
    fixed = [g for g in tr.groups.values() if g.fixed]
    embedding = [g for g in tr.groups.values() if g.embedding and not g.fixed]
    logger.info(
        "%s: %d width choices (%s%d kept at full width%s; `tasprune space --model %s` says "
        "why), %d depth choices",
        name,
        len(tr.groups),
        f"{len(tr.attention)} of them attention heads; " if tr.attention else "",
        len(fixed),
        ", and the embedding width unless search.search_embedding" if embedding else "",
        name,
        len(tr.stages),
    )
    return tr


def layers_at(model: str, in_channels: int, hw: tuple[int, int], num_classes: int) -> Layers:
    """The cost layers of ``model`` built for the data and called on one input of size ``hw``."""
    src = resolve(model)
    key = (src.key, in_channels, tuple(hw), num_classes)
    found = _LAYERS.get(key)
    if found is None:
        tr = traced(model)
        with _own_rng():
            net = src.build(num_classes, in_channels)
            example = src.example(in_channels, tuple(hw))  # type: ignore[arg-type]
            if src.own_io:
                found = cost_layers(tr, net, example, "pass inputs its forward accepts")
            else:
                fix = f"use larger images (at least {min_side(model)}px) or another model"
                found = cost_layers(tr, net, example, fix)
        _LAYERS[key] = found
    return found


def prune(net: nn.Module, model: str, shape: Shape, in_channels: int) -> nn.Module:
    """Make ``net`` (the unpruned network of ``model``, any weights) the network of ``shape``,
    in place: channels k.. of every group removed everywhere, skipped blocks replaced by
    identities. Returns ``net``."""
    src = resolve(model)
    hw = src.trace_input[1:] if src.trace_input is not None else (0, 0)
    return prune_with(traced(model), net, shape, src.example(in_channels, hw))  # type: ignore[arg-type]


def pruned_state(
    model: str, state: dict[str, Tensor], shape: Shape, num_classes: int, in_channels: int
) -> dict[str, Tensor]:
    """The weights of ``model`` at ``shape`` taken from an unpruned network's ``state``."""
    from tasprune.weights import load_weights, portable_state

    net = resolve(model).build(num_classes, in_channels)
    optional = {f"{n}.weight" for n in optional_projections(net)}
    missing = load_weights(net, state, strict=False)
    left = [k for k in missing.missing_keys if k not in optional]  # the inserted: identity
    if left or missing.unexpected_keys:
        load_weights(net, state)  # the strict load's own message
    return portable_state(prune(net, model, shape, in_channels))


def build_pruned(model: str, shape: Shape, num_classes: int, in_channels: int) -> nn.Module:
    net = resolve(model).build(num_classes, in_channels)
    return prune(net, model, shape, in_channels)


def residual_groups(model: str) -> list[list[str]]:
    """The width choices that write one residual stream of the network as built (several
    where `insert_projections` made each block's output its own group): what
    ``search.tie_residual`` ties into one choice. Derived by analysing the network with its
    identity shortcuts: each of its groups is one stream."""
    src = resolve(model)
    found = _RESIDUAL.get(src.key)
    if found is not None:
        return [list(g) for g in found]  # a copy: callers extend it
    tr = traced(model)
    channels = src.trace_input[0] if src.trace_input is not None else 3
    with _own_rng():
        net = src.build(src.trace_classes, channels)
    found = []
    if optional_projections(net):
        for name in optional_projections(net):
            net.set_submodule(name, nn.Identity())
        plain = Traced(net, src.trace_example(), name=model, ignore=src.ignore)
        streams: dict[str, set[str]] = {}
        for (layer, out), groups in tr.group_of.items():
            owners = plain.group_of.get((layer, out), [])
            if out and len(groups) == 1 and len(owners) == 1:
                streams.setdefault(owners[0], set()).add(groups[0])
        order = list(tr.groups)
        found = sorted(
            (sorted(members, key=order.index) for members in streams.values() if len(members) > 1),
            key=lambda members: order.index(members[0]),
        )
    _RESIDUAL[src.key] = found
    return [list(g) for g in found]


def _describe(model: str, tr: Traced) -> str:
    from tasprune.models.zoo import shipped

    found = shipped(model) if canonical(model).startswith("tasprune:") else None
    graph = f"{len(tr.groups)} channel groups, {len(tr.stages)} stages"
    return f"{found.description}: {graph}" if found is not None else f"{model}: {graph}"


def traced_spec(model: str) -> Any:
    """The `ModelSpec` of a traced source: built, costed and searched from its graph."""
    from tasprune.models.spec import ModelSpec

    src = resolve(model)
    spec = _SPECS.get(src.key)
    if spec is not None:  # one source under two spellings (NAME, tasprune:NAME): its own
        return spec if spec.name == model else dataclasses.replace(spec, name=model)
    tr = traced(model)

    def build(shape: Shape, num_classes: int, in_channels: int) -> nn.Module:
        return build_pruned(model, shape, num_classes, in_channels)

    def cost(counter: Counter, in_channels: int, hw: tuple[int, int], num_classes: int) -> None:
        traced_cost(tr, counter, layers_at(model, in_channels, hw, num_classes))

    def width_step(name: str) -> int:
        g = tr.groups[name]
        return 0 if g.fixed else g.multiple

    def transfer(
        state: dict[str, Tensor], shape: Shape, num_classes: int, in_channels: int
    ) -> dict[str, Tensor]:
        return pruned_state(model, state, shape, num_classes, in_channels)

    spec = ModelSpec(
        name=model,
        build=build,
        full_shape=tr.full_shape,
        cost=cost,
        default_input=src.trace_input or (0, 0, 0),
        description=_describe(model, tr),
        residual_groups=lambda: residual_groups(model),
        width_step=width_step,
        transfer=transfer,
        embedding=lambda name: tr.groups[name].embedding,
    )
    _SPECS[src.key] = spec
    return spec
