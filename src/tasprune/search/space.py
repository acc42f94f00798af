"""Candidate widths and depths of a search space, derived from a model's unpruned Shape."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from tasprune.config.search import DEFAULT_FRACTIONS, SpaceOptions
from tasprune.shape import Shape

if TYPE_CHECKING:
    from tasprune.models.registry import ModelSpec


def width_candidates(
    full: int, fractions: Sequence[float] = DEFAULT_FRACTIONS, multiple: int = 1, snap: int = 1
) -> list[int]:
    """floor(f * full) for each fraction, de-duplicated, at least 1, always including ``full``.

    16 -> [4, 6, 8, 9, 11, 12, 14, 16]; 64 -> [19, 25, 32, 38, 44, 51, 57, 64].
    With ``multiple`` m > 1 each value is rounded to the nearest multiple of m (at least m,
    at most ``full``), which CPU and GPU kernels run faster: 64, m=8 -> [16, 24, ..., 64].
    With ``snap`` b > 1 each value is rounded *up* to a multiple of b (at most ``full``): a
    runtime that works in blocks of b channels runs those widths anyway. 16, b=8 -> [8, 16].
    """
    if multiple < 1:
        raise ValueError(f"width multiple must be >= 1, got {multiple}")
    values = {max(1, math.floor(f * full + 1e-9)) for f in fractions if 0 < f <= 1}
    if multiple > 1:
        values = {min(full, max(multiple, multiple * round(v / multiple))) for v in values}
    if snap > 1:
        values = {min(full, snap * math.ceil(v / snap)) for v in values}
    values.add(full)
    return sorted(values)


def searched_step(spec: ModelSpec, name: str, opts: SpaceOptions | None = None) -> int:
    """The step a searched width of ``spec`` moves in; 0 when the space leaves it at its full
    width (it cannot be pruned, or it is the embedding and ``search_embedding`` is off)."""
    opts = opts or SpaceOptions()
    if spec.embedding(name) and not opts.search_embedding:
        return 0
    return spec.width_step(name)


def choice_widths(spec: ModelSpec, name: str, full: int, opts: SpaceOptions) -> list[int]:
    """The candidate widths of one width choice of ``spec``: `width_candidates`, restricted
    to the steps the model needs (whole groups of a grouped conv; a width that cannot be
    searched keeps its full value)."""
    if not opts.search_width:
        return [full]
    step = searched_step(spec, name, opts)
    if step == 0:
        return [full]
    values = width_candidates(full, opts.width_fractions, opts.width_multiple, opts.width_snap)
    if step > 1:
        values = sorted({max(step, v // step * step) for v in values} | {full})
    return values


def depth_candidates(blocks: int) -> list[int]:
    """Kept-block counts of a stage: 1..N for N <= 3, else 1, 3, 5, ... plus N."""
    if blocks <= 3:
        return list(range(1, blocks + 1))
    values = list(range(1, blocks + 1, 2))
    if values[-1] != blocks:
        values.append(blocks)
    return values


def smallest_shape(model: str, options: SpaceOptions | None = None) -> Shape:
    """The cheapest shape of ``model``'s search space: every width and depth at its first
    candidate (tied residual widths share one candidate list, so the same holds for them)."""
    from tasprune.models import get_model_spec

    opts = options or SpaceOptions()
    spec = get_model_spec(model)
    full = spec.full_shape()
    widths = {n: choice_widths(spec, n, w, opts)[0] for n, w in full.widths.items()}
    depths = {s: depth_candidates(d)[0] if opts.search_depth else d for s, d in full.depths.items()}
    return full.replace(widths=widths, depths=depths)
