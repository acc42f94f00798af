"""One recipe, one run folder: teacher -> search -> distill -> report, each stage resumable.

Layout of a run folder ``DIR``::

    DIR/recipe.yaml           the resolved recipe (written once; a different one is refused)
    DIR/teacher/              fit outputs of the unpruned network (model.pt, final.json, ...)
    DIR/search/               search outputs (shape.json, supernet.pt, search_done.json, ...)
    DIR/student/              fit outputs of the pruned network
    DIR/report.json, DIR/report.md, DIR/plots/*.png

A stage whose completion marker exists (teacher/final.json, search/search_done.json,
student/final.json, report.json) is skipped; an interrupted stage resumes from its checkpoint.
``from_stage`` moves the outputs of that stage and the later ones to ``DIR/.old-<stage>-<time>``
and reruns them.

Failure behaviour: one process at a time writes a run folder (``DIR/.lock``, see
:mod:`tasprune.lock`); everything that can be checked without training (model name, data files,
a teacher checkpoint that fits the data, a reachable FLOPs budget) is checked before anything is
written; an error inside a stage names the stage; temp files left by a killed writer are removed
when the next run takes the folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from tasprune import distributed as ddp
from tasprune.checkpoint import (
    load_checkpoint,
    load_model_checkpoint,
    resolve_model_file,
    sidecar_path,
)
from tasprune.config import Recipe, dump_recipe, recipe_diff
from tasprune.cost import model_cost
from tasprune.data import ArrayDataset, stratified_split
from tasprune.datasets import load_dataset
from tasprune.errors import CheckpointError, ConfigError, DataError, TaspruneError
from tasprune.imagefolder import StreamingFolder
from tasprune.lock import run_lock
from tasprune.models import get_model_spec
from tasprune.models.traced import from_weights
from tasprune.search.loop import check_budget
from tasprune.shape import Shape
from tasprune.stages import (
    StageContext,
    checked_teacher,
    finished_teacher,
    search_shape,
    teacher_stage,
    train_student,
)
from tasprune.tracking import require_tensorboard
from tasprune.utils import atomic_write_text

logger = logging.getLogger(__name__)

__all__ = [
    "STAGES",
    "load_model_checkpoint",
    "load_run_data",
    "load_supernet_state",
    "resolve_model_file",
    "run",
    "stage_done",
    "summary_table",
]

STAGES: tuple[str, ...] = ("teacher", "search", "distill", "report")
# What each stage writes (relative to the run folder) and the file that says it finished.
_OUTPUTS: dict[str, tuple[str, ...]] = {
    "teacher": ("teacher",),
    "search": ("search",),
    "distill": ("student",),
    "report": ("report.json", "report.md", "plots"),
}
_MARKERS: dict[str, str] = {
    "teacher": "teacher/final.json",
    "search": "search/search_done.json",
    "distill": "student/final.json",
    "report": "report.json",
}
# Recipe keys that may change between a run and its resumption.
_RESUMABLE_KEYS: tuple[str, ...] = ("device", "log")


def stage_done(out_dir: Path, stage: str) -> bool:
    """True when ``stage``'s completion marker exists in the run folder."""
    return (out_dir / _MARKERS[stage]).is_file()


# --------------------------------------------------------------------------- data


RunData = ArrayDataset | StreamingFolder


def _subset(data: RunData, n: int | None, seed: int) -> Any:
    """A class-stratified, seeded subset of about ``n`` images (all when n is None or >= len)."""
    if n is None or n >= len(data):
        return data
    idx, _ = stratified_split(data.labels, n / len(data), seed)
    return data.subset(idx)


def load_run_data(recipe: Recipe) -> tuple[Any, Any]:
    """The recipe's train and test splits, cut to ``train_subset``/``test_subset`` if given.

    In-memory `ArrayDataset`s, except for ``imagenet``: a `StreamingFolder` per split, read by
    a multi-worker DataLoader with the standard ImageNet transforms.
    """
    d = recipe.data
    if d.name.strip().lower() == "imagenet":
        if d.root is None:
            raise DataError("dataset 'imagenet' needs its folder. Fix: set data.root (--data-root)")
        size = d.image_size or 224
        train: RunData = StreamingFolder(d.root, "train", size, d.workers)
        test: RunData = StreamingFolder(d.root, "test", size, d.workers)
    else:
        train = load_dataset(d.name, "train", d.root, image_size=d.image_size)
        test = load_dataset(d.name, "test", d.root, image_size=d.image_size)
    train = _subset(train, d.train_subset, recipe.seed)
    test = _subset(test, d.test_subset, recipe.seed)
    if isinstance(test, ArrayDataset) and (test.mean, test.std) != (train.mean, train.std):
        # Evaluate as the model will be fed: with the training statistics (its contract).
        test = dataclasses.replace(test, mean=train.mean, std=train.std)
    logger.info("data %s: %d train / %d test images", train.name, len(train), len(test))
    return train, test


# --------------------------------------------------------------------------- checkpoints


def load_supernet_state(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise CheckpointError(
            f"{path} is missing. Fix: rerun the search stage (--from-stage search)"
        )
    if sidecar_path(path).is_file():
        payload = load_checkpoint(path)
    else:
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # truncated / unsafe files raise many types
            raise CheckpointError(
                f"cannot load {path} ({type(err).__name__}). Fix: rerun --from-stage search"
            ) from None
    state = payload.get("model") if isinstance(payload, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds no supernet weights. Fix: rerun --from-stage search")
    return state


# --------------------------------------------------------------------------- run folder


def _move_aside(out_dir: Path, stage: str) -> Path | None:
    """Move the outputs of ``stage`` and the later stages into ``.old-<stage>-<time>``."""
    later = STAGES[STAGES.index(stage) :]
    items = [out_dir / rel for s in later for rel in _OUTPUTS[s] if (out_dir / rel).exists()]
    if not items:
        return None
    dest = out_dir / f".old-{stage}-{time.strftime('%Y%m%d-%H%M%S')}"
    n = 1
    while dest.exists():
        dest = dest.with_name(f"{dest.name.split('~')[0]}~{n}")
        n += 1
    dest.mkdir(parents=True)
    for item in items:
        shutil.move(str(item), str(dest / item.name))
    if (out_dir / "recipe.yaml").is_file():
        shutil.copy2(out_dir / "recipe.yaml", dest / "recipe.yaml")
    logger.info("moved old outputs of %s to %s", ", ".join(later), dest)
    return dest


def _check_same_recipe(recipe: Recipe, out_dir: Path, from_stage: str | None) -> None:
    """Refuse (writing nothing) a folder that holds a run of a different recipe."""
    path = out_dir / "recipe.yaml"
    if not path.is_file() or from_stage is not None:
        return
    try:
        old = yaml.safe_load(path.read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        old = {}
    if not isinstance(old, dict):
        old = {}
    # Compare resolved recipes (stage seeds filled in), as this one is; an older or edited
    # file that no longer validates is compared as it reads.
    with contextlib.suppress(ValueError):
        old = Recipe.model_validate(old).model_dump(mode="json")
    diff = recipe_diff(old, json.loads(json.dumps(recipe.model_dump(mode="json"))), _RESUMABLE_KEYS)
    if diff:
        shown = ", ".join(diff[:4]) + (" ..." if len(diff) > 4 else "")
        raise ConfigError(
            f"{out_dir} holds a run of a different recipe (differs in {shown}). "
            "Fix: use another --out, or pass --from-stage STAGE to rerun from that stage"
        )


def _prepare_folder(recipe: Recipe, out_dir: Path, from_stage: str | None) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_same_recipe(recipe, out_dir, from_stage)
    if from_stage is not None:
        if from_stage not in STAGES:
            raise ConfigError(f"unknown stage {from_stage!r}. Fix: use one of {', '.join(STAGES)}")
        _move_aside(out_dir, from_stage)
    atomic_write_text(out_dir / "recipe.yaml", dump_recipe(recipe))


# --------------------------------------------------------------------------- stages


def _read_final(folder: Path) -> dict[str, Any]:
    try:
        final = json.loads((folder / "final.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    metrics = final.get("metrics") if isinstance(final, dict) else None
    return dict(metrics) if isinstance(metrics, dict) else {}


class _Run:
    """Lazily loaded pieces shared by the stages (data, device, teacher)."""

    def __init__(self, recipe: Recipe, out_dir: Path, progress: bool) -> None:
        self.recipe = recipe
        self.out = out_dir
        self.progress = progress

    @cached_property
    def device(self) -> torch.device:
        # Under torchrun: this rank's device (cuda:LOCAL_RANK, or the CPU on gloo).
        return ddp.init_from_env(self.recipe.device).device

    @cached_property
    def data(self) -> tuple[Any, Any]:
        return load_run_data(self.recipe)

    @cached_property
    def ctx(self) -> StageContext:
        return StageContext(self.recipe, self.data, self.device, self.progress)

    @cached_property
    def teacher(self) -> nn.Module:
        """The trained teacher, channels ordered per ``teacher.order`` (the same function)."""
        return finished_teacher(self.ctx, self.out / "teacher")

    def stage_teacher(self) -> dict[str, Any]:
        self.__dict__["teacher"], metrics = teacher_stage(self.ctx, self.out / "teacher")
        return metrics

    def stage_search(self) -> dict[str, Any]:
        teacher = self.teacher if self.recipe.search.warm_start else None
        return search_shape(self.ctx, self.out / "search", teacher).summary()

    def stage_distill(self) -> dict[str, Any]:
        shape, _ = Shape.load(self.out / "search" / "shape.json")
        supernet = None
        if self.recipe.distill.init == "supernet":
            supernet = load_supernet_state(self.out / "search" / "supernet.pt")
        cfg = self.recipe.distill
        teacher = self.teacher if cfg.needs_teacher else None
        return train_student(
            self.ctx, self.out / "student", shape, teacher, supernet_state=supernet
        )

    # ---------------------------------------------------------------- report
    def stage_report(self) -> dict[str, Any] | None:
        from tasprune.report import write_report  # matplotlib: imported only when needed

        rc = self.recipe.report
        out: dict[str, Any] = write_report(
            self.out,
            device="cpu",
            latency_batches=tuple(rc.latency_batches),
            repeats=rc.latency_repeats,
            tensorboard=self.recipe.log == "tensorboard",
            int8=rc.int8,
        )
        return out


def _stored(out_dir: Path, stage: str) -> dict[str, Any] | None:
    """What a finished stage produced, read back from its files."""
    if stage == "teacher":
        return _read_final(out_dir / "teacher")
    if stage == "distill":
        return _read_final(out_dir / "student")
    path = out_dir / ("search/shape.json" if stage == "search" else "report.json")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if stage == "search" and isinstance(data, dict):
        return {k: data.get(k) for k in ("model", "flops", "params", "flops_ratio")}
    return data if isinstance(data, dict) else None


def _preflight(ctx: _Run, from_stage: str | None) -> None:
    """Refuse, before anything is written, what would only fail later in the run.

    Checked: the model name; the data files (when a training stage is left); a given teacher
    checkpoint fits the model and data; the FLOPs budget is reachable in the search space.
    """
    r, out = ctx.recipe, ctx.out
    get_model_spec(r.model)
    _ = ctx.device  # an unknown or unavailable device
    if r.log == "tensorboard":
        require_tensorboard()
    first = STAGES.index(from_stage) if from_stage is not None else len(STAGES)
    pending = {s for i, s in enumerate(STAGES[:3]) if i >= first or not stage_done(out, s)}
    if not pending:
        return
    train, _ = ctx.data
    if "teacher" in pending and r.teacher.checkpoint:
        checked_teacher(ctx.ctx, r.teacher.checkpoint)
    if "teacher" in pending and r.teacher.weights:
        from_weights(r.model, r.teacher.weights, train.num_classes, train.in_channels)
    sizes: list[tuple[str, int, int]] = []  # (batch-size key, images, batch size)
    if "teacher" in pending and not r.teacher.checkpoint:
        sizes.append(("teacher.train.batch_size", len(train), r.teacher.train.batch_size))
    if "search" in pending:
        seed = r.search.seed
        halves = stratified_split(train.labels, 0.5, seed)
        smaller = min(int(h.numel()) for h in halves)
        sizes.append(("search.batch_size", smaller, r.search.batch_size))
    if "distill" in pending:
        sizes.append(("distill.train.batch_size", len(train), r.distill.train.batch_size))
    for key, images, batch in sizes:
        if images < batch:  # training loaders drop the last partial batch: no step at all
            raise DataError(
                f"{key} = {batch} is larger than the {images} training images that stage "
                f"sees{' (each half of the split)' if key.startswith('search') else ''}. "
                f"Fix: lower {key} or raise data.train_subset"
            )
    if "search" in pending:
        check_budget(r.model, r.search, ctx.ctx.input_size, train.num_classes)


def remove_stale_temp_files(out_dir: Path) -> int:
    """Delete ``.NAME.*.tmp`` files a killed writer left in the run folder; return how many.

    Only called while holding the folder's lock, so no live writer owns them.
    """
    removed = 0
    for tmp in out_dir.rglob(".*.tmp"):
        if tmp.is_file() and not any(part.startswith(".old-") for part in tmp.parts):
            try:
                tmp.unlink()
                removed += 1
            except OSError:
                continue
    if removed:
        logger.info("removed %d temp file(s) left by an interrupted run in %s", removed, out_dir)
    return removed


def run(
    recipe: Recipe,
    out_dir: str | Path,
    *,
    from_stage: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run (or resume) every stage of ``recipe`` in ``out_dir``; return each stage's result.

    The result maps ``teacher``/``search``/``distill``/``report`` to that stage's metrics,
    ``status`` to ``{"stage": "ran" | "skipped" | "unavailable"}`` and ``table`` to the
    teacher-vs-pruned summary (also logged). The folder is locked for the whole call
    (:class:`tasprune.errors.RunInUseError` if another process holds it).
    """
    out = Path(out_dir)
    if from_stage is not None and from_stage not in STAGES:
        raise ConfigError(f"unknown stage {from_stage!r}. Fix: use one of {', '.join(STAGES)}")
    ddp.init_from_env(recipe.device)
    ddp.configure_rank_logging()
    # One writer per run folder: under torchrun rank 0 holds the lock for every rank.
    with run_lock(out) if ddp.is_main() else contextlib.nullcontext():
        return _run_locked(recipe, out, from_stage, progress)


def _run_locked(
    recipe: Recipe, out: Path, from_stage: str | None, progress: bool
) -> dict[str, Any]:
    ctx = _Run(recipe, out, progress)
    _check_same_recipe(recipe, out, from_stage)
    _preflight(ctx, from_stage)
    if ddp.is_main():
        remove_stale_temp_files(out)
        _prepare_folder(recipe, out, from_stage)
    ddp.barrier()
    runners: dict[str, Callable[[], dict[str, Any] | None]] = {
        "teacher": ctx.stage_teacher,
        "search": ctx.stage_search,
        "distill": ctx.stage_distill,
        "report": ctx.stage_report,
    }
    result: dict[str, Any] = {"status": {}}
    for stage in STAGES:
        if stage_done(out, stage):
            logger.info("stage %s: already done (%s), skipped", stage, _MARKERS[stage])
            result[stage] = _stored(out, stage)
            result["status"][stage] = "skipped"
            continue
        logger.info("stage %s: starting", stage)
        t0 = time.perf_counter()
        # Stages that only write (report, importing a teacher) run on rank 0; the training
        # stages run on every rank and write from rank 0 themselves.
        rank0_only = stage == "report" or (stage == "teacher" and bool(recipe.teacher.checkpoint))
        try:
            if rank0_only and not ddp.is_main():
                ddp.barrier()
                result[stage] = _stored(out, stage)
                result["status"][stage] = "ran on rank 0"
                continue
            value = runners[stage]()
            if rank0_only:
                ddp.barrier()
        except TaspruneError as err:
            if str(err).startswith("stage "):
                raise
            # Same class (callers catch by type), the stage named in front of the message.
            raise type(err)(f"stage {stage}: {err}") from err
        result[stage] = value
        result["status"][stage] = "ran" if value is not None else "unavailable"
        logger.info("stage %s: finished in %.1fs", stage, time.perf_counter() - t0)
    result["table"] = summary_table(out, recipe)
    logger.info("run %s finished (report: %s)", out, out / "report.md")
    return result


# --------------------------------------------------------------------------- summary


def _latency(report: dict[str, Any] | None, role: str) -> float | None:
    """Latency (ms, smallest measured batch) of ``role`` (teacher | pruned) from report.json."""
    if not isinstance(report, dict):
        return None
    # report.json stores the pruned network under "pruned"; "student" is accepted too.
    keys = ("pruned", "student") if role in ("pruned", "student") else (role,)
    raw = report.get("models")
    models: dict[str, Any] = raw if isinstance(raw, dict) else {}
    for node in [report.get(k) for k in keys] + [models.get(k) for k in keys]:
        if not isinstance(node, dict):
            continue
        value = node.get("latency_ms")
        if isinstance(value, dict) and value:
            first = sorted(value, key=lambda k: int(k) if str(k).isdigit() else 0)[0]
            value = value[first]
        if isinstance(value, int | float):
            return float(value)
    return None


def summary_table(out_dir: Path, recipe: Recipe) -> str:
    """Teacher vs pruned: top-1, top-5, MFLOPs, params (M) and latency when measured."""
    rows: list[tuple[str, dict[str, Any], int | None, int | None]] = []
    report = _stored(out_dir, "report") if stage_done(out_dir, "report") else None
    for role, folder in (("teacher", "teacher"), ("pruned", "student")):
        metrics = _read_final(out_dir / folder)
        flops = params = None
        try:
            meta = json.loads((out_dir / folder / "final.json").read_text()).get("meta") or {}
            shape = Shape.from_dict(meta["shape"])
            size = tuple(meta["input_size"])
            flops, params = model_cost(
                str(meta["model"]), shape, (size[0], size[1], size[2]), int(meta["num_classes"])
            )
        except (OSError, KeyError, TypeError, ValueError, json.JSONDecodeError, DataError):
            pass
        rows.append((role, metrics, flops, params))
    lines = [f"{'':8} {'top1':>7} {'top5':>7} {'MFLOPs':>9} {'params(M)':>10} {'latency(ms)':>12}"]
    for role, m, flops, params in rows:
        lat = _latency(report, role)

        def fmt(v: Any, spec: str) -> str:
            return format(v, spec) if isinstance(v, int | float) else "-"

        lines.append(
            f"{role:8} {fmt(m.get('top1'), '7.2f')} {fmt(m.get('top5'), '7.2f')} "
            f"{fmt(flops / 1e6 if flops is not None else None, '9.2f')} "
            f"{fmt(params / 1e6 if params is not None else None, '10.3f')} {fmt(lat, '12.2f')}"
        )
    return "\n".join(lines)
