"""The stages of a TAS run, written once: teacher, search, student.

Each stage is a function of a `StageContext` (the resolved recipe, its data and this process's
device) and the folder it writes. ``tasprune run`` (`tasprune.pipeline`), the per-stage
commands (``tasprune train/search/distill``), the library API (`tasprune.api`, whose context is
its caller's settings and in-memory data) and the benchmark runner (`tasprune.bench`) all call
these; what differs between them is only where the inputs come from (a run folder, a
``--teacher`` path, a module instance, a protocol's seed) and where the outputs go (a folder, or
none). The report and the export stages are `tasprune.report.write_report` and
`tasprune.export.export_model`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tasprune import distributed as ddp
from tasprune.checkpoint import load_model_checkpoint, resolve_model_file, save_checkpoint
from tasprune.config import DistillConfig, Recipe
from tasprune.data import Augment, train_test_loaders
from tasprune.distill import distill, model_meta
from tasprune.engine import fit
from tasprune.epoch import evaluate
from tasprune.errors import CheckpointError
from tasprune.imagefolder import StreamingFolder
from tasprune.models import create_model, get_model_spec
from tasprune.search import SearchConfig, SearchResult
from tasprune.search import search as run_search
from tasprune.shape import Shape
from tasprune.utils import JsonlLogger, atomic_write_text
from tasprune.weights import load_weights, portable_state

logger = logging.getLogger(__name__)

__all__ = [
    "StageContext",
    "check_model_fits_data",
    "checked_teacher",
    "drop_unsaved_search_rows",
    "finished_teacher",
    "import_teacher",
    "search_shape",
    "teacher_stage",
    "train_student",
    "train_teacher",
]


@dataclass
class StageContext:
    """What every stage reads: the resolved recipe, its (train, test) data, this process's
    device (under torchrun: this rank's) and whether to draw progress bars."""

    recipe: Recipe
    data: tuple[Any, Any]
    device: torch.device
    progress: bool = True
    # What every stage adds to the meta of the model.pt it writes. None: the recipe itself (a
    # run's stages, so that the run can be reproduced); the API, whose recipe only carries
    # the settings of one call, passes its caller's meta instead.
    meta: dict[str, Any] | None = None

    @property
    def tensorboard(self) -> bool:
        return self.recipe.log == "tensorboard"

    @property
    def augment(self) -> Augment | None:
        """The training augmentation resolved for the data (None for streamed data, which
        uses RandomResizedCrop + flip)."""
        train = self.data[0]
        if isinstance(train, StreamingFolder):
            return None
        return self.recipe.data.augment.resolve(train.name, train.image_size)

    @property
    def input_size(self) -> tuple[int, int, int]:
        """(channels, height, width) of the training images."""
        train = self.data[0]
        return (train.in_channels, *train.image_size)

    def stored_meta(self) -> dict[str, Any]:
        """What the stages add to every model.pt's meta (see ``meta``)."""
        if self.meta is not None:
            return dict(self.meta)
        return {"recipe": self.recipe.model_dump(mode="json")}

    def ordered(self, teacher: nn.Module) -> nn.Module:
        """The teacher as the search and the student see it: its coupled channels sorted by
        ``teacher.order`` (the same function; unchanged for ``none``)."""
        order = self.recipe.teacher.order
        if order == "none":
            return teacher
        from tasprune.importance import order_channels

        batches = None
        if order == "taylor":  # un-augmented training batches, on the CPU where ordering runs
            plain = {"crop_padding": 0, "flip": False}
            loader, _ = train_test_loaders(*self.data, 64, augment=plain, device="cpu")
            batches = iter(loader)
        return order_channels(teacher, order, self.input_size, batches=batches)


# --------------------------------------------------------------------------- checks


def check_model_fits_data(
    meta: dict[str, Any], path: Path, data: Any, model: str | None = None
) -> None:
    """Refuse a stored network whose model, classes or input channels do not fit ``data``."""
    problems = []
    if model is not None and meta.get("model") != model:
        problems.append(f"model {meta.get('model')!r} (recipe: {model!r})")
    if int(meta.get("num_classes", -1)) != data.num_classes:
        problems.append(f"{meta.get('num_classes')} classes (data: {data.num_classes})")
    if int(meta.get("in_channels", -1)) != data.in_channels:
        problems.append(f"{meta.get('in_channels')} input channels (data: {data.in_channels})")
    if problems:
        raise CheckpointError(
            f"teacher checkpoint {path} does not fit this recipe: {'; '.join(problems)}. "
            f"Fix: use a network trained for this model and dataset ({data.name})"
        )


def checked_teacher(
    ctx: StageContext, source: str | Path
) -> tuple[Path, nn.Module, dict[str, Any]]:
    """(file, network, meta) of a teacher checkpoint, refused unless it is the recipe's
    unpruned model trained for this data."""
    r = ctx.recipe
    path = resolve_model_file(source, prefer=("teacher",))
    model, meta = load_model_checkpoint(path)
    check_model_fits_data(meta, path, ctx.data[0], r.model)
    if Shape.from_dict(meta["shape"]) != get_model_spec(r.model).full_shape():
        raise CheckpointError(
            f"teacher checkpoint {path} is a pruned {r.model}. "
            "Fix: the teacher must be the unpruned network (a run's teacher/model.pt)"
        )
    return path, model, meta


# --------------------------------------------------------------------------- teacher


def train_teacher(
    ctx: StageContext,
    out: Path | None,
    *,
    shape: Shape | None = None,
    start: dict[str, Tensor] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train the recipe's model with cross-entropy (settings: ``teacher.train``) into ``out``
    (None: nothing written); returns (model, fit's metrics). Resumes there; under torchrun
    every rank trains its shard.

    Unpruned by default, else at ``shape`` (then stored as a student). It starts from
    ``start`` (an unpruned network's state, cut to the shape) when given, else from
    ``teacher.weights`` or a fresh initialisation."""
    r, cfg = ctx.recipe, ctx.recipe.teacher.train
    train = ctx.data[0]
    full = get_model_spec(r.model).full_shape()
    shape = shape or full
    torch.manual_seed(cfg.seed)
    model = _initial_network(r, train, shape, start)
    role = "teacher" if shape == full else "student"
    meta = {**model_meta(r.model, shape, train, role, augment=ctx.augment), **ctx.stored_meta()}
    metrics = fit(
        model,
        *train_test_loaders(
            *ctx.data, cfg.batch_size, augment=ctx.augment, device=ctx.device, seed=cfg.seed
        ),
        cfg,
        out,
        device=ctx.device,
        meta=meta,
        progress=ctx.progress,
        tensorboard=ctx.tensorboard,
    )
    return model, metrics


def _initial_network(
    r: Recipe, train: Any, shape: Shape, start: dict[str, Tensor] | None
) -> nn.Module:
    """The network `train_teacher` starts from: ``r.model`` at ``shape``, with ``start`` (an
    unpruned state) or ``teacher.weights`` (adapted to the data) cut to it, else fresh."""
    nc, ic = train.num_classes, train.in_channels
    if start is None and r.teacher.weights is not None:
        from tasprune.models.traced import from_weights

        adapted = from_weights(r.model, r.teacher.weights, nc, ic)
        if shape == get_model_spec(r.model).full_shape():
            return adapted
        start = adapted.state_dict()
    net = create_model(r.model, shape, num_classes=nc, in_channels=ic)
    if start is not None:
        from tasprune.models.traced import pruned_state

        load_weights(net, pruned_state(r.model, start, shape, nc, ic))
    return net


def teacher_stage(ctx: StageContext, out: Path) -> tuple[nn.Module, dict[str, Any]]:
    """The recipe's teacher into ``out``: ``teacher.checkpoint`` imported, else trained.
    Returns the teacher as the search and the student see it (`StageContext.ordered`) and
    its metrics."""
    source = ctx.recipe.teacher.checkpoint
    model, metrics = import_teacher(ctx, source, out) if source else train_teacher(ctx, out)
    return ctx.ordered(model), metrics


def finished_teacher(ctx: StageContext, out: Path) -> nn.Module:
    """The teacher a finished teacher stage left in ``out``, as `teacher_stage` returns it."""
    model, _ = load_model_checkpoint(out / "model.pt")
    return ctx.ordered(model)


def import_teacher(
    ctx: StageContext, source: str | Path, out: Path
) -> tuple[nn.Module, dict[str, Any]]:
    """Use a trained unpruned network as the teacher: check it fits, store it in ``out``,
    evaluate it on the test split; returns (model, metrics)."""
    path, model, meta = checked_teacher(ctx, source)
    # Re-saved from what was loaded (verified, weights-only), not copied byte for byte: a
    # corrupted source whose .prev.pt was used instead must not be carried over.
    state = portable_state(model)
    save_checkpoint(out / "model.pt", {"model": state, "meta": meta})
    model.to(ctx.device)
    batch = ctx.recipe.teacher.train.batch_size
    _, test_loader = train_test_loaders(*ctx.data, batch, augment=ctx.augment, device=ctx.device)
    metrics: dict[str, Any] = {**evaluate(model, test_loader, ctx.device), "epochs": 0}
    final = {"metrics": metrics, "epochs": 0, "source": str(path.resolve()), "meta": meta}
    atomic_write_text(out / "final.json", json.dumps(final, indent=2) + "\n")
    logger.info("teacher imported from %s: test top1 %.2f%%", path, metrics["top1"])
    return model, metrics


# --------------------------------------------------------------------------- search


def drop_unsaved_search_rows(folder: Path) -> None:
    """Empty ``folder/history.jsonl`` when no search checkpoint covers its rows.

    A search killed before its first checkpoint leaves rows the rerun would log again."""
    from tasprune.checkpoint import checkpoint_exists

    history = folder / "history.jsonl"
    if history.is_file() and not checkpoint_exists(folder / "checkpoint.pt"):
        JsonlLogger(history).truncate_after(-1)


def search_shape(
    ctx: StageContext,
    out: Path | None,
    teacher: nn.Module | dict[str, Tensor] | None = None,
    cfg: SearchConfig | None = None,
) -> SearchResult:
    """Search a shape under the recipe's budget into ``out`` (None: nothing written; ``cfg``
    replaces the recipe's ``search`` settings, e.g. another seed); warm-started from
    ``teacher`` (a network or its state dict) when given and ``warm_start`` is on. Resumes
    there; under torchrun every rank searches its shard."""
    r = ctx.recipe
    cfg = cfg if cfg is not None else r.search
    state: dict[str, Tensor] | None = None
    if teacher is not None and cfg.warm_start:
        state = teacher.state_dict() if isinstance(teacher, nn.Module) else teacher
    if out is not None and ddp.is_main():
        drop_unsaved_search_rows(out)
    return run_search(
        r.model,
        ctx.data[0],
        cfg,
        out,
        teacher_state=state,
        device=ctx.device,
        progress=ctx.progress,
        augment=r.data.augment,
        tensorboard=ctx.tensorboard,
    )


# --------------------------------------------------------------------------- student


def train_student(
    ctx: StageContext,
    out: Path | None,
    shape: Shape,
    teacher: nn.Module | None,
    *,
    cfg: DistillConfig | None = None,
    supernet_state: dict[str, Tensor] | None = None,
    init_state: dict[str, Tensor] | None = None,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train the pruned network of ``shape`` into ``out`` (None: nothing written) with the
    recipe's ``distill`` settings (``cfg`` replaces them, e.g. another seed or no KD);
    ``supernet_state`` for ``init: supernet``; ``init_state``, the student's own weights at
    ``shape`` (e.g. an L1-pruned teacher), replaces ``init``. Returns fit's metrics plus the
    student's FLOPs and params."""
    r = ctx.recipe
    cfg = cfg if cfg is not None else r.distill
    train, test = ctx.data
    return distill(
        r.model,
        shape,
        teacher if cfg.needs_teacher else None,
        train,
        test,
        cfg,
        out,
        supernet_state=supernet_state,
        init_state=init_state,
        space=r.search.space(),
        device=ctx.device,
        meta={**ctx.stored_meta(), **(meta or {})},
        progress=ctx.progress,
        augment=r.data.augment,
        tensorboard=ctx.tensorboard,
    )
