"""Shapes written by tasprune 0.x, read in today's keys.

Before the one mechanism, a shipped network's shape listed one width per conv under the
conv block's name (``layer1.0.conv1``) and one depth per stage container (``layer1``), and a
traced network's widths were keyed by whichever layer its dependency graph met first. Today
a width is keyed by the first layer that writes its channel group and a depth by its stage
(`tasprune.models.analysis`). An old shape maps onto the new keys exactly: each group takes
the width of a layer that writes it (a block of a residual stream that had one width, that
width), each stage the depth of its container. Anything else fails with one line naming the
older version.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from tasprune.errors import ShapeError
from tasprune.shape import Shape

logger = logging.getLogger(__name__)

__all__ = ["upgrade_shape"]


def upgrade_shape(model: str, data: Mapping[str, Any] | Shape) -> Shape:
    """``data`` (a shape, or its dict) in ``model``'s keys: unchanged when it has them, the
    upgraded shape when it was written by tasprune 0.x."""
    from tasprune.models import get_model_spec
    from tasprune.models.traced import traced

    shape = data if isinstance(data, Shape) else Shape.from_dict(data)
    full = get_model_spec(model).full_shape()
    unknown = [k for k in (*shape.widths, *shape.depths) if k not in full.widths | full.depths]
    if not unknown:
        return shape
    old = f"{model} shape from tasprune 0.x (keys such as {unknown[0]!r})"
    fix = "Fix: re-run `tasprune search` with this version"
    tr = traced(model)
    written = {}  # an old key -> the group its layer writes
    for key in shape.widths:
        for layer in (key, f"{key}.conv"):
            groups = tr.group_of.get((layer, True), [])
            if len(groups) == 1:
                written[key] = groups[0]
                break
        else:
            return shape  # not an older version's key: validation names it
    widths: dict[str, int] = {}
    for key, value in shape.widths.items():
        if widths.setdefault(written[key], value) != value:
            raise ShapeError(f"{old}: {written[key]} is given two widths. {fix}")
    # A stream that was one width (before each block's output could be its own) gives that
    # width to every block of its residual group.
    for members in get_model_spec(model).residual_groups():
        given = {widths[g] for g in members if g in widths}
        if len(given) == 1:
            value = given.pop()
            for g in members:
                widths.setdefault(g, value)
    missing = [g for g in full.widths if g not in widths]
    if missing:
        raise ShapeError(f"{old} gives no width for {missing[:3]}. {fix}")
    depths = {}
    for name, stage in tr.stages.items():
        for key in (name, stage.container):
            if key in shape.depths:
                depths[name] = shape.depths[key]
                break
        else:
            raise ShapeError(f"{old} gives no depth for {name}. {fix}")
    new = Shape(widths=widths, depths=depths)
    new.validate_against(full, model)
    logger.info("read a %s in this version's keys", old)
    return new
