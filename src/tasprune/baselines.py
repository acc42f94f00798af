"""Simple pruning baselines at the same FLOPs budget as TAS: uniform, random and L1-norm.

A pruning method is only worth its margin over these at equal FLOPs (and equal training), so
each returns a `Shape` whose exact FLOPs (`tasprune.cost.model_cost`) lie in the same band the
TAS search accepts, ``[ratio - tolerance, ratio] x unpruned``:

- :func:`uniform_shape`: every width times one factor ``s``, depths kept (bisection on ``s``).
- :func:`random_shape`: widths and depths drawn uniformly from the TAS search space's
  candidates, rejected until in band (so: uniform over the in-band shapes of the space).
- :func:`l1_prune`: L1-norm filter pruning (Li et al., ICLR 2017) of the *trained* teacher with
  Torch-Pruning's dependency graph, which ties the widths that a residual addition couples;
  the result is rebuilt as ``create_model(model, shape)`` with the surviving weights.

The students built from these shapes are then trained exactly like the TAS student (see
:mod:`tasprune.bench`).
"""

from __future__ import annotations

import copy
import logging
import math
import random
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from tasprune.budget import Budget
from tasprune.config import SpaceOptions
from tasprune.cost import model_cost
from tasprune.errors import BudgetError, ConfigError, ShapeError
from tasprune.models import create_model, get_model_spec
from tasprune.models.graph import dependency_graph
from tasprune.shape import Shape

logger = logging.getLogger(__name__)

__all__ = [
    "FilterL1Importance",
    "flops_band",
    "l1_prune",
    "random_shape",
    "shape_of_module",
    "uniform_shape",
]

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


def _scaled(full: Shape, s: float) -> Shape:
    return Shape(
        widths={k: max(1, round(s * w)) for k, w in full.widths.items()}, depths=dict(full.depths)
    )


def uniform_shape(
    model: str, ratio: float, input_size: Size, num_classes: int, tolerance: float = 0.05
) -> Shape:
    """Every width times one factor ``s`` (depths kept), with exact FLOPs in the budget band.

    Brackets from ``s = sqrt(ratio)`` (FLOPs scale about quadratically with width) and
    bisects on ``s`` for the widest such shape at or under ``ratio`` (the budget is spent as
    fully as the search's would be). Raises `BudgetError` when rounding makes
    the FLOPs jump over the whole band, or the narrowest shape is over budget.
    """
    full_shape = get_model_spec(model).full_shape()
    full, budget = flops_band(model, ratio, input_size, num_classes, tolerance)
    high = budget.bounds(full)[1]

    def cost(s: float) -> int:
        return _flops(model, _scaled(full_shape, s), input_size, num_classes)

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
    shape = _scaled(full_shape, lo)
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


# --------------------------------------------------------------------------- L1 (Torch-Pruning)


def _tp() -> Any:
    try:
        import torch_pruning
    except ImportError as err:
        raise ConfigError(
            "the L1 baseline needs Torch-Pruning. Fix: pip install 'tasprune[baselines]'"
        ) from err
    return torch_pruning


class FilterL1Importance:
    """Torch-Pruning importance: L1 norm of each output filter (Li et al., ICLR 2017).

    A channel of a coupled group (the residual stream of a stage) is written by several convs
    (stem or projection, and every block's last conv); its importance is the mean of their
    filter L1 norms. For a conv that writes alone (a block's first conv) this is exactly the
    L1 norm of its filters. Unlike Torch-Pruning's default group norm, the next conv's input
    slices and the BN scales are not counted.
    """

    @torch.no_grad()
    def __call__(self, group: Any) -> Tensor | None:
        out_fn = _tp().pruner.function.prune_conv_out_channels
        total: Tensor | None = None
        count = 0
        for i, (dep, idxs) in enumerate(group):
            layer = dep.layer
            root_idxs = group[i].root_idxs
            if not (isinstance(layer, nn.Conv2d) and dep.pruning_fn == out_fn) or any(
                r is None for r in root_idxs
            ):
                continue
            norms = layer.weight.detach()[idxs].flatten(1).abs().sum(1).float()
            root = torch.tensor(root_idxs, device=norms.device)
            if total is None:
                total = torch.zeros(len(idxs), device=norms.device)
            total.scatter_add_(0, root, norms)
            count += 1
        return None if total is None else total / count


def shape_of_module(module: nn.Module, model: str) -> Shape:
    """The Shape of a (possibly Torch-Pruning-pruned) plain network: every conv's out-channels.

    Depths are those of the unpruned model (filter pruning never removes blocks).
    """
    full = get_model_spec(model).full_shape()
    widths: dict[str, int] = {}
    for name in full.widths:
        try:
            conv = module.get_submodule(f"{name}.conv")
        except AttributeError:
            raise ShapeError(
                f"the pruned network has no conv '{name}.conv' of {model}. Fix: prune a "
                f"network built by create_model('{model}')"
            ) from None
        if not isinstance(conv, nn.Conv2d):
            raise ShapeError(f"'{name}.conv' of the pruned network is not a Conv2d")
        widths[name] = int(conv.out_channels)
    return Shape(widths=widths, depths=dict(full.depths))


@dataclass
class _GroupPlan:
    """One dependency group: its root conv, channels by rising importance, the Shape keys."""

    root: nn.Module
    prune_fn: Any
    order: list[int]
    members: list[str]

    def keep(self, p: float) -> int:
        """Channels kept when a fraction ``p`` of the group is pruned (at least one)."""
        n = len(self.order)
        return max(1, n - math.floor(p * n + 1e-9))


def _plan_groups(
    dg: Any, ignored: list[nn.Module], work: nn.Module, model: str
) -> list[_GroupPlan]:
    """Score every prunable group of ``work`` once, on the unpruned weights."""
    full = get_model_spec(model).full_shape()
    key_of = {
        m: name[: -len(".conv")]
        for name, m in work.named_modules()
        if name.endswith(".conv") and name[: -len(".conv")] in full.widths
    }
    out_fn = _tp().pruner.function.prune_conv_out_channels
    importance = FilterL1Importance()
    plans: list[_GroupPlan] = []
    for group in dg.get_all_groups(ignored_layers=ignored, root_module_types=[nn.Conv2d]):
        scores = importance(group)
        if scores is None:
            continue
        root = group[0].dep.target.module
        members = [
            key_of[dep.target.module]
            for dep, _ in group
            if dep.pruning_fn == out_fn and dep.target.module in key_of
        ]
        order = torch.argsort(scores, stable=True).tolist()
        plans.append(
            _GroupPlan(root, dg.get_pruner_of_module(root).prune_out_channels, order, members)
        )
    covered = {m for plan in plans for m in plan.members}
    missing = [k for k in full.widths if k not in covered]
    if missing:
        raise ShapeError(
            f"Torch-Pruning found no prunable group for {missing[:3]} of {model}. Fix: report "
            "the model; its convs are not traceable as prunable layers"
        )
    return plans


def _planned_shape(plans: list[_GroupPlan], model: str, p: float) -> Shape:
    full = get_model_spec(model).full_shape()
    widths = dict(full.widths)
    for plan in plans:
        for member in plan.members:
            widths[member] = plan.keep(p)
    return Shape(widths=widths, depths=dict(full.depths))


def l1_prune(
    teacher_module: nn.Module,
    model: str,
    ratio: float,
    input_size: Size,
    num_classes: int,
    tolerance: float = 0.05,
) -> tuple[nn.Module, Shape]:
    """One-shot L1-norm filter pruning of a trained unpruned ``teacher_module`` to the budget.

    Torch-Pruning's dependency graph groups the channels that must go together (the residual
    stream of a stage with its projection shortcut, a conv with its BN and the next conv's
    inputs). Every group is scored once on the unpruned weights with `FilterL1Importance`;
    every group then loses the same fraction ``p`` of its channels, lowest scores first, with
    the smallest ``p`` (bisection) whose exact FLOPs are at most ``ratio x unpruned``. The
    classifier's outputs are never pruned and the teacher itself is not modified.

    Returns ``(create_model(model, shape) holding the surviving weights, shape)``; the rebuilt
    network is checked to load the pruned weights strictly and to reproduce the pruned
    module's outputs. Raises `BudgetError` when the FLOPs cannot be brought into the band.
    """
    _tp()  # the clear error when Torch-Pruning is missing
    full, budget = flops_band(model, ratio, input_size, num_classes, tolerance)
    high = budget.bounds(full)[1]
    work = copy.deepcopy(teacher_module).cpu().float().eval()
    work.requires_grad_(True)  # the graph is traced through autograd; a frozen KD teacher has none
    fc = getattr(work, "fc", None)
    ignored = [fc] if isinstance(fc, nn.Module) else []
    example = torch.randn(1, *input_size)  # N, C, H, W
    dg = dependency_graph(work, example)
    plans = _plan_groups(dg, ignored, work, model)

    def cost(p: float) -> int:
        return _flops(model, _planned_shape(plans, model, p), input_size, num_classes)

    lo, hi = 0.0, 1.0  # invariant: cost(hi) <= high (if reachable at all), cost(lo) > high
    if cost(lo) <= high:
        hi = lo
    elif cost(hi) > high:
        raise BudgetError(
            f"even 1 channel per group of {model} costs {cost(hi) / full:.3f} of the FLOPs, over "
            f"the budget {ratio}. Fix: raise the FLOPs ratio"
        )
    for _ in range(40):
        if hi - lo < 1e-6:
            break
        mid = (lo + hi) / 2
        if cost(mid) <= high:
            hi = mid
        else:
            lo = mid
    shape = _planned_shape(plans, model, hi)
    flops = _flops(model, shape, input_size, num_classes)
    if not budget.contains(flops, full):
        raise BudgetError(
            f"L1 pruning of {model} cannot reach the FLOPs band [{ratio - tolerance:.3f}, "
            f"{ratio:.3f}] (closest: {flops / full:.4f} at channel ratio {hi:.4f}). Fix: widen "
            "the tolerance"
        )
    for plan in plans:
        pruned_idxs = plan.order[: len(plan.order) - plan.keep(hi)]
        if pruned_idxs:
            dg.get_pruning_group(plan.root, plan.prune_fn, pruned_idxs).prune()
    if shape_of_module(work, model) != shape:
        raise ShapeError(
            f"Torch-Pruning left {model} at another shape than planned. Fix: report the model"
        )
    pruned = create_model(model, shape, num_classes=num_classes, in_channels=input_size[0])
    try:
        pruned.load_state_dict(work.state_dict(), strict=True)
    except RuntimeError as err:
        raise ShapeError(
            f"the L1-pruned {model} is not expressible as a Shape "
            f"({str(err).splitlines()[0]}). Fix: report the model; its dependency groups do "
            "not match the family's residual structure"
        ) from None
    pruned.eval()
    with torch.no_grad():
        x = torch.randn(4, *input_size, generator=torch.Generator().manual_seed(0))
        diff = float((pruned(x) - work(x)).abs().max())
    if diff > 1e-4:
        raise ShapeError(
            f"the rebuilt L1-pruned {model} differs from the pruned module by {diff:.3g}. "
            "Fix: report the model; its layer order does not match create_model"
        )
    logger.info("L1 pruning: channel ratio %.4f per group, FLOPs ratio %.4f", hi, flops / full)
    return pruned, shape
