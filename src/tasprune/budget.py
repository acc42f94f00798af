"""The budget: one home for "how much of the unpruned network's cost may the pruned one keep".

A `Budget` is a ratio of a cost metric (FLOPs, params, predicted latency) relative to the
unpruned network, with a band below it: a shape is accepted when its cost lies in
``[ratio - tolerance, ratio] x unpruned``, never above the target (a user asking for 50%
never gets 51%), and not so far below that the budget goes unspent. The search's loss, the
feasibility check, the baselines, the report and the benchmark all use this type.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tasprune.errors import BudgetError, ConfigError

__all__ = ["Budget"]

_EPS = 1e-9  # ratios computed from integers: tolerate float rounding at the band's edges
_METRICS = ("flops", "params", "latency")
_LABEL = {"flops": "FLOPs", "params": "params", "latency": "latency"}


@dataclass(frozen=True)
class Budget:
    """Keep ``metric`` in ``[ratio - tolerance, ratio]`` x the unpruned network's."""

    ratio: float
    tolerance: float = 0.05
    metric: str = "flops"

    def __post_init__(self) -> None:
        if self.metric not in _METRICS:
            raise ConfigError(
                f"unknown budget metric {self.metric!r}. Fix: use one of {', '.join(_METRICS)}"
            )
        if not 0 < self.ratio <= 1:
            raise ConfigError(f"{self.metric}_ratio {self.ratio} is not in (0, 1]. Fix: e.g. 0.5")
        if not 0 <= self.tolerance < self.ratio:
            raise ConfigError(
                f"tolerance {self.tolerance} must be in [0, {self.metric}_ratio={self.ratio}). "
                "Fix: use e.g. 0.05"
            )

    @property
    def label(self) -> str:
        return _LABEL[self.metric]

    @property
    def band(self) -> tuple[float, float]:
        """(lowest, highest) accepted ratio."""
        return self.ratio - self.tolerance, self.ratio

    def bounds(self, full: float) -> tuple[float, float]:
        """(lowest, highest) accepted absolute cost for an unpruned cost ``full``."""
        low, high = self.band
        return low * full, high * full

    def contains_ratio(self, ratio: float) -> bool:
        low, high = self.band
        return low - _EPS <= ratio <= high + _EPS

    def within_target(self, ratio: float) -> bool:
        """Whether ``ratio`` is at or under the target (the band's lower edge ignored)."""
        return ratio <= self.ratio + _EPS

    def contains(self, cost: float, full: float) -> bool:
        """Whether a shape of ``cost`` is accepted (``full``: the unpruned network's cost)."""
        return self.contains_ratio(cost / full)

    def loss(self, expected: Tensor, current: float | Tensor, full: float, weight: float) -> Tensor:
        """Log-barrier loss on the expected cost (differentiable in the architecture):
        ``weight * log E[cost]`` while the argmax shape's exact ``current`` cost is over the
        target, ``-weight * log E[cost]`` while it is under the band, else 0. ``current`` may
        be a tensor on the device (no host synchronisation then)."""
        low, high = self.bounds(full)
        now = torch.as_tensor(current, dtype=expected.dtype, device=expected.device)
        sign = (now > high).to(expected.dtype) - (now < low).to(expected.dtype)
        return sign * weight * torch.log(expected)

    def check_reachable(self, smallest: float, full: float, model: str) -> None:
        """Refuse, before any training, a target below the smallest shape of the space."""
        target = self.ratio * full
        if target < smallest:
            floor = smallest / full
            raise BudgetError(
                f"{self.metric}_ratio {self.ratio} asks for {self.amount(target)} "
                f"but the smallest shape of {model} costs {self.amount(smallest)} "
                f"(ratio {floor:.3f}). Fix: use {self.metric}_ratio >= {floor:.3f} or smaller "
                "width_fractions"
            )

    def amount(self, cost: float) -> str:
        """``"12.34 M FLOPs"``, ``"3.21 ms"``."""
        if self.metric == "latency":
            return f"{cost:.2f} ms"
        return f"{cost / 1e6:.2f} M {self.label}"

    def describe(self) -> str:
        """``"FLOPs ratio 0.500 (band 0.450-0.500)"``."""
        low, high = self.band
        return f"{self.label} ratio {self.ratio:.3f} (band {low:.3f}-{high:.3f})"
