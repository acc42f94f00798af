"""State dicts that keep what a module's loading needs.

A module's ``state_dict()`` carries ``_metadata``: each sub-module's state version, which some
classes read when loading (torchvision's MNASNet refuses a state without it). A copy made with
a dict comprehension drops it, so every copy that is saved goes through `portable_state`, and
every load goes through `load_weights`, which gives a state that lacks it (a file written by an
older tasprune) the loading module's own versions.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

__all__ = ["load_weights", "portable_state"]


def portable_state(module: nn.Module) -> OrderedDict[str, Tensor]:
    """A contiguous CPU copy of ``module``'s state dict, its version metadata included."""
    state = module.state_dict()
    out: OrderedDict[str, Tensor] = OrderedDict(
        (k, v.detach().cpu().contiguous()) for k, v in state.items()
    )
    meta = getattr(state, "_metadata", None)
    if meta is not None:
        out._metadata = OrderedDict(meta)  # type: ignore[attr-defined]
    return out


def load_weights(module: nn.Module, state: Mapping[str, Tensor], *, strict: bool = True) -> Any:
    """``module.load_state_dict(state)``, with ``module``'s own version metadata where
    ``state`` carries none; returns what ``load_state_dict`` returns."""
    if getattr(state, "_metadata", None) is None:
        own = getattr(module.state_dict(), "_metadata", None)
        copy: OrderedDict[str, Tensor] = OrderedDict(state)
        if own is not None:
            copy._metadata = own  # type: ignore[attr-defined]
        state = copy
    return module.load_state_dict(state, strict=strict)
