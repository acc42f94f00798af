"""Exact FLOPs (multiply-accumulates) and parameter counts as pure functions of a shape: the
model's cost (its traced layers, `tasprune.models.layer_cost`) on the exact algebra."""

from __future__ import annotations

from tasprune.models import get_model_spec
from tasprune.models.algebra import Counter, ExactAlgebra
from tasprune.shape import Shape

__all__ = ["model_cost", "model_flops"]


def model_cost(
    model: str,
    shape: Shape | None = None,
    input_size: tuple[int, int, int] | None = None,
    num_classes: int = 10,
) -> tuple[int, int]:
    """(FLOPs as multiply-accumulates, params) of ``model`` at ``shape`` without building it."""
    spec = get_model_spec(model)
    full = spec.full_shape()
    shape = full if shape is None else shape
    shape.validate_against(full, model)
    c, h, w = input_size or spec.default_input
    counter = Counter(ExactAlgebra(shape))
    spec.cost(counter, c, (h, w), num_classes)
    return int(counter.flops), int(counter.params)


def model_flops(
    model: str,
    shape: Shape | None = None,
    input_size: tuple[int, int, int] | None = None,
    num_classes: int = 10,
) -> int:
    return model_cost(model, shape, input_size, num_classes)[0]
