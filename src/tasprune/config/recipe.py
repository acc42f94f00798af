"""Recipes: one validated YAML file describes a whole run (teacher -> search -> distill).

Loading goes YAML -> dict -> dotted ``key=value`` overrides -> pydantic validation, and every
problem (bad YAML, unknown key, wrong type, out-of-range value) becomes one `ConfigError` line
that names the field and the fix. The resolved recipe is written into the run folder.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tasprune.config.search import SearchConfig
from tasprune.config.train import TrainConfig
from tasprune.data import Augment
from tasprune.errors import ConfigError


class DataConfig(BaseModel):
    """Which dataset, where, and optional stratified subsets for quick runs."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        default="fashion-mnist",
        description="fashion-mnist | cifar10 | cifar100 | imagefolder | imagenet",
    )
    root: str | None = Field(
        default=None,
        description="folder holding the dataset files (unset: the dataset's usual places)",
    )
    image_size: int | None = Field(default=None, ge=8)  # imagefolder/imagenet: resize to this
    workers: int = Field(default=8, ge=0)  # imagenet: DataLoader worker processes
    train_subset: int | None = Field(
        default=None, ge=10, description="a stratified subset of N training images (unset: all)"
    )
    test_subset: int | None = Field(
        default=None, ge=10, description="a stratified subset of N test images (unset: all)"
    )
    # Training augmentation of every stage (teacher, search, student); unset fields fit the
    # data: Fashion-MNIST padding 2 / CIFAR 4 / else 1/8 of the image side, flip only for
    # mirror-invariant datasets. (ImageNet streams use RandomResizedCrop + flip instead.)
    augment: Augment = Augment()

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in ("crop_padding", "flip"):
                if key in data:
                    raise ValueError(
                        f"data.{key} is now data.augment.{key}. Fix: write 'augment: "
                        f"{{{key}: {data[key]}}}' under data (or --set data.augment.{key}=...)"
                    )
        return data


class TeacherConfig(BaseModel):
    """The unpruned network: trained here, or an existing checkpoint."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str | None = None  # run folder or model.pt of a trained unpruned network
    # e.g. an ImageNet checkpoint, .pth or .safetensors; fine-tuned for teacher.train.epochs.
    weights: str | None = Field(
        default=None,
        description="state dict of the torchvision:/timm: model's original architecture to "
        "start from (adapted to the data's channels and classes, then fine-tuned)",
    )
    train: TrainConfig = TrainConfig(epochs=30)
    # Reorder the teacher's coupled channels by importance (most important first) before the
    # warm-started search and the student's initialisation, so kept prefixes are the important
    # channels (tasprune.importance; the same function). bn (|gamma| of the BN after each
    # producer) measured best end to end: demo recipe, 3 seeds, students 88.58 +- 0.09% vs
    # 88.41 +- 0.05 (none), 88.53 +- 0.22 (l1), 88.35 +- 0.06 (taylor); bench/results/order.md.
    # Groups without a BN are left as trained. none: as trained.
    order: Literal["none", "l1", "bn", "taylor"] = "bn"


class DistillConfig(BaseModel):
    """Training of the pruned network, with knowledge distillation from the teacher."""

    model_config = ConfigDict(extra="forbid")

    kd: bool = True  # distil from the teacher (False: plain cross-entropy)
    alpha: float = Field(default=0.9, ge=0, le=1)  # weight of the KD term
    temperature: float = Field(default=4.0, gt=0)  # softmax temperature T
    # KD weight ramp: alpha rises linearly (per step) from 0 to `alpha` over the first N epochs
    # (0 = constant alpha), so the freshly cut student first repairs itself on the labels.
    # Default 3: measured best (converged teacher, 10-epoch students: KD a0.9 T4 88.84% with a
    # constant weight, 90.92 +- 0.17% ramped, CE 89.69 +- 0.21%; bench/results/kd-study.md).
    alpha_ramp_epochs: float = Field(default=3.0, ge=0)
    # Recompute the student's BN running statistics on this many training batches after its
    # initialisation (0 = keep the copied ones). Only evaluation uses running statistics, so
    # this changes the untrained student's test accuracy, not the trained one.
    recalibrate_bn: int = Field(default=0, ge=0)
    # Feature-map loss on the stage outputs: "at" = attention transfer (Zagoruyko & Komodakis
    # 2017), + feature_weight / 2 * sum over stages of mean((q_s - q_t)^2), q = normalised
    # channel mean of squared activations; independent of the student's channel counts.
    feature_loss: Literal["none", "at"] = "none"
    feature_weight: float = Field(default=1000.0, ge=0)  # beta of attention transfer
    # teacher: measured best of the three on the demo recipe (bench/results/choices.md);
    # scratch is the reference's.
    init: Literal["scratch", "supernet", "teacher"] = Field(
        default="teacher",
        description="student initialisation: the teacher's leading channels, the searched "
        "supernet's, or random",
    )
    train: TrainConfig = TrainConfig(epochs=30)

    @property
    def needs_teacher(self) -> bool:
        """Whether these settings read the teacher (KD, its weights, its feature maps)."""
        return self.kd or self.init == "teacher" or self.feature_loss != "none"


class ReportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    latency_batches: tuple[int, ...] = (1, 64)  # CPU latency is measured at these batch sizes
    latency_repeats: int = Field(default=20, ge=1)  # timed runs per measurement (median kept)
    # int8 rows: both networks quantised as `tasprune export --int8` does, scored on 1,000 test
    # images and timed in ONNX Runtime (a few seconds per network on a small one).
    int8: bool = True


class Recipe(BaseModel):
    """A whole TAS run."""

    model_config = ConfigDict(extra="forbid")

    name: str = "run"
    model: str = Field(
        default="cifar_resnet20",
        description="registered model, or torchvision:NAME / timm:NAME (any CNN of those "
        "libraries)",
    )
    device: str = Field(default="auto", description="auto | cpu | cuda | cuda:N")
    seed: int = Field(default=0, ge=0, description="random seed of every stage")
    deterministic: bool = Field(
        default=False,
        description="deterministic kernels and seeding in every stage (same seed + same "
        "machine = bit-identical results, also across a kill and resume)",
    )
    # jsonl: history.jsonl per stage (always written); tensorboard: also TensorBoard scalars in
    # each stage folder's tensorboard/ (the `tensorboard` extra).
    log: Literal["jsonl", "tensorboard"] = Field(
        default="jsonl",
        description="tensorboard: also write every epoch's metrics for `tensorboard --logdir OUT`",
    )
    data: DataConfig = DataConfig()
    teacher: TeacherConfig = TeacherConfig()
    search: SearchConfig = SearchConfig()
    distill: DistillConfig = DistillConfig()
    report: ReportConfig = ReportConfig()

    @model_validator(mode="after")
    def _seed_the_stages(self) -> Recipe:
        """Every stage config seeded from the recipe: a stage seed left at 0 becomes ``seed``
        (a non-zero stage seed wins) and ``deterministic`` switches every stage's on.

        Keyed on the value, not on "was it set", so a dumped recipe.yaml (every field
        written out, already resolved) reproduces the run it came from."""

        def seeded(cfg: Any) -> Any:
            update: dict[str, Any] = {
                "deterministic": bool(cfg.deterministic or self.deterministic)
            }
            if cfg.seed == 0:
                update["seed"] = self.seed
            return cfg.model_copy(update=update)

        self.teacher = self.teacher.model_copy(update={"train": seeded(self.teacher.train)})
        self.search = seeded(self.search)
        self.distill = self.distill.model_copy(update={"train": seeded(self.distill.train)})
        return self


def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    kind = first["type"]
    if kind == "extra_forbidden":
        return f"{source}: unknown key '{where}'. Fix: remove it or check its spelling"
    given = first.get("input")
    msg = first["msg"]
    if kind == "value_error" and "Fix:" in msg:  # our own validators: already problem + fix
        return f"{source}: {msg.removeprefix('Value error, ')}"
    return f"{source}: '{where}' = {given!r} is invalid ({msg}). Fix: correct that value"


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["search.epochs=5", "model=cifar_resnet56"]`` -> nested dict (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' has no '='. Fix: write KEY=VALUE, e.g. seed=1")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with another override")
        node[parts[-1]] = value
    return out


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


RECIPE_DIR = Path(__file__).resolve().parents[1] / "recipes"  # the shipped recipes (package data)


def recipe_names() -> list[str]:
    """Names of the shipped recipes (``tasprune run NAME``)."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def recipe_file(ref: str | Path) -> Path:
    """The YAML file of ``ref``: a file path as given, else the shipped recipe of that name."""
    path = Path(ref).expanduser()
    if path.is_file():
        return path
    names = recipe_names()
    text = str(ref)
    is_name = path.suffix not in (".yaml", ".yml") and "/" not in text and os.sep not in text
    if is_name and text in names:
        return RECIPE_DIR / f"{text}.yaml"
    known = f"the shipped recipes are {', '.join(names)}"
    if is_name:
        raise ConfigError(f"unknown recipe '{text}'; {known}. Fix: use one of them or a YAML path")
    raise ConfigError(f"recipe {path} does not exist; {known}. Fix: pass a YAML file or a name")


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"recipe {p} does not exist. Fix: pass a YAML file (see configs/)")
    try:
        data = yaml.safe_load(p.read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read recipe {p}: {err}. Fix: check the file") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"recipe {p} is not valid YAML{where}. Fix: correct its syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"recipe {p} must be a mapping of keys. Fix: write 'key: value' lines (see a shipped one, e.g. fmnist-r20-quick)"
        )
    return data


def load_recipe(
    path: str | Path | None = None, overrides: Iterable[str] | dict[str, Any] = ()
) -> Recipe:
    """Recipe from a shipped recipe's name or a YAML file (optional) plus overrides, validated."""
    data = read_yaml(recipe_file(path)) if path is not None else {}
    extra = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
    data = deep_merge(data, extra)
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(err, str(path) if path else "config")) from None


def validate_model(cls: type[BaseModel], data: dict[str, Any], source: str) -> Any:
    """Validate ``data`` as ``cls``, turning pydantic errors into one ConfigError line."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def recipe_diff(
    old: dict[str, Any], new: dict[str, Any], ignore: Iterable[str] = ("device",)
) -> list[str]:
    """Dotted keys whose values differ between two dumped recipes (``ignore``: keys that may
    change, e.g. where it runs). A key only one side has (a field added to or removed from the
    schema since the run started) counts only when it is not at its default, so upgrading
    tasprune does not lock users out of resuming their runs."""
    a, b = _flat(old), _flat(new)
    defaults = _flat(Recipe().model_dump(mode="json"))
    skip = set(ignore)
    out = []
    for k in set(a) | set(b):
        if k in skip or a.get(k) == b.get(k):
            continue
        if (k in a) != (k in b) and (a.get(k, b.get(k)) == defaults.get(k) or k not in defaults):
            continue
        out.append(k)
    return sorted(out)


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
