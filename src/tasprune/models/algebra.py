"""The cost algebra a model family writes its FLOPs and params against, once.

The exact algebra evaluates a family's cost function on the integer widths of one Shape
(`tasprune.cost.model_cost`); the search's expected algebra evaluates the same function on
width/depth distributions, which makes the expected cost differentiable and equal to the
exact cost whenever every distribution is one-hot.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from tasprune.shape import Shape

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

    def proj_out(self, a: Any, b: Any, stride: int) -> Num:
        """E[b*1[projection]]: the out channels of a projection shortcut, if it exists."""
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

    def proj_out(self, a: int, b: int, stride: int) -> int:
        return b if needs_projection(a, b, stride) else 0


class Counter:
    """Accumulates FLOPs and params for one evaluation of a cost function."""

    def __init__(self, alg: CostAlgebra) -> None:
        self.alg = alg
        self.flops: Num = 0
        self.params: Num = 0

    def conv(
        self,
        cin: Any,
        cout: Any,
        kernel: int,
        hw_out: int,
        keep: Num = 1,
        *,
        depthwise: bool = False,
        bn: bool = True,
    ) -> None:
        """A conv (+BN): MACs = Cin*Cout*k^2*H*W (Cout*k^2*H*W when depthwise)."""
        a = self.alg
        weights = a.mean(cout) if depthwise else a.prod(cin, cout)
        self.flops = self.flops + keep * weights * (kernel * kernel * hw_out)
        self.params = self.params + keep * weights * (kernel * kernel)
        if bn:
            self.params = self.params + keep * 2 * a.mean(cout)

    def projection(self, cin: Any, cout: Any, stride: int, hw_out: int, keep: Num = 1) -> None:
        """Projection shortcut (1x1 conv + BN), present iff stride != 1 or widths differ."""
        a = self.alg
        pairs = a.proj(cin, cout, stride)
        self.flops = self.flops + keep * pairs * hw_out
        self.params = self.params + keep * pairs
        self.params = self.params + keep * 2 * a.proj_out(cin, cout, stride)  # its BN

    def linear(self, cin: Any, cout: int) -> None:
        m = self.alg.mean(cin)
        self.flops = self.flops + m * cout
        self.params = self.params + m * cout + cout


def conv_out(size: int, kernel: int, stride: int) -> int:
    """Spatial size after a conv with padding kernel//2."""
    pad = kernel // 2
    return (size + 2 * pad - kernel) // stride + 1
