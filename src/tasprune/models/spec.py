"""`ModelSpec`: everything tasprune needs to know about one model, read off its source's graph
(`tasprune.models.traced.traced_spec`): how to build it at a shape, its unpruned shape, its
cost, the widths a residual stream ties and how weights move to a pruned copy."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from tasprune.models.algebra import Counter
from tasprune.shape import Shape

BuildFn = Callable[[Shape, int, int], nn.Module]  # (shape, num_classes, in_channels)
CostFn = Callable[[Counter, int, tuple[int, int], int], None]
TransferFn = Callable[[dict[str, Tensor], Shape, int, int], dict[str, Tensor]]


@dataclass(frozen=True)
class ModelSpec:
    """One model's search space and the functions on it."""

    name: str
    build: BuildFn  # the pruned network of a shape
    full_shape: Callable[[], Shape]
    cost: CostFn  # (counter, in_channels, (H, W), num_classes) -> accumulates into counter
    default_input: tuple[int, int, int]
    description: str
    # The width choices that write one residual stream (tied by ``search.tie_residual``).
    residual_groups: Callable[[], list[list[str]]]
    # The step a width's candidates must keep (0: not searchable).
    width_step: Callable[[str], int]
    # The weights of the network at a shape, cut from an unpruned network's state.
    transfer: TransferFn
    # Is a width choice the token stream an attention module reads (a transformer's
    # embedding width, searched only with ``search.search_embedding``)?
    embedding: Callable[[str], bool] = lambda name: False
