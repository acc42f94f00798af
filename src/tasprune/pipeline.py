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
from tasprune.checkpoint import checkpoint_exists, load_checkpoint, save_checkpoint, sidecar_path
from tasprune.config import Recipe, dump_recipe
from tasprune.cost import model_cost
from tasprune.data import ArrayDataset, DeviceLoader, load_dataset, stratified_split
from tasprune.distill import distill, model_meta
from tasprune.engine import TrainConfig, evaluate, fit
from tasprune.errors import CheckpointError, ConfigError, DataError, TaspruneError
from tasprune.imagefolder import StreamingFolder, StreamingLoader
from tasprune.lock import run_lock
from tasprune.models import create_model, get_model_spec
from tasprune.search import SearchConfig, SuperNet
from tasprune.search import search as run_search
from tasprune.search.loop import check_budget
from tasprune.shape import Shape
from tasprune.utils import JsonlLogger, atomic_write_text

logger = logging.getLogger(__name__)

__all__ = [
    "STAGES",
    "check_model_fits_data",
    "drop_unsaved_search_rows",
    "load_model_checkpoint",
    "load_run_data",
    "load_supernet_state",
    "resolve_model_file",
    "run",
    "search_loaders",
    "stage_done",
    "stage_loaders",
    "train_unpruned",
    "summary_table",
    "with_recipe_seed",
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
_RESUMABLE_KEYS: tuple[str, ...] = ("device",)


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
    logger.info("data %s: %d train / %d test images", train.name, len(train), len(test))
    return train, test


# --------------------------------------------------------------------------- checkpoints


def resolve_model_file(path: str | Path, prefer: tuple[str, ...] = ("student", "teacher")) -> Path:
    """A ``model.pt`` from a file, a fit folder, or a run folder (its ``prefer`` sub-folders)."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        for cand in [*(p / sub / "model.pt" for sub in prefer), p / "model.pt"]:
            if cand.is_file():
                return cand
        raise CheckpointError(
            f"{p} holds no model.pt (looked in {', '.join(prefer)}/ and the folder itself). "
            "Fix: pass a run folder whose stage finished, or a model.pt file"
        )
    raise CheckpointError(f"{p} does not exist. Fix: pass a run folder or a model.pt file")


def load_model_checkpoint(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the network stored in a ``model.pt`` from its meta; returns (model, meta)."""
    payload = load_checkpoint(path)
    meta = payload.get("meta")
    if not isinstance(meta, dict) or "model" not in meta or "shape" not in meta:
        raise CheckpointError(
            f"{path} has no model meta (model name and shape). Fix: use a model.pt written by "
            "tasprune train/run/distill"
        )
    shape = Shape.from_dict(meta["shape"])
    model = create_model(
        str(meta["model"]),
        shape,
        num_classes=int(meta.get("num_classes", 10)),
        in_channels=int(meta.get("in_channels", 3)),
    )
    try:
        model.load_state_dict(payload["model"])
    except (KeyError, RuntimeError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(
            f"weights in {path} do not fit {meta['model']} at its stored shape ({first}). "
            "Fix: the file is damaged or was edited; retrain that stage"
        ) from None
    return model, meta


def check_model_fits_data(
    meta: dict[str, Any], path: Path, data: ArrayDataset, model: str | None = None
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


def drop_unsaved_search_rows(folder: Path) -> None:
    """Empty ``folder/history.jsonl`` when no search checkpoint covers its rows.

    A search killed after logging epoch 0 but before its first checkpoint restarts from
    scratch; ``search.loop.search`` truncates the history only when it resumes from a
    checkpoint, so without this the restarted epoch 0 would be logged twice.
    """
    history = folder / "history.jsonl"
    if history.is_file() and not checkpoint_exists(folder / "checkpoint.pt"):
        JsonlLogger(history).truncate_after(-1)


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


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _recipe_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ. A key only one side has (a field added to or removed
    from the recipe schema since the run started) counts only when it is not at its default,
    so upgrading tasprune does not lock users out of resuming their runs."""
    a, b = _flat(old), _flat(new)
    defaults = _flat(Recipe().model_dump(mode="json"))
    out = []
    for k in set(a) | set(b):
        if k in _RESUMABLE_KEYS or a.get(k) == b.get(k):
            continue
        if (k in a) != (k in b) and (a.get(k, b.get(k)) == defaults.get(k) or k not in defaults):
            continue
        out.append(k)
    return sorted(out)


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
    diff = _recipe_diff(old, json.loads(json.dumps(recipe.model_dump(mode="json"))))
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


def with_recipe_seed(cfg: Any, recipe: Recipe) -> Any:
    """The stage config seeded from the recipe: a stage seed left at 0 becomes ``recipe.seed``
    (a non-zero stage seed wins), and ``recipe.deterministic`` switches determinism on.

    Keyed on the value, not on "was it set", so a dumped recipe.yaml (every field written out)
    reproduces the run it came from.
    """
    update: dict[str, Any] = {"deterministic": bool(cfg.deterministic or recipe.deterministic)}
    if cfg.seed == 0:
        update["seed"] = recipe.seed
    return cfg.model_copy(update=update)


def _read_final(folder: Path) -> dict[str, Any]:
    try:
        final = json.loads((folder / "final.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    metrics = final.get("metrics") if isinstance(final, dict) else None
    return dict(metrics) if isinstance(metrics, dict) else {}


def search_loaders(
    train: StreamingFolder, cfg: SearchConfig
) -> tuple[StreamingLoader, StreamingLoader, StreamingLoader]:
    """Streamed (split A, split B, validation on B) loaders: the same stratified 50/50 split of
    the training images as the in-memory search uses; sharded per rank under torchrun."""
    idx_a, idx_b = stratified_split(train.labels, 0.5, cfg.seed)
    rank, world = ddp.get_rank(), ddp.get_world_size()
    batch = ddp.per_rank_batch(cfg.batch_size, world)
    return (
        train.loader(batch, train=True, seed=cfg.seed, rank=rank, world_size=world, part=idx_a),
        train.loader(
            batch, train=True, seed=cfg.seed + 10_000, rank=rank, world_size=world, part=idx_b
        ),
        train.loader(batch, train=False, rank=rank, world_size=world, part=idx_b),
    )


def stage_loaders(
    recipe: Recipe, data: tuple[Any, Any], cfg: TrainConfig, device: torch.device
) -> tuple[Any, Any]:
    """(train, test) loaders of a training stage: the train split sharded per rank under
    torchrun (global batch / world size), the test split whole on every rank. Device-resident
    for in-memory data; streamed by a multi-worker DataLoader for ``imagenet``."""
    train, test = data
    d = recipe.data
    rank, world = ddp.get_rank(), ddp.get_world_size()
    batch = ddp.per_rank_batch(cfg.batch_size, world)
    if isinstance(train, StreamingFolder):
        return (
            train.loader(batch, train=True, seed=cfg.seed, rank=rank, world_size=world),
            test.loader(cfg.batch_size, train=False),
        )
    return (
        DeviceLoader(
            train,
            batch,
            train=True,
            device=device,
            crop_padding=d.crop_padding,
            flip=d.flip,
            seed=cfg.seed,
            rank=rank,
            world_size=world,
        ),
        DeviceLoader(test, cfg.batch_size, train=False, device=device),
    )


def train_unpruned(
    recipe: Recipe,
    data: tuple[Any, Any],
    cfg: TrainConfig,
    out_dir: Path,
    device: torch.device,
    progress: bool = True,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train the recipe's unpruned model on ``data`` with the stage loaders (the teacher
    stage, and ``tasprune train`` on streamed data); returns (model, fit's metrics)."""
    train = data[0]
    torch.manual_seed(cfg.seed)
    model = create_model(recipe.model, num_classes=train.num_classes, in_channels=train.in_channels)
    meta = model_meta(
        recipe.model,
        get_model_spec(recipe.model).full_shape(),
        train,
        "teacher",
        recipe=recipe.model_dump(mode="json"),
    )
    metrics = fit(
        model,
        *stage_loaders(recipe, data, cfg, device),
        cfg,
        out_dir,
        device=device,
        meta=meta,
        progress=progress,
    )
    return model, metrics


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

    @property
    def streaming(self) -> bool:
        return isinstance(self.data[0], StreamingFolder)

    def loaders(self, cfg: TrainConfig) -> tuple[Any, Any]:
        """(train, test) loaders of a stage: device-resident, or streamed for ``imagenet``."""
        return stage_loaders(self.recipe, self.data, cfg, self.device)

    def meta(self, shape: Shape, role: str) -> dict[str, Any]:
        return model_meta(
            self.recipe.model,
            shape,
            self.data[0],
            role,
            recipe=self.recipe.model_dump(mode="json"),
        )

    @cached_property
    def teacher(self) -> nn.Module:
        model, _ = load_model_checkpoint(self.out / "teacher" / "model.pt")
        return model

    # ---------------------------------------------------------------- teacher
    def stage_teacher(self) -> dict[str, Any]:
        r = self.recipe
        folder = self.out / "teacher"
        if r.teacher.checkpoint:
            return self._import_teacher(Path(r.teacher.checkpoint))
        cfg = with_recipe_seed(r.teacher.train, r)
        model, metrics = train_unpruned(r, self.data, cfg, folder, self.device, self.progress)
        self.__dict__["teacher"] = model
        return metrics

    def _import_teacher(self, source: Path) -> dict[str, Any]:
        """Use a trained unpruned network: check it fits, copy it in, evaluate it."""
        r = self.recipe
        path, model, meta = self.checked_teacher_import(source)
        folder = self.out / "teacher"
        # Re-saved from what was loaded (verified, weights-only), not copied byte for byte: a
        # corrupted source whose .prev.pt was used instead must not be carried over.
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_checkpoint(folder / "model.pt", {"model": state, "meta": meta})
        model.to(self.device)
        _, test_loader = self.loaders(r.teacher.train)
        metrics: dict[str, Any] = {**evaluate(model, test_loader, self.device), "epochs": 0}
        final = {"metrics": metrics, "epochs": 0, "source": str(path.resolve()), "meta": meta}
        atomic_write_text(folder / "final.json", json.dumps(final, indent=2) + "\n")
        logger.info("teacher imported from %s: test top1 %.2f%%", path, metrics["top1"])
        self.__dict__["teacher"] = model
        return metrics

    def checked_teacher_import(self, source: Path) -> tuple[Path, nn.Module, dict[str, Any]]:
        """(file, network, meta) of ``teacher.checkpoint``, refused unless it fits the recipe."""
        r = self.recipe
        path = resolve_model_file(source, prefer=("teacher",))
        model, meta = load_model_checkpoint(path)
        check_model_fits_data(meta, path, self.data[0], r.model)
        if Shape.from_dict(meta["shape"]) != get_model_spec(r.model).full_shape():
            raise CheckpointError(
                f"teacher checkpoint {path} is a pruned {r.model}. "
                "Fix: the teacher must be the unpruned network (a run's teacher/model.pt)"
            )
        return path, model, meta

    # ---------------------------------------------------------------- search
    def stage_search(self) -> dict[str, Any]:
        r = self.recipe
        cfg: SearchConfig = with_recipe_seed(r.search, r)
        train, _ = self.data
        teacher_state = self.teacher.state_dict() if cfg.warm_start else None
        drop_unsaved_search_rows(self.out / "search")
        loaders = None
        if isinstance(train, StreamingFolder):
            loaders = search_loaders(train, cfg)
        result = run_search(
            r.model,
            train,
            cfg,
            self.out / "search",
            teacher_state=teacher_state,
            device=self.device,
            progress=self.progress,
            crop_padding=r.data.crop_padding,
            flip=r.data.flip,
            loaders=loaders,
        )
        return result.summary()

    # ---------------------------------------------------------------- distill
    def stage_distill(self) -> dict[str, Any]:
        r = self.recipe
        cfg = r.distill.model_copy(update={"train": with_recipe_seed(r.distill.train, r)})
        shape, _ = Shape.load(self.out / "search" / "shape.json")
        supernet = None
        if cfg.init == "supernet":
            supernet = load_supernet_state(self.out / "search" / "supernet.pt")
        needs_teacher = cfg.kd or cfg.init == "teacher" or cfg.feature_loss != "none"
        train, test = self.data
        return distill(
            r.model,
            shape,
            self.teacher if needs_teacher else None,
            train,
            test,
            cfg,
            self.out / "student",
            supernet_state=supernet,
            space=r.search.space(),
            device=self.device,
            meta={"recipe": r.model_dump(mode="json")},
            progress=self.progress,
            crop_padding=r.data.crop_padding,
            flip=r.data.flip,
            loaders=self.loaders(cfg.train) if self.streaming else None,
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
    first = STAGES.index(from_stage) if from_stage is not None else len(STAGES)
    pending = {s for i, s in enumerate(STAGES[:3]) if i >= first or not stage_done(out, s)}
    if not pending:
        return
    train, _ = ctx.data
    if "teacher" in pending and r.teacher.checkpoint:
        ctx.checked_teacher_import(Path(r.teacher.checkpoint))
    sizes: list[tuple[str, int, int]] = []  # (batch-size key, images, batch size)
    if "teacher" in pending and not r.teacher.checkpoint:
        sizes.append(("teacher.train.batch_size", len(train), r.teacher.train.batch_size))
    if "search" in pending:
        seed = with_recipe_seed(r.search, r).seed
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
        with torch.random.fork_rng(devices=[]):  # building the net must not move the RNG
            net = SuperNet(
                r.model,
                num_classes=train.num_classes,
                in_channels=train.in_channels,
                input_size=train.image_size,
                options=r.search.space(),
            )
        check_budget(net, r.search)


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
