"""``tasprune sweep``: the accuracy/cost trade-off curve, one pruned network per budget.

Layout of a sweep folder ``DIR``::

    DIR/sweep.yaml            the sweep (recipe, ratios, metric, uniform): a different one is refused
    DIR/teacher/              the teacher, trained (or imported) once by the pipeline's teacher stage
    DIR/ratio-0.30/ ...       one `tasprune run` folder per budget (`tasprune.pipeline.run`)
    DIR/uniform-0.30/ ...     the uniform-scaling baseline at that budget (teacher/, student/,
                              report.json: a run folder without search/)
    DIR/sweep.json, DIR/sweep.md, DIR/sweep.png   written last (sweep.json last of all)

Each ``ratio-R`` folder is the run of the sweep's recipe with ``search.flops_ratio`` (or
``search.latency_ratio`` with ``metric="latency"``) set to R; its ``teacher/`` holds the shared
teacher's files (hard links where the file system allows), so the pipeline skips that stage and
the teacher is trained once. Its report measures top-1, FLOPs, eager and ONNX Runtime fp32
latency and, with ``report.int8``, the int8 model's top-1 and latency; the sweep only collects
them. The uniform baseline (`tasprune.baselines.uniform_shape`: every width times one factor, in
the same FLOPs band; with a latency budget, at the TAS student's FLOPs) is trained by the same
distill stage from the same teacher (and, with ``distill.init: supernet``, from that budget's
supernet, as the benchmark does) and measured by the same report.

The supernet is shared between budgets where that is exact: with ``search.warm_epochs`` the
first epochs are weight steps alone, the same whatever the budget, so they run once (in the
first budget's search) and every other budget's search continues from that search's
``warm.pt`` (`tasprune.search.loop.continue_from_warm`), ending where its own run would have.
After them each budget's search is its own trajectory (the budget loss pulls the architecture
and the weights trained under it towards another region), so a supernet searched at one budget
is not reused for another (docs/results.md measures the warm epochs against none).

Resuming: every step is skipped when its marker exists (the pipeline's own markers,
``uniform-R/report.json``); rerunning the same command continues where it stopped. Everything
that can be checked before training (the ratios, the folder holds this sweep, every budget is
reachable) is checked before anything is written. One process (no torchrun) writes the folder.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import statistics
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from tasprune import distributed as ddp
from tasprune.config import Recipe, deep_merge, load_recipe, recipe_diff
from tasprune.errors import ConfigError
from tasprune.lock import LOCK_NAME, run_lock
from tasprune.pipeline import load_run_data, load_supernet_state, stage_done
from tasprune.pipeline import run as run_pipeline
from tasprune.shape import Shape
from tasprune.stages import StageContext, finished_teacher, teacher_stage, train_student
from tasprune.utils import atomic_write_bytes, atomic_write_text, read_json_object

logger = logging.getLogger(__name__)

__all__ = ["Metric", "sweep"]

Metric = Literal["flops", "latency"]
_RESUMABLE_KEYS: tuple[str, ...] = ("device", "log")
# The latency fields of report.json, under the names sweep.json gives them.
_LATENCY_KEYS = {
    "eager_ms": "latency_ms",
    "onnx_ms": "onnx_latency_ms",
    "int8_ms": "int8_latency_ms",
}


def folder_name(ratio: float) -> str:
    """``0.3`` -> ``0.30``: the ratio as the per-budget folders are named."""
    return f"{ratio:.2f}" if round(ratio, 2) == ratio else f"{ratio:g}"


def _checked_ratios(ratios: Sequence[float], tolerance: float) -> list[float]:
    """The ratios sorted, refused when one is outside (tolerance, 1] (the budget band
    ``[r - tolerance, r]`` must lie above 0) or two name the same folder."""
    if not ratios:
        raise ConfigError("no ratios given. Fix: pass --ratios R [R ...], each in (0, 1]")
    bad = [r for r in ratios if not 0 < r <= 1]
    if bad:
        raise ConfigError(f"ratio {bad[0]:g} is outside (0, 1]. Fix: give ratios in (0, 1]")
    low = [r for r in ratios if r <= tolerance]
    if low:
        raise ConfigError(
            f"ratio {low[0]:g} is not above the budget band's width search.tolerance "
            f"({tolerance:g}). Fix: give ratios above {tolerance:g} or lower search.tolerance"
        )
    names = [folder_name(r) for r in ratios]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise ConfigError(f"ratio {dup} is given twice. Fix: give each ratio once")
    return sorted(float(r) for r in ratios)


def _budget_recipe(recipe: Recipe, metric: Metric, ratio: float) -> Recipe:
    """The sweep's recipe with its search budget set to ``ratio`` of ``metric`` (a latency
    budget alone: no FLOPs constraint beside it)."""
    search: dict[str, Any] = {"flops_ratio": ratio}
    if metric == "latency":
        search = {"latency_ratio": ratio, "flops_ratio": None}
    return load_recipe(None, deep_merge(recipe.model_dump(mode="json"), {"search": search}))


def _share_teacher(source: Path, dest: Path) -> None:
    """Put the shared teacher's files into a run folder's ``teacher/`` (hard links for the
    weights, copies of the text files a stage could append to; final.json, the marker, last),
    so the pipeline finds its teacher stage done. Resume checkpoints are left out."""
    dest.mkdir(parents=True, exist_ok=True)
    files = [
        p
        for p in sorted(source.iterdir(), key=lambda p: p.name == "final.json")
        if p.is_file() and not p.name.startswith((".", "checkpoint"))
    ]
    for src in files:
        target = dest / src.name
        if target.exists():
            continue
        if src.suffix in (".json", ".jsonl"):
            shutil.copy2(src, target)
            continue
        try:
            os.link(src, target)
        except OSError:  # another file system, or no hard links there
            shutil.copy2(src, target)


def _median(values: list[Any]) -> float | None:
    nums = [float(v) for v in values if isinstance(v, int | float)]
    return statistics.median(nums) if nums else None


def _point(entry: dict[str, Any], batch: str) -> dict[str, Any]:
    """The sweep's numbers of one network from its report.json entry (teacher or pruned)."""
    int8 = entry.get("int8") or {}
    point: dict[str, Any] = {
        "top1": entry.get("top1"),
        "flops": entry.get("flops"),
        "params": entry.get("params"),
        "flops_ratio": entry.get("flops_ratio", 1.0),
    }
    for key, field in _LATENCY_KEYS.items():
        point[key] = (entry.get(field) or {}).get(batch)
    point["int8_top1"] = int8.get("top1")
    point["int8_fp32_top1"] = int8.get("onnx_fp32_top1")  # the fp32 ONNX model, same images
    return point


class _Sweep:
    """One sweep folder: its checks, its steps (each skipped when done) and its summary."""

    def __init__(
        self,
        recipe: Recipe,
        ratios: list[float],
        out: Path,
        metric: Metric,
        uniform: bool,
        progress: bool,
    ) -> None:
        self.recipe, self.ratios, self.out = recipe, ratios, out
        self.metric, self.uniform, self.progress = metric, uniform, progress
        self.recipes = {r: _budget_recipe(recipe, metric, r) for r in ratios}  # refuses bad ones

    def tas_dir(self, ratio: float) -> Path:
        return self.out / f"ratio-{folder_name(ratio)}"

    def uniform_dir(self, ratio: float) -> Path:
        return self.out / f"uniform-{folder_name(ratio)}"

    @cached_property
    def ctx(self) -> StageContext:
        device = ddp.init_from_env(self.recipe.device).device
        return StageContext(self.recipe, load_run_data(self.recipe), device, self.progress)

    @cached_property
    def teacher(self) -> torch.nn.Module:
        return finished_teacher(self.ctx, self.out / "teacher")

    # ---------------------------------------------------------------- checks
    def identity(self) -> dict[str, Any]:
        return {
            "ratios": self.ratios,
            "metric": self.metric,
            "uniform": self.uniform,
            "recipe": json.loads(json.dumps(self.recipe.model_dump(mode="json"))),
        }

    def check_folder(self) -> None:
        """Refuse, writing nothing, a folder that holds something other than this sweep."""
        stored_path = self.out / "sweep.yaml"
        if not stored_path.is_file():
            other = [p.name for p in self.out.iterdir() if p.name != LOCK_NAME]
            if other:
                raise ConfigError(
                    f"{self.out} is not empty and holds no sweep (found {other[0]}). "
                    "Fix: use another --out"
                )
            return
        try:
            stored = yaml.safe_load(stored_path.read_text()) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            stored = {}
        mine = self.identity()
        diff = [k for k in ("ratios", "metric", "uniform") if stored.get(k) != mine[k]]
        old = stored.get("recipe")
        diff += recipe_diff(old if isinstance(old, dict) else {}, mine["recipe"], _RESUMABLE_KEYS)
        if diff:
            raise ConfigError(
                f"{self.out} holds a different sweep (differs in {', '.join(diff[:4])}). "
                "Fix: use another --out, or rerun that sweep's own command to resume it"
            )

    def preflight(self) -> None:
        """Every budget still to be searched is reachable (the pipeline's own check), and
        every uniform shape of a FLOPs sweep exists, before anything is trained."""
        from tasprune.search.loop import check_budget

        pending = [r for r in self.ratios if not stage_done(self.tas_dir(r), "search")]
        uniform = []
        if self.uniform and self.metric == "flops":
            uniform = [
                r for r in self.ratios if not (self.uniform_dir(r) / "report.json").is_file()
            ]
        for r in pending:
            cfg, classes = self.recipes[r].search, self.ctx.data[0].num_classes
            check_budget(
                self.recipe.model, cfg, self.ctx.input_size, classes, progress=self.progress
            )
        for r in uniform:
            self.uniform_shape(r, r)

    # ---------------------------------------------------------------- steps
    def run_teacher(self) -> None:
        folder = self.out / "teacher"
        if (folder / "final.json").is_file():
            logger.info("sweep: teacher already done (%s)", folder)
            return
        logger.info("sweep: teacher of every budget, once")
        self.__dict__["teacher"], _ = teacher_stage(self.ctx, folder)

    def run_tas(self, ratio: float) -> dict[str, Any]:
        folder = self.tas_dir(ratio)
        if not stage_done(folder, "teacher"):
            _share_teacher(self.out / "teacher", folder / "teacher")
        logger.info("sweep: %s ratio %s -> %s", self.metric, folder_name(ratio), folder)
        self.share_warm(folder / "search")
        run_pipeline(self.recipes[ratio], folder, progress=self.progress)
        return read_json_object(folder / "report.json") or {}

    def share_warm(self, search_dir: Path) -> None:
        """With ``search.warm_epochs``, a search not yet started continues from another
        budget's warm checkpoint (the warm epochs do not depend on the budget), so they run
        once per sweep."""
        from tasprune.checkpoint import checkpoint_exists
        from tasprune.search.loop import WARM_CHECKPOINT, continue_from_warm

        if self.recipe.search.warm_epochs == 0 or checkpoint_exists(search_dir / "checkpoint.pt"):
            return
        for r in self.ratios:
            source = self.tas_dir(r) / "search"
            if source != search_dir and (source / WARM_CHECKPOINT).is_file():
                done = continue_from_warm(source, search_dir)
                logger.info("sweep: the search continues from %s's %d warm epochs", source, done)
                return

    def uniform_shape(self, ratio: float, flops_ratio: float) -> Shape:
        from tasprune.baselines import uniform_shape

        tol = self.recipe.search.tolerance
        return uniform_shape(
            self.recipe.model, flops_ratio, self.ctx.input_size, self.ctx.data[0].num_classes, tol
        )

    def run_uniform(self, ratio: float, tas_report: dict[str, Any]) -> dict[str, Any]:
        """The uniform-scaling student at this budget's FLOPs (a latency budget: the TAS
        student's), trained and reported like the TAS student."""
        from tasprune.report import write_report

        folder = self.uniform_dir(ratio)
        if (folder / "report.json").is_file():
            return read_json_object(folder / "report.json") or {}
        recipe = self.recipes[ratio]
        if not (folder / "student" / "final.json").is_file():
            target = ratio
            if self.metric == "latency":
                target = float((tas_report.get("pruned") or {})["flops_ratio"])
            shape = self.uniform_shape(ratio, target)
            _share_teacher(self.out / "teacher", folder / "teacher")
            shape.save(folder / "shape.json", model=recipe.model, method="uniform", target=target)
            supernet = None
            if recipe.distill.init == "supernet":
                supernet = load_supernet_state(self.tas_dir(ratio) / "search" / "supernet.pt")
            ctx = StageContext(recipe, self.ctx.data, self.ctx.device, self.progress)
            logger.info("sweep: uniform baseline at FLOPs ratio %.3f -> %s", target, folder)
            train_student(
                ctx,
                folder / "student",
                shape,
                self.teacher,
                supernet_state=supernet,
                meta={"method": "uniform"},
            )
        rc = recipe.report
        return write_report(
            folder,
            latency_batches=tuple(rc.latency_batches),
            repeats=rc.latency_repeats,
            int8=rc.int8,
        )

    # ---------------------------------------------------------------- summary
    def summary(
        self, tas: dict[float, dict[str, Any]], uni: dict[float, dict[str, Any]]
    ) -> dict[str, Any]:
        batch = str(max(self.recipe.report.latency_batches))
        reports = list(tas.values()) + list(uni.values())
        teachers = [_point(r.get("teacher") or {}, batch) for r in reports]
        teacher: dict[str, Any] = {k: _median([t[k] for t in teachers]) for k in teachers[0]}
        teacher.update({"method": "teacher", "target_ratio": None, "folder": "teacher"})
        points: list[dict[str, Any]] = [teacher]
        for method, found, folder in (
            ("tas", tas, self.tas_dir),
            ("uniform", uni, self.uniform_dir),
        ):
            for ratio, report in found.items():
                point = {"method": method, "target_ratio": ratio, "folder": folder(ratio).name}
                point.update(_point(report.get("pruned") or {}, batch))
                search = report.get("search") or {}
                # The uniform shape meets a FLOPs band, not a latency budget.
                latency_uniform = method == "uniform" and self.metric == "latency"
                point["in_band"] = None if latency_uniform else search.get("pruned_in_band")
                lat = search.get("latency_budget") or {}
                if lat:
                    point["predicted_latency_ratio"] = lat.get("predicted_ratio")
                points.append(point)
        first = reports[0]
        return {
            "recipe": self.recipe.name,
            "model": first.get("model"),
            "dataset": first.get("dataset"),
            "metric": self.metric,
            "ratios": self.ratios,
            "tolerance": self.recipe.search.tolerance,
            "latency_batch": int(batch),
            "latency_threads": (first.get("latency") or {}).get("threads"),
            "points": points,
        }


def _markdown(summary: dict[str, Any]) -> str:
    from tasprune.report_table import fmt

    lines = [
        f"# Trade-off sweep: {summary['model']} on {summary['dataset']}",
        "",
        f"One TAS search + KD student per {summary['metric']} budget, the uniform-scaling "
        f"baseline at the same FLOPs, one shared teacher. Latency: median per batch of "
        f"{summary['latency_batch']} on the CPU (threads: {summary['latency_threads']}). "
        "int8 top-1: the int8 ONNX model on the report's held-out test images.",
        "",
        "| method | target | FLOPs ratio | MFLOPs | top-1 (%) | eager (ms) | ONNX fp32 (ms) "
        "| int8 (ms) | int8 top-1 (%) | folder |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in summary["points"]:
        mflops = p["flops"] / 1e6 if isinstance(p.get("flops"), int | float) else None
        lines.append(
            f"| {p['method']} | {fmt(p['target_ratio'], '.2f')} | {fmt(p['flops_ratio'], '.3f')} "
            f"| {fmt(mflops, '.2f')} | {fmt(p['top1'], '.2f')} | {fmt(p['eager_ms'], '.3f')} "
            f"| {fmt(p['onnx_ms'], '.3f')} | {fmt(p['int8_ms'], '.3f')} "
            f"| {fmt(p['int8_top1'], '.2f')} | {p['folder']} |"
        )
    lines += ["", "![trade-off](sweep.png)", ""]
    return "\n".join(lines)


def sweep(
    recipe: Recipe | str | Path,
    ratios: Sequence[float],
    out: str | Path,
    *,
    metric: Metric = "flops",
    uniform: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Prune ``recipe``'s model at every ratio of ``metric`` into ``out`` and write the
    trade-off table and plot (see the module's docstring); returns sweep.json's content.
    Resumes in ``out``; a folder holding another sweep is refused (`ConfigError`)."""
    if metric not in ("flops", "latency"):
        raise ConfigError(f"unknown metric {metric!r}. Fix: use flops or latency")
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    ratios = _checked_ratios(ratios, recipe.search.tolerance)
    job = _Sweep(recipe, ratios, Path(out), metric, uniform, progress)
    with run_lock(job.out):
        job.check_folder()
        job.preflight()
        atomic_write_text(job.out / "sweep.yaml", yaml.safe_dump(job.identity(), sort_keys=False))
        job.run_teacher()
        tas = {r: job.run_tas(r) for r in job.ratios}
        uni = {r: job.run_uniform(r, tas[r]) for r in job.ratios} if uniform else {}
        summary = job.summary(tas, uni)
        text = json.dumps(summary, indent=2) + "\n"
        files = ("sweep.json", "sweep.md", "sweep.png")
        if all((job.out / f).is_file() for f in files) and (
            (job.out / "sweep.json").read_text() == text
        ):
            logger.info("sweep %s: already done", job.out)
            return summary
        from tasprune.plots import DPI

        buf = io.BytesIO()
        plot_sweep(summary).savefig(buf, format="png", dpi=DPI)
        atomic_write_bytes(job.out / "sweep.png", buf.getvalue())
        atomic_write_text(job.out / "sweep.md", _markdown(summary))
        atomic_write_text(job.out / "sweep.json", text)  # last: the sweep's marker
    logger.info("sweep %s finished (table: %s)", job.out, job.out / "sweep.md")
    return summary


# --------------------------------------------------------------------------- plot

_RUNTIMES = (
    ("eager_ms", "top1", "eager PyTorch"),
    ("onnx_ms", "top1", "ONNX Runtime fp32"),
    ("int8_ms", "int8_top1", "ONNX Runtime int8 (its own top-1)"),
)
_RUNTIME_COLORS = ("#1f77b4", "#2ca02c", "#d62728")
_METHODS: dict[str, tuple[str, Any, str]] = {
    "tas": ("o", "-", "TAS + KD"),
    "uniform": ("s", "--", "uniform scaling + KD"),
}


def plot_sweep(summary: dict[str, Any]) -> Any:
    """Two panels: top-1 against MFLOPs, and against measured latency (one colour per runtime,
    one marker per method); the teacher a star, the uniform baseline its own series."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    from tasprune.plots import DPI

    fig = Figure(figsize=(12.0, 5.0), dpi=DPI, layout="constrained")
    left, right = fig.subplots(1, 2)
    points = summary["points"]
    teacher = next(p for p in points if p["method"] == "teacher")

    def series(method: str, x: str, y: str) -> tuple[list[float], list[float]]:
        """(x, y) of a method's networks, in the order of their budgets (one line per method
        links the same networks in both panels)."""
        found = [p for p in points if p["method"] == method and p.get(x) and p.get(y)]
        found.sort(key=lambda p: p["target_ratio"])
        return [p[x] for p in found], [p[y] for p in found]

    grey = "#555555"
    for method, (marker, style, label) in _METHODS.items():
        xs, ys = series(method, "flops", "top1")
        left.plot(
            [x / 1e6 for x in xs], ys, marker=marker, linestyle=style, color=grey, label=label
        )
    if teacher.get("flops") is not None and teacher.get("top1") is not None:
        left.plot(teacher["flops"] / 1e6, teacher["top1"], "*", ms=15, color=grey, label="teacher")
    left.set_xlabel("MFLOPs (multiply-accumulates per image)")
    left.set_ylabel("test top-1 (%)")
    left.set_title("top-1 vs FLOPs")
    below = {"loc": "upper center", "bbox_to_anchor": (0.5, -0.14), "fontsize": 9}
    left.legend(ncol=3, **below)

    handles: list[Any] = []
    for (lat, acc, name), color in zip(_RUNTIMES, _RUNTIME_COLORS, strict=True):
        drawn = False
        for method, (marker, style, _) in _METHODS.items():
            xs, ys = series(method, lat, acc)
            if xs:
                right.plot(xs, ys, marker=marker, linestyle=style, color=color)
                drawn = True
        if teacher.get(lat) is not None and teacher.get(acc) is not None:
            right.plot(teacher[lat], teacher[acc], "*", ms=15, color=color)
            drawn = True
        if drawn:
            handles.append(Line2D([], [], color=color, lw=6, label=name))
    handles += [
        Line2D([], [], color=grey, marker=m, linestyle=s, label=label)
        for m, s, label in _METHODS.values()
    ]
    handles.append(Line2D([], [], color=grey, marker="*", ms=12, linestyle="", label="teacher"))
    right.legend(handles=handles, ncol=3, **below)
    right.set_xlabel(f"measured latency, batch {summary['latency_batch']} (ms)")
    right.set_ylabel("test top-1 (%)")
    right.set_title("top-1 vs measured CPU latency")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    ratios = ", ".join(f"{r:g}" for r in summary["ratios"])
    fig.suptitle(
        f"{summary['model']} on {summary['dataset']}: {summary['metric']} budgets {ratios}"
    )
    return fig
