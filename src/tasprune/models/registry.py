"""Model registry: `create_model(name, shape=...)` builds any registered family at any shape."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from tasprune.errors import ConfigError
from tasprune.models.algebra import Counter
from tasprune.models.ops import Ops, PlainOps
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
    # Traced models (`tasprune.models.traced`): the step candidates of a width must keep
    # (0: not searchable), the searchable network of a SuperNet, and the weights of a pruned
    # network cut from unpruned ones. Families leave them None (any width; `SearchOps`;
    # leading slices).
    width_step: Callable[[str], int] | None = None
    searchable: Callable[[Any], nn.Module] | None = None
    transfer: Callable[[dict[str, Tensor], Shape, int, int], dict[str, Tensor]] | None = None


_REGISTRY: dict[str, Callable[[], ModelSpec]] = {}


def register_model(fn: Callable[[], ModelSpec]) -> Callable[[], ModelSpec]:
    """Decorator: the function's name is the model name; it returns the model's spec."""
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_model_spec(name: str) -> ModelSpec:
    from tasprune.models.traced import is_traced, traced_spec

    if is_traced(name):
        return traced_spec(name)
    if name not in _REGISTRY:
        raise ConfigError(
            f"unknown model '{name}'. Fix: use one of {', '.join(list_models())}, or "
            "torchvision:NAME / timm:NAME"
        )
    return _REGISTRY[name]()


def create_model(
    name: str,
    shape: Shape | None = None,
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    ops: Ops | None = None,
) -> nn.Module:
    """Build ``name`` at ``shape`` (default: the unpruned shape), validated against the model."""
    spec = get_model_spec(name)
    full = spec.full_shape()
    shape = full if shape is None else shape
    shape.validate_against(full, name)
    return spec.build(shape, num_classes, in_channels, ops or PlainOps())
