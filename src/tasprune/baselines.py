"""Simple pruning baselines at the same FLOPs budget as TAS: uniform, random and L1-norm.

A pruning method is only worth its margin over these at equal FLOPs (and equal training), so
each returns a `Shape` whose exact FLOPs (`tasprune.cost.model_cost`) lie in the same band the
TAS search accepts, ``[ratio - tolerance, ratio] x unpruned``:

- :func:`uniform_shape`: every width times one factor ``s``, depths kept (bisection on ``s``).
- :func:`random_shape`: widths and depths drawn uniformly from the TAS search space's
  candidates, rejected until in band (so: uniform over the in-band shapes of the space).
- :func:`l1_prune`: L1-norm filter pruning (Li et al., ICLR 2017) of the *trained* teacher:
  the uniform shape's widths, keeping the filters of largest L1 norm in every coupled group
  (Torch-Pruning's dependency graph ties the channels a residual addition couples).

The students built from these shapes are then trained exactly like the TAS student (see
:mod:`tasprune.bench`).
"""

from __future__ import annotations

import logging
import math
import random

from torch import nn

from tasprune.budget import Budget
from tasprune.config import SpaceOptions
from tasprune.cost import model_cost
from tasprune.errors import BudgetError
from tasprune.models import create_model, get_model_spec
from tasprune.search.space import searched_step
from tasprune.shape import Shape

logger = logging.getLogger(__name__)

__all__ = ["flops_band", "l1_prune", "random_shape", "uniform_shape"]

Size = tuple[int, int, int]


def flops_band(
    model: str, ratio: float, input_size: Size, num_classes: int, tolerance: float
) -> tuple[int, Budget]:
    """(unpruned FLOPs, the FLOPs budget ``[r - t, r] x full``) the baselines must meet."""
    budget = Budget(ratio, tolerance, "flops")
    full, _ = model_cost(model, None, input_size, num_classes)
    return full, budget


def _flops(model: str, shape: Shape, input_size: Size, num_classes: int) -> int:
    return model_cost(model, shape, input_size, num_classes)[0]


# --------------------------------------------------------------------------- uniform


def _scaled(model: str, s: float) -> Shape:
    """Every searchable width of ``model`` times ``s`` (rounded to its step, at least one
    step); widths that cannot be pruned stay full, as does a transformer's embedding width
    (the search's default space leaves it too), depths are kept."""
    spec = get_model_spec(model)
    full = spec.full_shape()
    widths = {}
    for key, w in full.widths.items():
        step = searched_step(spec, key)
        widths[key] = w if step == 0 else min(w, max(step, step * round(s * w / step)))
    return Shape(widths=widths, depths=dict(full.depths))


def uniform_shape(
    model: str, ratio: float, input_size: Size, num_classes: int, tolerance: float = 0.05
) -> Shape:
    """Every width times one factor ``s`` (depths kept), with exact FLOPs in the budget band.

    Brackets from ``s = sqrt(ratio)`` (FLOPs scale about quadratically with width) and
    bisects on ``s`` for the widest such shape at or under ``ratio`` (the budget is spent as
    fully as the search's would be). Raises `BudgetError` when rounding makes
    the FLOPs jump over the whole band, or the narrowest shape is over budget.
    """
    full, budget = flops_band(model, ratio, input_size, num_classes, tolerance)
    high = budget.bounds(full)[1]

    def cost(s: float) -> int:
        return _flops(model, _scaled(model, s), input_size, num_classes)

    # Bracket from the quadratic guess, then bisect: invariant cost(lo) <= high < cost(hi).
    guess = math.sqrt(ratio)
    lo, hi = (guess, 1.0) if cost(guess) <= high else (0.0, guess)
    if cost(lo) > high:
        raise BudgetError(
            f"even 1 channel per conv of {model} costs {cost(lo) / full:.3f} of the FLOPs, "
            f"over the budget {ratio}. Fix: raise the FLOPs ratio"
        )
    if cost(hi) <= high:
        lo = hi
    for _ in range(50):
        mid = (lo + hi) / 2
        if cost(mid) <= high:
            lo = mid
        else:
            hi = mid
    shape = _scaled(model, lo)
    flops = _flops(model, shape, input_size, num_classes)
    if not budget.contains(flops, full):
        raise BudgetError(
            f"no uniform width factor puts {model} in the FLOPs band [{ratio - tolerance:.3f}, "
            f"{ratio:.3f}] (closest: {flops / full:.4f} at s={lo:.4f}). Fix: widen the tolerance"
        )
    logger.info("uniform shape: s=%.4f, FLOPs ratio %.4f", lo, flops / full)
    return shape


# --------------------------------------------------------------------------- random


def random_shape(
    model: str,
    ratio: float,
    input_size: Size,
    num_classes: int,
    tolerance: float = 0.05,
    seed: int = 0,
    *,
    space: SpaceOptions | None = None,
    max_tries: int = 200_000,
) -> Shape:
    """A shape drawn uniformly from the TAS search space, redrawn until its FLOPs are in band.

    Every width choice of ``SuperNet(model, options=space)`` (one per conv, or one per residual
    stream when the space ties them) takes a uniformly drawn candidate, every stage a uniformly
    drawn depth candidate; a draw outside ``[ratio - tolerance, ratio] x unpruned`` is
    rejected. The same ``seed`` gives the same shape. Raises `BudgetError` after ``max_tries``.
    """
    from tasprune.search.supernet import SuperNet

    full, budget = flops_band(model, ratio, input_size, num_classes, tolerance)
    net = SuperNet.for_input(model, input_size, num_classes, space)
    rng = random.Random(seed)
    for attempt in range(1, max_tries + 1):
        shape = net.sample(rng)
        flops = _flops(model, shape, input_size, num_classes)
        if budget.contains(flops, full):
            logger.info(
                "random shape (seed %d): FLOPs ratio %.4f after %d draws",
                seed,
                flops / net.full_flops,
                attempt,
            )
            return shape
    raise BudgetError(
        f"no random shape of {model} landed in the FLOPs band [{ratio - tolerance:.3f}, "
        f"{ratio:.3f}] in {max_tries} draws. Fix: widen the tolerance or use a ratio nearer the "
        "space's typical cost"
    )


# --------------------------------------------------------------------------- L1


def l1_prune(
    teacher_module: nn.Module,
    model: str,
    ratio: float,
    input_size: Size,
    num_classes: int,
    tolerance: float = 0.05,
) -> tuple[nn.Module, Shape]:
    """One-shot L1-norm filter pruning of a trained unpruned ``teacher_module`` to the budget.

    The channels of every coupled group (a residual stream with its projections, a conv with
    its BN and the next conv's inputs; Torch-Pruning's dependency graph) are ordered by the
    mean L1 norm of the filters that write them (`tasprune.importance.order_channels`, "l1");
    every group then keeps the same fraction of its channels, largest norms first: the
    uniform shape's widths. The classifier's outputs are never pruned and the teacher itself
    is not modified.

    Returns ``(create_model(model, shape) holding the surviving weights, shape)``. Raises
    `BudgetError` when the FLOPs cannot be brought into the band.
    """
    from tasprune.importance import order_channels
    from tasprune.weights import load_weights

    shape = uniform_shape(model, ratio, input_size, num_classes, tolerance)
    ordered = order_channels(teacher_module, "l1", input_size)
    state = get_model_spec(model).transfer(ordered.state_dict(), shape, num_classes, input_size[0])
    pruned = create_model(model, shape, num_classes=num_classes, in_channels=input_size[0])
    load_weights(pruned, state)
    return pruned.eval(), shape
