"""Benchmark protocols: the YAML schema, its methods and targets, loading and validation."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tasprune.config import (
    Recipe,
    deep_merge,
    load_recipe,
    read_yaml,
    validate_model,
)
from tasprune.errors import ConfigError
from tasprune.latency import LatencySettings, Runtime

logger = logging.getLogger(__name__)

Method = Literal["tas_kd", "tas_nokd", "uniform_kd", "random_kd", "l1_kd"]
METHODS: dict[str, str] = {
    "tas_kd": "TAS shape + KD",
    "tas_nokd": "TAS shape, CE only",
    "uniform_kd": "uniform width factor + KD",
    "random_kd": "random shape of the TAS space + KD",
    "l1_kd": "L1-norm pruned teacher (its weights as init) + KD",
}
TARGETS: tuple[str, ...] = (
    "TAS+KD within 0.5 points of the teacher at <= the budget's FLOPs (stated for fmnist-r56)",
    "TAS+KD above uniform+KD at the same FLOPs by more than the combined seed std",
    "TAS+KD above random+KD at the same FLOPs by more than the combined seed std",
    "TAS+KD above L1+KD at the same FLOPs by more than the combined seed std",
    "TAS+KD at least as good as TAS with cross-entropy only",
    "TAS+KD latency ratio within 1.15x of its FLOPs ratio at batch 64 on CPU (eager)",
)
TOP1_MARGIN = 0.5  # points of top-1 the TAS student may lose against the teacher
LATENCY_SLACK = 1.15  # allowed (latency ratio) / (FLOPs ratio) at the largest batch
# --quick: a smoke run of the protocol's code paths, minutes on a CPU (its results mean nothing).
QUICK_OVERRIDES: dict[str, Any] = {
    "data": {"train_subset": 600, "test_subset": 300},
    "teacher": {"train": {"epochs": 1, "eval_every": 1}},
    "search": {"epochs": 1, "valid_batches": 2},
    "distill": {"train": {"epochs": 1, "eval_every": 1}},
}


# --------------------------------------------------------------------------- protocol


class Protocol(BaseModel):
    """One benchmark protocol (validated; unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")  # names the output files
    description: str = ""
    recipe: str | dict[str, Any]  # path to a recipe YAML (e.g. configs/x.yaml) or inline
    overrides: dict[str, Any] = {}  # deep-merged into the recipe
    methods: list[Method] = Field(min_length=1)
    seeds: list[int] = Field(min_length=2)  # >= 2: the std over seeds is reported
    latency_batches: list[int] = Field(default=[1, 64], min_length=1)
    latency_repeats: int = Field(default=20, ge=1)  # timed calls per network, batch and round
    latency_rounds: int = Field(default=3, ge=1)  # interleaved rounds; the median is kept
    latency_threads: int | None = Field(default=None, ge=1)  # None: torch's default
    estimate: str = ""  # the author's wall-time estimate, copied into the results

    def latency(self, runtime: Runtime, batch: int) -> LatencySettings:
        """How the runner times each network at ``batch`` in ``runtime``: the protocol's
        repeats and threads, after 3 warm-up calls (fewer when repeats are fewer)."""
        return LatencySettings(
            runtime, batch, self.latency_threads, self.latency_repeats, min(3, self.latency_repeats)
        )

    @field_validator("methods")
    @classmethod
    def _unique_methods(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("methods must not repeat")
        return v

    @field_validator("seeds")
    @classmethod
    def _good_seeds(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v) or any(s < 0 for s in v):
            raise ValueError("seeds must be distinct non-negative integers")
        return v

    @field_validator("latency_batches")
    @classmethod
    def _good_batches(cls, v: list[int]) -> list[int]:
        if any(b < 1 for b in v) or len(set(v)) != len(v):
            raise ValueError("latency batches must be distinct positive integers")
        return sorted(v)


def _find_recipe(ref: str, protocol_file: Path | None) -> Path:
    """A recipe path as given, else relative to the protocol file's folder or its ancestors."""
    p = Path(ref).expanduser()
    if p.is_absolute() or p.is_file() or protocol_file is None:
        return p
    for base in [protocol_file.parent, *protocol_file.resolve().parents]:
        if (base / ref).is_file():
            return base / ref
    return p


def load_protocol(
    path: str | Path, *, seeds: int | None = None, quick: bool = False
) -> tuple[Protocol, Recipe]:
    """The validated protocol and its resolved recipe.

    ``seeds`` keeps the first N seeds of the protocol (extended by the next integers when N is
    larger); ``quick`` shrinks data and epochs for a smoke run and appends ``-quick`` to the name
    (so a quick run never overwrites a real one).
    """
    file = Path(path)
    if not file.is_file():
        raise ConfigError(
            f"protocol {file} does not exist. Fix: pass a protocol YAML, e.g. "
            "bench/protocols/fmnist-r20.yaml"
        )
    proto: Protocol = validate_model(Protocol, read_yaml(file), str(file))
    if isinstance(proto.recipe, str):
        base = read_yaml(_find_recipe(proto.recipe, file))
    else:
        base = dict(proto.recipe)
    data = deep_merge(base, proto.overrides)
    update: dict[str, Any] = {}
    if quick:
        data = deep_merge(data, QUICK_OVERRIDES)
        update.update(
            name=f"{proto.name}-quick",
            latency_repeats=min(proto.latency_repeats, 3),
            latency_rounds=1,
        )
    if seeds is not None:
        if seeds < 2:
            raise ConfigError(f"--seeds {seeds}: at least 2 seeds are needed for a std. Fix: 2+")
        chosen = list(proto.seeds[:seeds])
        nxt = max(proto.seeds) + 1
        while len(chosen) < seeds:
            chosen.append(nxt)
            nxt += 1
        update["seeds"] = chosen
    proto = proto.model_copy(update=update)
    return proto, load_recipe(None, data)
