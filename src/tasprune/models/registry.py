"""`get_model_spec(name)` and `create_model(name, shape)`: any model name (a shipped network,
``torchvision:``, ``timm:``, ``py:`` or a registered module instance), one mechanism."""

from __future__ import annotations

import os

from torch import nn

from tasprune.models.spec import ModelSpec
from tasprune.models.zoo import list_models
from tasprune.shape import Shape

__all__ = ["ModelSpec", "create_model", "get_model_spec", "list_models"]


def get_model_spec(name: str) -> ModelSpec:
    """The spec of ``name``, read off its source's graph (cached per source)."""
    from tasprune.models.traced import traced_spec

    return traced_spec(name)


def create_model(
    name: str,
    shape: Shape | str | os.PathLike[str] | None = None,
    *,
    num_classes: int = 10,
    in_channels: int = 3,
) -> nn.Module:
    """Build ``name`` at ``shape`` (a `Shape` or a search's shape.json; default: the unpruned
    shape), validated against the model."""
    if shape is not None and not isinstance(shape, Shape):
        shape = Shape.load(shape)[0]
    spec = get_model_spec(name)
    full = spec.full_shape()
    shape = full if shape is None else shape
    shape.validate_against(full, name)
    return spec.build(shape, num_classes, in_channels)
