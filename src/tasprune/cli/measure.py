"""Commands that measure a model without training it: ``flops``, ``space``, ``latency-table``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import Field

from tasprune.cli.flags import Command, Flag, Inputs
from tasprune.config import Recipe
from tasprune.errors import ConfigError

_SIZE: dict[str, Any] = {"metavar": ["C", "H", "W"]}  # --input-size C H W


def _emit(obj: dict[str, Any], as_json: bool, text: str) -> None:
    print(json.dumps(obj) if as_json else text)


def _input_size(model: str, given: Sequence[int] | None) -> tuple[int, int, int]:
    from tasprune.models import get_model_spec

    spec = get_model_spec(model)
    if given is None:
        return spec.default_input
    c, h, w = (int(v) for v in given)
    if min(c, h, w) < 1:
        raise ConfigError(f"--input-size {c} {h} {w} must be positive. Fix: e.g. 3 32 32")
    return c, h, w


class FlopsInputs(Inputs):
    model: str | None = Field(
        default=None, description="registered model (default: the shape's model)"
    )
    shape: Path | None = Field(default=None, description="shape.json of a pruned network")
    input_size: tuple[int, int, int] | None = Field(
        default=None,
        description="input size (default: the shape's, else the model's 3 32 32)",
        json_schema_extra=_SIZE,
    )
    as_json: bool = Field(default=False, alias="json", description="print one JSON object")
    num_classes: int | None = Field(
        default=None, description="classes (default: the shape's, else 10)"
    )


def cmd_flops(a: FlopsInputs) -> int:
    """Exact FLOPs (multiply-accumulates) and parameters of a model, optionally pruned."""
    from tasprune.cost import model_cost
    from tasprune.shape import Shape

    info: dict[str, Any] = {}
    sh: Shape | None = None
    if a.shape is not None:
        sh, info = Shape.load(a.shape)
    name = a.model or info.get("model")
    if not name:
        raise ConfigError("flops needs a model. Fix: pass --model NAME (see `tasprune space`)")
    input_size = a.input_size
    if input_size is None and isinstance(info.get("input_size"), list):
        input_size = info["input_size"]
    size = _input_size(name, input_size)
    if sh is not None:
        from tasprune.models.legacy import upgrade_shape

        sh = upgrade_shape(name, sh)
    classes = a.num_classes or int(info.get("num_classes", 10))
    flops, params = model_cost(name, sh, size, classes)
    full_flops, full_params = model_cost(name, None, size, classes)
    obj = {
        "model": name,
        "input_size": list(size),
        "num_classes": classes,
        "flops": flops,
        "params": params,
        "flops_ratio": flops / full_flops,
        "params_ratio": params / full_params,
    }
    text = (
        f"{name} @ {'x'.join(map(str, size))}, {classes} classes: {flops / 1e6:.2f} MFLOPs (MACs), "
        f"{params / 1e6:.3f} M params"
    )
    if sh is not None:
        text += f" ({100 * obj['flops_ratio']:.1f}% FLOPs, {100 * obj['params_ratio']:.1f}% params)"
    _emit(obj, a.as_json, text)
    return 0


FLOPS = Command("flops", cmd_flops, "exact FLOPs and params of a (pruned) model", FlopsInputs)


class SpaceInputs(Inputs):
    input_size: tuple[int, int, int] | None = Field(
        default=None, description="input size (default: the model's)", json_schema_extra=_SIZE
    )
    as_json: bool = Field(default=False, alias="json", description="print one JSON object")


def cmd_space(a: SpaceInputs, recipe: Recipe) -> int:
    """Width candidates per searched choice (a tied choice lists the convs that share it),
    depth candidates per stage, and the reachable FLOPs range."""
    from tasprune.cost import model_cost
    from tasprune.models.traced import traced
    from tasprune.search import SuperNet
    from tasprune.search.space import smallest_shape

    model = recipe.model
    size = _input_size(model, a.input_size)
    space = recipe.search.space()
    net = SuperNet(model, in_channels=size[0], input_size=size[1:], options=space)
    smallest = model_cost(model, smallest_shape(model, space), size)[0]
    largest = net.full_flops
    widths = {n: net.width_of[n].candidates for n in net.full_shape.widths}
    choices = {
        c.name: {"candidates": c.candidates, "members": list(c.members)}
        for c in net.width_choices.values()
    }
    depths = {s: c.candidates for s, c in net.depth_of.items()}
    # Widths the graph leaves unsearched, and why.
    fixed = {n: str(g.fixed) for n, g in traced(model).groups.items() if g.fixed}
    if not space.search_embedding:
        fixed.update(
            {
                n: "the embedding width (search.search_embedding: true searches it)"
                for n, g in traced(model).groups.items()
                if g.embedding and not g.fixed
            }
        )
    obj = {
        "model": model,
        "fixed_widths": fixed,
        "input_size": list(size),
        "tie_residual": space.tie_residual,
        "widths": widths,
        "width_choices": choices,
        "depths": depths,
        "min_flops": smallest,
        "max_flops": largest,
        "min_flops_ratio": smallest / largest,
    }
    lines = [f"{model} @ {'x'.join(map(str, size))}"]
    for c in net.width_choices.values():
        tied = f"  (one choice for {len(c.members)} convs: {', '.join(c.members)})"
        lines.append(f"  width {c.name}: {c.candidates}" + (tied if len(c.members) > 1 else ""))
    lines += [f"  depth {s}: {c}" for s, c in depths.items()]
    lines += [f"  fixed {n}: {why}" for n, why in fixed.items()]
    lines.append(
        f"  FLOPs: {smallest / 1e6:.2f} .. {largest / 1e6:.2f} M "
        f"(smallest ratio {smallest / largest:.3f})"
    )
    _emit(obj, a.as_json, "\n".join(lines))
    return 0


SPACE = Command(
    "space",
    cmd_space,
    "the search space of a model",
    SpaceInputs,
    (Flag("model", required=True), Flag("search.tie_residual", name="per-block")),
)


class LatencyTableInputs(Inputs):
    input_size: tuple[int, int, int] | None = Field(
        default=None, description="input size (default: the model's)", json_schema_extra=_SIZE
    )
    num_classes: int = Field(default=10, ge=1, description="classes")
    as_json: bool = Field(default=False, alias="json", description="print one JSON object")
    out: Path | None = Field(
        default=None, description="table file (default: the cache's file for the key)"
    )


def cmd_latency_table(a: LatencyTableInputs, recipe: Recipe) -> int:
    """Build (or complete) the latency table of ``model``'s search space and say where it is."""
    from tasprune.search import SuperNet
    from tasprune.search.latency import build_table

    model, out = recipe.model, a.out
    size = _input_size(model, a.input_size)
    cfg = recipe.search.model_copy(update={"latency_ratio": 0.5})  # a latency budget's space
    net = SuperNet.for_input(model, size, a.num_classes, cfg.space())
    if out is not None and out.exists() and not out.is_file():
        raise ConfigError(f"--out {out} is not a file. Fix: name a .json file")
    if out is not None:  # a named file: extended when it holds this machine's table
        cfg = cfg.model_copy(update={"latency_table": str(out) if out.is_file() else None})
    table, (scale, rest), path = build_table(net, cfg, progress=not a.quiet)
    if out is not None and path != out:
        if out.is_file():
            raise ConfigError(
                f"--out {out} holds a latency table of another machine, runtime, thread count "
                "or batch (see the log); it is left as it is. Fix: name a new file"
            )
        table.save(out)
        path = out
    obj = {
        "table": str(path),
        "entries": len(table.entries),
        "runtime": cfg.latency_runtime,
        "threads": cfg.latency_threads,
        "batch": cfg.latency_batch,
        "model": model,
        "scale": scale,
        "rest_ms": rest,
    }
    text = (
        f"{path}: {len(table.entries)} layer latencies ({cfg.latency_runtime}, "
        f"{cfg.latency_threads} threads, batch {cfg.latency_batch}); {model} predicted as "
        f"{scale:.3f} x its layers {rest:+.3f} ms"
    )
    _emit(obj, a.as_json, text)
    return 0


LATENCY_TABLE = Command(
    "latency-table",
    cmd_latency_table,
    "measure the per-layer latency table of a model's search space",
    LatencyTableInputs,
    (
        Flag("model", required=True),
        Flag("search.latency_runtime", name="backend"),
        Flag("search.latency_batch", name="batch"),
        Flag("search.latency_threads", name="threads"),
    ),
)
