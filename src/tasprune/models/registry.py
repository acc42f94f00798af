"""Model registry: `create_model(name, shape=...)` builds any registered family at any shape."""

from __future__ import annotations

from torch import nn

from tasprune.errors import ConfigError
from tasprune.models.ops import Ops, PlainOps
from tasprune.models.spec import _REGISTRY, BuildFn, CostFn, ModelSpec, list_models, register_model
from tasprune.shape import Shape

__all__ = [
    "BuildFn",
    "CostFn",
    "ModelSpec",
    "create_model",
    "get_model_spec",
    "list_models",
    "register_model",
]


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
