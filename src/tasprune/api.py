"""The library API in five calls: ``train``, ``search``, ``distill``, ``run``, ``load``.

Data arguments take an :class:`~tasprune.data.ArrayDataset` or any small map-style
``torch.utils.data.Dataset`` yielding ``(image CxHxW, int label)``; the latter is materialised
in memory by :func:`as_array_dataset` (float images must lie in [0, 1]; they are stored as
uint8 = round(255 x), and the per-channel mean/std are computed from them).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sized
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import torch
from torch import nn
from torch.utils.data import Dataset

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack is Python 3.11+

from tasprune.checkpoint import load_checkpoint, load_model_checkpoint, resolve_model_file
from tasprune.config import (
    DataConfig,
    DistillConfig,
    Recipe,
    SearchConfig,
    TeacherConfig,
    TrainConfig,
    as_config,
    deep_merge,
    load_recipe,
    validate_model,
)
from tasprune.contract import WithPreprocess, contract_from_meta
from tasprune.data import ArrayDataset, Augment, as_augment
from tasprune.errors import ConfigError, DataError
from tasprune.models import create_model, get_model_spec
from tasprune.models.legacy import upgrade_shape
from tasprune.models.traced import register_module, source_name
from tasprune.pipeline import run as _run
from tasprune.search import SearchResult
from tasprune.shape import Shape
from tasprune.stages import StageContext, search_shape, train_student, train_teacher
from tasprune.utils import pick_device
from tasprune.weights import load_weights

logger = logging.getLogger(__name__)

__all__ = ["as_array_dataset", "distill", "load", "run", "search", "train"]

DataLike = ArrayDataset | Dataset[Any]
# A model name (registered, torchvision:NAME, timm:NAME, py:module:factory), a factory (a
# module-level function returning the network, called with num_classes= and in_channels=),
# or the network itself: an nn.Module instance, with its weights (classes and channels its own).
ModelLike = str | Callable[..., nn.Module] | nn.Module


def _model_name(model: ModelLike, image: tuple[int, int, int] | None) -> str:
    """The name the rest of tasprune knows ``model`` by; an instance is registered as a model
    source, analysed on one zero image of size ``image`` (C, H, W)."""
    if isinstance(model, WithPreprocess):
        model = model.net
    if isinstance(model, nn.Module):
        if image is None:
            raise ConfigError(
                "a module instance needs an input size here. Fix: pass the data, or a model name"
            )
        return register_module(model, torch.zeros(1, *image))
    return source_name(model)


def _image_of(ds: ArrayDataset) -> tuple[int, int, int]:
    return (ds.in_channels, *ds.image_size)


class CallOptions(TypedDict, total=False):
    """How a call of :func:`search` runs (keyword arguments, each optional; default last)."""

    device: str | torch.device  # auto (CUDA, then Apple MPS, then the CPU), cpu, cuda:N; auto
    progress: bool  # progress bars; True
    # Training augmentation (crop_padding, flip): None fits the data (see
    # :class:`~tasprune.data.Augment`: padding 1/8 of the image side, no flip for data not
    # known to be mirror-invariant); None
    augment: Augment | dict[str, Any] | None
    tensorboard: bool  # also write TensorBoard scalars to out_dir/tensorboard; False


class FitOptions(CallOptions, total=False):
    """How a call of :func:`train` or :func:`distill` runs: :class:`CallOptions` and ``meta``."""

    meta: dict[str, Any] | None  # extra entries of the model.pt meta; None


def _context(
    call: str,
    model: str,
    data: tuple[ArrayDataset, ArrayDataset | None],
    options: Mapping[str, Any],
    allowed: type[CallOptions],
    **stage: Any,
) -> StageContext:
    """The `tasprune.stages` context of one call of ``call``: a recipe of its settings
    (``stage``: its ``teacher``, ``search`` or ``distill`` config, ``options``) on its
    in-memory data. The model.pt meta gets the caller's ``meta``, not that recipe, which is no
    run to reproduce."""
    unknown = sorted(set(options) - set(allowed.__annotations__))
    if unknown:
        raise TypeError(f"{call}() got an unexpected keyword argument {unknown[0]!r}")
    device = options.get("device", "auto")
    recipe = Recipe(
        model=model,
        log="tensorboard" if options.get("tensorboard", False) else "jsonl",
        data=DataConfig(name=data[0].name, augment=as_augment(options.get("augment"))),
        **stage,
    )
    dev = pick_device(device) if isinstance(device, str) else torch.device(device)
    meta = dict(options.get("meta") or {})
    return StageContext(recipe, data, dev, options.get("progress", True), meta=meta)


def _out(out_dir: str | Path | None) -> Path | None:
    return Path(out_dir) if out_dir is not None else None


def as_array_dataset(
    data: DataLike, name: str = "custom", num_classes: int | None = None
) -> ArrayDataset:
    """An in-memory :class:`ArrayDataset` from ``data`` (returned as is when it already is one).

    Images may be uint8 (0-255) or float in [0, 1] (stored as ``round(255 x)``); labels are
    ints. ``num_classes`` defaults to the largest label + 1.
    """
    if isinstance(data, ArrayDataset):
        return data
    if not isinstance(data, Sized) or len(data) == 0:
        raise DataError(f"dataset {name!r} is empty or has no len(). Fix: pass a sized Dataset")
    images: list[torch.Tensor] = []
    labels: list[int] = []
    for i in range(len(data)):
        x, y = data[i]
        x = torch.as_tensor(x)
        if x.dim() == 2:
            x = x.unsqueeze(0)
        if x.dim() != 3:
            raise DataError(
                f"dataset {name!r} item {i}: image shape {tuple(x.shape)} is not C x H x W. "
                "Fix: yield (C x H x W tensor, int label)"
            )
        if x.dtype != torch.uint8:
            x = x.float()
            lo, hi = float(x.min()), float(x.max())
            if lo < 0 or hi > 1:
                raise DataError(
                    f"dataset {name!r} item {i}: float pixels in [{lo:.3g}, {hi:.3g}], not "
                    "[0, 1]. Fix: yield unnormalised images (e.g. transforms.ToTensor() only)"
                )
            x = (x * 255).round().to(torch.uint8)
        images.append(x)
        labels.append(int(y))
    try:
        stacked = torch.stack(images)
    except RuntimeError:
        raise DataError(
            f"dataset {name!r}: images have different sizes. Fix: resize them to one size"
        ) from None
    scaled = stacked.float().div_(255)
    mean = tuple(float(v) for v in scaled.mean(dim=(0, 2, 3)))
    std = tuple(max(float(v), 1e-6) for v in scaled.std(dim=(0, 2, 3)))
    classes = num_classes if num_classes is not None else max(labels) + 1
    if min(labels) < 0 or max(labels) >= classes:
        raise DataError(f"dataset {name!r}: labels outside 0..{classes - 1}. Fix: remap them")
    return ArrayDataset(
        images=stacked,
        labels=torch.tensor(labels, dtype=torch.int64),
        num_classes=classes,
        mean=mean,
        std=std,
        name=name,
    )


def _train_test(train_data: DataLike, test_data: DataLike) -> tuple[ArrayDataset, ArrayDataset]:
    """Both splits in memory, the test split normalised with the training split's mean/std
    (the statistics the model's input contract records)."""
    train_ds = as_array_dataset(train_data, "train")
    test_ds = as_array_dataset(test_data, train_ds.name, train_ds.num_classes)
    if (test_ds.mean, test_ds.std) != (train_ds.mean, train_ds.std):
        test_ds = dataclasses.replace(test_ds, mean=train_ds.mean, std=train_ds.std)
    return train_ds, test_ds


def train(
    model: ModelLike,
    train_data: DataLike,
    test_data: DataLike,
    cfg: TrainConfig | dict[str, Any],
    out_dir: str | Path | None,
    *,
    shape: Shape | None = None,
    **options: Unpack[FitOptions],
) -> dict[str, Any]:
    """Train the registered ``model`` (unpruned, or at ``shape``) with cross-entropy.

    ``options``: device, progress, augment, meta, tensorboard (see :class:`FitOptions`).
    Writes (and resumes from) ``out_dir``: model.pt with the meta :func:`load` needs (the
    input contract included), final.json, history.jsonl. Returns the final test metrics.
    """
    tcfg = as_config(TrainConfig, cfg, "train")
    train_ds, test_ds = _train_test(train_data, test_data)
    net = model.net if isinstance(model, WithPreprocess) else model
    start = net.state_dict() if isinstance(net, nn.Module) else None  # its own weights
    name = _model_name(model, _image_of(train_ds))
    teacher = TeacherConfig(train=tcfg)
    ctx = _context("train", name, (train_ds, test_ds), options, FitOptions, teacher=teacher)
    _, metrics = train_teacher(ctx, _out(out_dir), shape=shape, start=start)
    return metrics


def search(
    model: ModelLike,
    train_data: DataLike,
    cfg: SearchConfig | dict[str, Any],
    out_dir: str | Path | None,
    *,
    teacher: nn.Module | str | Path | None = None,
    teacher_state: dict[str, torch.Tensor] | None = None,
    **options: Unpack[CallOptions],
) -> SearchResult:
    """Search a shape of the registered ``model`` on ``train_data`` under ``cfg``'s budget.

    ``cfg``: a SearchConfig or a mapping of its fields. The supernet is warm-started from
    ``teacher`` (a module, e.g. from :func:`load`, or a run folder / model.pt) or from a
    ``teacher_state`` dict, when given; ``model`` given as a module instance is its own
    teacher. ``options``: device, progress, augment, tensorboard (see :class:`CallOptions`).
    Writes (and resumes from) ``out_dir``: shape.json, history.jsonl, checkpoints. Returns
    the kept shape with its cost.
    """
    scfg = as_config(SearchConfig, cfg, "search")
    train_ds = as_array_dataset(train_data, "train")
    if isinstance(model, nn.Module) and teacher is None and teacher_state is None:
        teacher = model
    name = _model_name(model, _image_of(train_ds))
    if teacher is not None:
        if isinstance(teacher, WithPreprocess):
            teacher = teacher.net
        if not isinstance(teacher, nn.Module):
            teacher, _ = load_model_checkpoint(resolve_model_file(teacher, prefer=("teacher",)))
        teacher_state = teacher.state_dict()
    ctx = _context("search", name, (train_ds, None), options, CallOptions, search=scfg)
    return search_shape(ctx, _out(out_dir), teacher_state)


def distill(
    shape: Shape | str | Path,
    teacher: nn.Module | str | Path,
    train_data: DataLike,
    test_data: DataLike,
    cfg: DistillConfig | dict[str, Any],
    out_dir: str | Path | None,
    *,
    model: ModelLike | None = None,
    **options: Unpack[FitOptions],
) -> dict[str, Any]:
    """Train the pruned network of ``shape`` with KD from ``teacher``; return its metrics.

    ``shape`` is a Shape or a shape.json (whose ``model`` is used unless ``model`` is given);
    ``teacher`` a module (then ``model`` is required) or a run folder / model.pt; a module
    returned by :func:`load` is unwrapped to its network. ``options`` as in :func:`train`.
    """
    dcfg = as_config(DistillConfig, cfg, "distill")
    train_ds, test_ds = _train_test(train_data, test_data)
    name = _model_name(model, _image_of(train_ds)) if model is not None else None
    if not isinstance(shape, Shape):
        shape, info = Shape.load(shape)
        name = name or info.get("model")
    if isinstance(teacher, WithPreprocess):
        teacher = teacher.net  # distillation feeds normalised batches
    if not isinstance(teacher, nn.Module):
        teacher, tmeta = load_model_checkpoint(resolve_model_file(teacher, prefer=("teacher",)))
        name = name or tmeta.get("model")
    if not name:
        raise ConfigError("distill does not know the model name. Fix: pass model='cifar_resnet20'")
    shape = upgrade_shape(name, shape)
    if dcfg.init == "supernet":
        raise ConfigError(
            "api.distill has no supernet weights. Fix: use init 'teacher' or 'scratch', or "
            "tasprune.run for the whole pipeline"
        )
    data = (train_ds, test_ds)
    ctx = _context("distill", str(name), data, options, FitOptions, distill=dcfg)
    return train_student(ctx, _out(out_dir), shape, teacher)


def run(
    recipe_or_path: Recipe | str | Path,
    out_dir: str | Path,
    *,
    from_stage: str | None = None,
    progress: bool = True,
    **overrides: Any,
) -> dict[str, Any]:
    """Run a whole recipe (a `Recipe`, a shipped recipe's name such as ``"fmnist-r20-quick"``,
    or a YAML file) into ``out_dir`` (see :func:`tasprune.pipeline.run`).

    Keyword overrides use ``__`` for nesting: ``run("r.yaml", "out", search__epochs=2)``.
    """
    nested: dict[str, Any] = {}
    for key, value in overrides.items():
        node = nested
        parts = key.split("__")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    if isinstance(recipe_or_path, Recipe):
        data = deep_merge(recipe_or_path.model_dump(mode="json"), nested)
        recipe = validate_model(Recipe, data, "recipe")
    else:
        recipe = load_recipe(recipe_or_path, nested)
    return _run(recipe, Path(out_dir), from_stage=from_stage, progress=progress)


def prune(
    model: ModelLike,
    shape: Shape | str | Path,
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    state: dict[str, torch.Tensor] | None = None,
    example_inputs: Any = None,
    pruned_state: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """The physically pruned network of ``shape`` (a Shape or a shape.json), for your own
    training loop: with ``state`` (an unpruned network's state_dict) its weights are cut from
    it (the kept channels of every group), else freshly initialised.

    ``model`` may be your network itself (an ``nn.Module`` with its trained weights, called on
    ``example_inputs``: a tensor or a tuple of its forward's arguments): the result is a
    pruned copy, an instance of the same class, with its weights unless ``state`` is given.

    ``pruned_state``: the pruned network's own state_dict (saved after fine-tuning), loaded
    into the result, so a pruned model is saved as shape.json + weights, never pickled, and
    rebuilt from a freshly built original with one call::

        small = tasprune.prune(fresh, "shape.json", example_inputs=x, pruned_state=weights)
    """
    if isinstance(model, nn.Module):
        if example_inputs is None:
            raise ConfigError(
                "prune() of a module instance needs example_inputs. Fix: pass "
                "example_inputs=<a batch your model's forward takes>"
            )
        name = register_module(model, example_inputs)
        state = model.state_dict() if state is None else state
    else:
        name = source_name(model)
    if not isinstance(shape, Shape):
        shape, info = Shape.load(shape)
        if isinstance(model, nn.Module) and info.get("model") not in (None, name):
            raise ConfigError(
                f"the shape was searched for {info.get('model')}, not for this network "
                f"({name}). Fix: apply it to a freshly built original of that network"
            )
    shape = upgrade_shape(name, shape)
    net = create_model(name, shape, num_classes=num_classes, in_channels=in_channels)
    if pruned_state is not None:
        try:
            net.load_state_dict(pruned_state)
        except RuntimeError as err:
            lines = str(err).splitlines()
            detail = (lines[1] if len(lines) > 1 else lines[0]).strip()[:160]
            raise ConfigError(
                f"pruned_state does not fit the network of this shape ({detail}). Fix: pass "
                "the state_dict saved with this shape.json"
            ) from None
    elif state is not None:
        load_weights(net, get_model_spec(name).transfer(state, shape, num_classes, in_channels))
    return net


def load(
    path: str | Path, map_location: str | torch.device = "cpu", *, model: nn.Module | None = None
) -> WithPreprocess:
    """The trained (pruned) network in eval mode, ready for raw inputs.

    ``path``: a run folder (its student/model.pt), a fit folder (model.pt) or a model.pt file.
    The result takes images as the user has them (float in [0, 1] as ``ToTensor`` gives, or
    uint8), normalises them as in training and returns logits; ``.contract`` says what it
    expects, ``.net`` is the bare network (normalised inputs). Loading is weights-only.

    A network pruned from your own module instance is rebuilt from a freshly built original:
    pass it as ``model`` (same class and configuration; its weights are not used).
    """
    file = resolve_model_file(path, prefer=("student",))
    if model is not None:
        meta = load_checkpoint(file).get("meta") or {}
        stored = str(meta.get("model", ""))
        size = meta.get("input_size") or [3, 32, 32]
        name = _model_name(model, (int(size[0]), int(size[1]), int(size[2])))
        if stored != name:
            raise ConfigError(
                f"{file} holds a network pruned from {stored or 'a named model'}, not from "
                f"this module ({name}). Fix: pass a freshly built original of that network"
            )
    net, meta = load_model_checkpoint(file)
    wrapped = WithPreprocess(net, contract_from_meta(meta, str(file)))
    wrapped.to(map_location)
    wrapped.eval()
    return wrapped
