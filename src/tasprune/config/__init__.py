"""Every setting of tasprune, in one package: the schemas, their defaults and validation, the
YAML recipe with its overrides, and the resolved recipe written to a run folder.

- `TrainConfig` (`config.train`): one training stage (teacher, student).
- `SearchConfig`, `SpaceOptions` (`config.search`): a TAS search and its space.
- `Recipe` and its sections (`config.recipe`): a whole run, loaded from YAML (a file, or a
  shipped recipe by name: `recipe_names`) + overrides.

Every API call takes a config object or a plain mapping alike (`as_config`).
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel

from tasprune.config.recipe import (
    DataConfig,
    DistillConfig,
    Recipe,
    ReportConfig,
    TeacherConfig,
    deep_merge,
    dump_recipe,
    load_recipe,
    parse_overrides,
    read_yaml,
    recipe_diff,
    recipe_file,
    recipe_names,
    validate_model,
)
from tasprune.config.search import DEFAULT_FRACTIONS, SearchConfig, SpaceOptions
from tasprune.config.train import TrainConfig
from tasprune.errors import ConfigError

__all__ = [
    "DEFAULT_FRACTIONS",
    "DataConfig",
    "DistillConfig",
    "Recipe",
    "ReportConfig",
    "SearchConfig",
    "SpaceOptions",
    "TeacherConfig",
    "TrainConfig",
    "as_config",
    "deep_merge",
    "dump_recipe",
    "load_recipe",
    "parse_overrides",
    "read_yaml",
    "recipe_diff",
    "recipe_file",
    "recipe_names",
    "validate_model",
]

C = TypeVar("C", bound=BaseModel)


def as_config(cls: type[C], value: C | dict[str, Any], source: str) -> C:
    """``value`` as a ``cls`` config: itself, or a mapping of its fields validated (one
    `ConfigError` line naming the field otherwise)."""
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        return validate_model(cls, value, source)  # type: ignore[no-any-return]
    raise ConfigError(
        f"{source} settings must be a {cls.__name__} or a mapping, got {type(value).__name__}. "
        f"Fix: pass {cls.__name__}(...) or a dict of its fields"
    )
