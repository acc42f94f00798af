"""The cost algebra a model's FLOPs and params are counted in, once (`layer_cost`).

The exact algebra evaluates the count on the integer widths of one Shape
(`tasprune.cost.model_cost`); the search's expected algebra evaluates the same count on
width/depth distributions, which makes the expected cost differentiable and equal to the
exact cost whenever every distribution is one-hot.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from tasprune.latency_table import Op
from tasprune.shape import Shape

if TYPE_CHECKING:
    from tasprune.latency_table import LatencyTable

Num = Any  # int under the exact algebra, a 0-d tensor under the expected one


def needs_projection(in_w: int, out_w: int, stride: int) -> bool:
    """A block gets a 1x1 projection shortcut when it changes width or resolution."""
    return stride != 1 or in_w != out_w


class CostAlgebra(Protocol):
    """Operations a cost function needs on channel counts (``D``) and probabilities."""

    def const(self, channels: int) -> Any: ...

    def width(self, name: str) -> Any: ...

    def keep(self, stage: str, index: int) -> Num: ...

    def stage_output(self, stage: str, outs: Sequence[Any]) -> Any: ...

    def mean(self, d: Any) -> Num: ...

    def prod(self, a: Any, b: Any) -> Num: ...

    def proj(self, a: Any, b: Any, stride: int) -> Num:
        """E[a*b*1[projection]]: the channel pairs of a projection shortcut, if it exists."""
        ...

    def lookup(self, table: LatencyTable, op: Op, a: Any, b: Any, *, differ: bool = False) -> Num:
        """E[latency of ``op`` at widths (a, b)] from ``table`` (``differ``: only where
        a != b, a projection that exists only when a block changes width)."""
        ...

    def total(self, parts: Sequence[tuple[Any, int]]) -> Any:
        """The channel count sum(m * x) of several independent parts ``(x, m)``."""
        ...


class ExactAlgebra:
    """Integer widths and 0/1 block keeps of one Shape."""

    def __init__(self, shape: Shape) -> None:
        self.shape = shape

    def const(self, channels: int) -> int:
        return channels

    def width(self, name: str) -> int:
        return self.shape.widths[name]

    def keep(self, stage: str, index: int) -> int:
        return int(index < self.shape.depths[stage])

    def stage_output(self, stage: str, outs: Sequence[int]) -> int:
        return outs[self.shape.depths[stage] - 1]

    def mean(self, d: int) -> int:
        return d

    def prod(self, a: int, b: int) -> int:
        return a * b

    def proj(self, a: int, b: int, stride: int) -> int:
        return a * b if needs_projection(a, b, stride) else 0

    def lookup(self, table: LatencyTable, op: Op, a: int, b: int, *, differ: bool = False) -> float:
        return 0.0 if differ and a == b else table.value(op, a, b)

    def total(self, parts: Sequence[tuple[int, int]]) -> int:
        return sum(x * m for x, m in parts)


class Counter:
    """Accumulates FLOPs and params (and, given a latency table, latency in ms) for one
    evaluation of a cost function."""

    def __init__(self, alg: CostAlgebra, table: LatencyTable | None = None) -> None:
        self.alg = alg
        self.table = table
        self.flops: Num = 0
        self.params: Num = 0
        self.latency: Num = 0

    def layer_latency(self, op: Op, cin: Any, cout: Any, keep: Num = 1, **kw: bool) -> None:
        """Add the table's latency of ``op`` at widths (cin, cout) (nothing without a table)."""
        if self.table is not None:
            self.latency = self.latency + keep * self.alg.lookup(self.table, op, cin, cout, **kw)
