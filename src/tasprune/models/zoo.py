"""The networks tasprune ships, by name: plain `nn.Module` factories that the one analysis
(`tasprune.models.analysis`) makes searchable like any other network. ``cifar_resnet20`` and
``tasprune:cifar_resnet20`` name the same source."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

__all__ = ["Shipped", "list_models", "ship", "shipped"]

Factory = Callable[[int, int], nn.Module]  # (num_classes, in_channels) -> unpruned network


@dataclass(frozen=True)
class Shipped:
    """One shipped network: how to build it unpruned, and the input it was designed for."""

    name: str
    build: Factory
    default_input: tuple[int, int, int]
    description: str


_SHIPPED: dict[str, Shipped] = {}


def ship(
    name: str, default_input: tuple[int, int, int], description: str
) -> Callable[[Factory], Factory]:
    """Decorator: register ``fn(num_classes, in_channels)`` as the shipped network ``name``."""

    def register(fn: Factory) -> Factory:
        _SHIPPED[name] = Shipped(name, fn, default_input, description)
        return fn

    return register


def list_models() -> list[str]:
    """The shipped networks' names (any torchvision:, timm:, py: or module instance works too)."""
    return sorted(_SHIPPED)


def shipped(name: str) -> Shipped | None:
    """The shipped network ``name`` (bare or ``tasprune:``-prefixed), None if there is none."""
    return _SHIPPED.get(name.removeprefix("tasprune:"))
