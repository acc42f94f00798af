"""tasprune: network pruning via Transformable Architecture Search (TAS)."""

import types
from collections.abc import Callable
from typing import Any

from tasprune import distill as _distill_mod
from tasprune import search as _search_mod
from tasprune.api import as_array_dataset, load, prune, run, train
from tasprune.api import distill as _distill_fn
from tasprune.api import search as _search_fn
from tasprune.config import DistillConfig, Recipe, SearchConfig, TrainConfig, load_recipe
from tasprune.cost import model_cost, model_flops
from tasprune.data import ArrayDataset
from tasprune.datasets import load_dataset
from tasprune.kd import Distiller
from tasprune.models import create_model, get_model_spec, list_models
from tasprune.search.tas import TAS
from tasprune.shape import Shape

try:
    from importlib.metadata import version as _version

    __version__ = _version("tasprune")
except Exception:  # not installed (a source tree on sys.path)
    __version__ = "0+unknown"


class _CallableModule(types.ModuleType):
    """A module that is also an API function.

    ``tasprune.search`` and ``tasprune.distill`` are both modules (``from tasprune.search
    import SearchConfig``, ``import tasprune.distill as d`` keep working) and the API calls
    ``tasprune.search(...)`` / ``tasprune.distill(...)`` of :mod:`tasprune.api`.
    """

    _api_call: Callable[..., Any]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._api_call(*args, **kwargs)


def _make_callable(module: types.ModuleType, fn: Callable[..., Any]) -> types.ModuleType:
    module.__class__ = _CallableModule
    module._api_call = fn  # type: ignore[attr-defined]
    return module


search = _make_callable(_search_mod, _search_fn)
distill = _make_callable(_distill_mod, _distill_fn)

__all__ = [
    "TAS",
    "prune",
    "ArrayDataset",
    "DistillConfig",
    "Distiller",
    "Recipe",
    "SearchConfig",
    "Shape",
    "TrainConfig",
    "as_array_dataset",
    "create_model",
    "distill",
    "get_model_spec",
    "list_models",
    "load",
    "load_dataset",
    "load_recipe",
    "model_cost",
    "model_flops",
    "run",
    "search",
    "train",
]
