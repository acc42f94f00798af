"""`ModelSpec`: everything tasprune needs to know about one model (a registered family or a
traced torchvision/timm network)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from tasprune.models.algebra import Counter
from tasprune.models.ops import Ops
from tasprune.shape import Shape

BuildFn = Callable[[Shape, int, int, Ops], nn.Module]
CostFn = Callable[[Counter, int, tuple[int, int], int], None]


@dataclass(frozen=True)
class ModelSpec:
    """Everything tasprune needs to know about one registered model."""

    name: str
    family: str
    build: BuildFn  # (shape, num_classes, in_channels, ops) -> module
    full_shape: Callable[[], Shape]
    cost: CostFn  # (counter, in_channels, (H, W), num_classes) -> accumulates into counter
    default_input: tuple[int, int, int] = (3, 32, 32)
    description: str = ""
    # Conv names whose out-widths form one residual stream (tied in "tie_residual" search).
    residual_groups: Callable[[], list[list[str]]] | None = None
    # Convs the Shape does not list because their width is tied to a listed one (e.g. the
    # depthwise conv of an inverted residual block): conv name -> the Shape key it follows.
    tied_widths: Callable[[], dict[str, str]] | None = None
    # Traced models (family "traced", `tasprune.models.traced`; searched through
    # `tasprune.search.traced`): the step candidates of a width must keep (0: not
    # searchable), and the weights of a pruned network cut from unpruned ones. Families
    # leave them None (any width; leading slices).
    width_step: Callable[[str], int] | None = None
    transfer: Callable[[dict[str, Tensor], Shape, int, int], dict[str, Tensor]] | None = None


_REGISTRY: dict[str, Callable[[], ModelSpec]] = {}


def register_model(fn: Callable[[], ModelSpec]) -> Callable[[], ModelSpec]:
    """Decorator: the function's name is the model name; it returns the model's spec."""
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    """The registered family models (traced sources are named, not listed)."""
    return sorted(_REGISTRY)


def registered_spec(name: str) -> ModelSpec | None:
    factory = _REGISTRY.get(name)
    return factory() if factory is not None else None
