"""The report of a run folder: teacher vs pruned accuracy, exact cost, CPU latency, plots.

Reads only what the pipeline wrote (``teacher/``, ``search/``, ``student/``, ``recipe.yaml``)
and writes ``DIR/report.json`` (written last: it is the stage's completion marker),
``DIR/report.md`` and ``DIR/plots/{widths,depths,search_trajectory,training}.png`` (drawn by
`tasprune.plots`). Both networks are rebuilt from their ``model.pt`` (weights-only load), so
FLOPs and params are the exact ones of the stored shapes and the latency (`tasprune.latency`)
is that of the real, physically smaller net. Each network's ONNX export is also quantised to
int8 as `tasprune export --int8` quantises it (`tasprune.int8`): its top-1 on the export's
held-out test images and its ONNX Runtime latency get rows of their own.
Optional inputs that are absent (no search history when the shape was given, no training
history of an imported teacher, no depth choices in a network of plain convs) skip their part
with a note instead of failing; so do the int8 rows when onnxruntime's quantisation is not
installed or the training data cannot be read.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import ValidationError

from tasprune.budget import Budget
from tasprune.checkpoint import checkpoint_exists
from tasprune.config import SearchConfig
from tasprune.cost import model_cost
from tasprune.errors import DataError, TaspruneError
from tasprune.export import export_model, load_exportable
from tasprune.int8 import MIN_AGREEMENT, Int8Check, int8_images, int8_path, quantize_int8
from tasprune.latency import LatencySettings, measure
from tasprune.plots import (
    DPI,
    finite,
    has_value,
    plot_depths,
    plot_search,
    plot_training,
    plot_widths,
)
from tasprune.report_table import fmt, format_table, markdown
from tasprune.shape import Shape
from tasprune.utils import (
    JsonlLogger,
    atomic_write_bytes,
    atomic_write_text,
    count_params,
    pick_device,
    read_json_object,
)

logger = logging.getLogger(__name__)

__all__ = ["ReportError", "format_table", "write_report"]

ROLES: tuple[tuple[str, str], ...] = (("teacher", "teacher"), ("pruned", "student"))


class ReportError(TaspruneError):
    """A run folder lacks what the report needs, or its contents disagree."""


# --------------------------------------------------------------------------- reading


def _final_metrics(folder: Path) -> dict[str, Any]:
    """``final.json``'s metrics (the engine nests them under "metrics"), or {} if absent."""
    final = read_json_object(folder / "final.json") or {}
    metrics = final.get("metrics", final)
    return metrics if isinstance(metrics, dict) else {}


def _recipe_search(run_dir: Path, meta: dict[str, Any]) -> dict[str, Any] | None:
    """The run's search settings: recipe.yaml, else the recipe stored in the student's meta."""
    recipe: Any = None
    path = run_dir / "recipe.yaml"
    if path.is_file():
        try:
            recipe = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
            logger.warning("%s is unreadable (%s); using the student's stored recipe", path, err)
    if not isinstance(recipe, dict):
        recipe = meta.get("recipe")
    if not isinstance(recipe, dict):
        return None
    search = recipe.get("search")
    return search if isinstance(search, dict) else {}


def _search_section(
    run_dir: Path, student_meta: dict[str, Any], notes: list[str]
) -> tuple[dict[str, Any], list[dict[str, Any]], Budget | None]:
    """(report["search"], search history rows, the FLOPs budget) of the run."""
    settings = _recipe_search(run_dir, student_meta)
    budget: Budget | None = None
    section: dict[str, Any] = {}
    if settings is None:
        notes.append("no recipe.yaml (and no recipe in the student's meta): target band unknown")
    else:
        try:
            budget = SearchConfig.model_validate(settings).budget
        except ValidationError:
            notes.append("the recipe's search settings do not validate: target band unknown")
    if budget is not None:
        section.update(
            {
                "metric": budget.metric,
                "target_ratio": budget.ratio,
                "tolerance": budget.tolerance,
                "band": list(budget.band),
            }
        )

    folder = run_dir / "search"
    rows = JsonlLogger(folder / "history.jsonl").rows()
    rows = [r for r in rows if isinstance(r.get("epoch"), int)]
    shape_file = folder / "shape.json"
    student_shape = Shape.from_dict(student_meta["shape"])
    if shape_file.is_file():
        search_shape, data = Shape.load(shape_file)
        section["kept_shape_source"] = str(data.get("source", "search"))
        section["shape_flops_ratio"] = finite(data.get("flops_ratio"))
        if isinstance(data.get("latency"), dict):
            section["latency_budget"] = dict(data["latency"])
        section["student_matches_search"] = search_shape == student_shape
        if search_shape != student_shape:
            notes.append("the student's shape differs from search/shape.json")
    else:
        section["kept_shape_source"] = "given"
        notes.append("no search/shape.json: the pruned shape was given, not searched")
    if rows:
        last = rows[-1]
        section.update(
            {
                "epochs": len(rows),
                "epochs_in_band": sum(bool(r.get("in_band")) for r in rows),
                "final_flops_ratio": finite(last.get("flops_ratio")),
                "final_valid_top1": finite(last.get("valid_top1")),
                "final_entropy": finite(last.get("entropy_mean")),
                "final_tau": finite(last.get("tau")),
            }
        )
    else:
        section["epochs"] = 0
    return section, rows, budget


# --------------------------------------------------------------------------- measuring


def _measure(
    role: str,
    model_file: Path,
    device: torch.device,
    batches: Sequence[int],
    repeats: int,
    onnx_dir: Path,
    notes: list[str],
    int8: bool = True,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(report entry, meta) of one stored network: cost, accuracy and latency (and its int8
    ONNX model's, with ``int8``)."""
    model, meta, _ = load_exportable(model_file)
    shape = Shape.from_dict(meta["shape"])
    c, h, w = meta["input_size"]
    size = (int(c), int(h), int(w))
    flops, params = model_cost(str(meta["model"]), shape, size, int(meta.get("num_classes", 10)))
    actual = count_params(model)
    if params != actual:
        raise ReportError(
            f"the {role} network has {actual} parameters but its cost model counts {params}. "
            "Fix: this is a bug in the model's cost function; report it with the shape"
        )
    metrics = _final_metrics(model_file.parent)
    entry: dict[str, Any] = {
        "top1": finite(metrics.get("top1")),
        "top5": finite(metrics.get("top5")),
        "flops": flops,
        "params": params,
        "shape": shape.to_dict(),
    }
    if entry["top1"] is None:
        notes.append(f"no {model_file.parent.name}/final.json metrics: {role} accuracy unknown")

    model.to(device)
    warmup = min(5, repeats)
    latency: dict[str, float] = {}
    spread: dict[str, list[float]] = {}
    for b in batches:
        stats = measure(model, size, LatencySettings("eager", b, None, repeats, warmup))
        latency[str(b)] = stats["median_ms"]
        spread[str(b)] = [stats["p10_ms"], stats["p90_ms"]]
    entry["latency_ms"] = latency
    entry["latency_p10_p90_ms"] = spread

    onnx_latency: dict[str, float] = {}
    onnx_file: Path | None = None
    try:
        onnx_file = export_model(model_file, "onnx", onnx_dir / f"{role}.onnx")
        onnx_latency = _onnx_latency(model, size, onnx_file, batches, repeats)
    except TaspruneError as err:
        notes.append(f"ONNX latency of the {role} skipped: {err}")
    entry["onnx_latency_ms"] = onnx_latency
    if onnx_file is not None and int8:
        entry.update(_measure_int8(role, model, meta, size, onnx_file, batches, repeats, notes))
    logger.info(
        "%s: %.2f MFLOPs, %.3f M params, latency %s ms (onnx %s ms)",
        role,
        flops / 1e6,
        params / 1e6,
        {k: round(v, 3) for k, v in latency.items()},
        {k: round(v, 3) for k, v in onnx_latency.items()},
    )
    return entry, meta


def _onnx_latency(
    model: torch.nn.Module,
    size: tuple[int, int, int],
    onnx_file: Path,
    batches: Sequence[int],
    repeats: int,
) -> dict[str, float]:
    """Median ms per batch of the ONNX model ``onnx_file`` in ONNX Runtime at each batch."""
    out = {}
    for b in batches:
        settings = LatencySettings("onnxruntime", b, None, repeats, min(5, repeats))
        out[str(b)] = measure(model, size, settings, onnx_file=onnx_file)["median_ms"]
    return out


def _measure_int8(
    role: str,
    model: torch.nn.Module,
    meta: dict[str, Any],
    size: tuple[int, int, int],
    onnx_file: Path,
    batches: Sequence[int],
    repeats: int,
    notes: list[str],
) -> dict[str, Any]:
    """The int8 entries of one network: its fp32 ONNX export quantised as `tasprune export
    --int8` quantises it (same calibration images), top-1 of both ONNX models on the export's
    held-out test images, and the int8 model's ONNX Runtime latency timed like the fp32 one.
    {} and a note when quantisation is not installed or the data cannot be read."""
    try:
        import onnxruntime.quantization  # noqa: F401  (an optional part of onnxruntime)
    except ImportError as err:
        notes.append(
            f"int8 rows of the {role} skipped: onnxruntime.quantization unavailable ({err})"
        )
        return {}
    try:
        images = int8_images(meta)
        quantized = int8_path(onnx_file)
        proto, info = quantize_int8(onnx_file.read_bytes(), images, min_agreement=0.0)
        quantized.write_bytes(proto.SerializeToString())
        check = Int8Check(**info["check"])
        latency = _onnx_latency(model, size, quantized, batches, repeats)
    except DataError as err:
        notes.append(
            f"int8 rows of the {role} skipped: {err.problem}. `tasprune export --int8 "
            "--data-root DIR` quantises it with the data at DIR"
        )
        return {}
    except (OSError, TaspruneError) as err:
        notes.append(f"int8 rows of the {role} skipped: {err}")
        return {}
    if check.agreement < MIN_AGREEMENT:
        notes.append(
            f"the {role}'s {check.line()}: `tasprune export --int8` would refuse this model"
        )
    return {
        "int8": {
            "images": check.images,
            "calibration": images.source,
            "agreement": check.agreement,
            "onnx_fp32_top1": 100 * check.fp32_top1,
            "top1": 100 * check.int8_top1,
        },
        "int8_latency_ms": latency,
    }


def _measure_latency_budget(
    lat: dict[str, Any], metas: dict[str, dict[str, Any]], notes: list[str]
) -> None:
    """Time the teacher and the pruned network the way the search's table was measured
    (runtime, threads, batch; ONNX exported padded, bound buffers; the best of 3 medians of 20
    calls after 3 warm-up ones) and put measured next to predicted."""
    from tasprune.models import create_model

    ms = {}
    try:
        settings = LatencySettings(lat["runtime"], int(lat["batch"]), int(lat["threads"]), 20, 3)
        for role in ("teacher", "pruned"):
            meta = metas[role]
            c, h, w = (int(v) for v in meta["input_size"])
            net = create_model(
                str(meta["model"]),
                Shape.from_dict(meta["shape"]),
                num_classes=int(meta.get("num_classes", 10)),
                in_channels=c,
            )
            ms[role] = min(measure(net, (c, h, w), settings)["median_ms"] for _ in range(3))
    except (KeyError, ValueError, TaspruneError) as err:
        notes.append(f"the latency budget's prediction is not re-measured: {err}")
        return
    lat["measured_ms"] = ms["pruned"]
    lat["teacher_measured_ms"] = ms["teacher"]
    lat["measured_ratio"] = ms["pruned"] / ms["teacher"]


def _ratios(pruned: dict[str, float], teacher: dict[str, float]) -> dict[str, float]:
    return {k: pruned[k] / teacher[k] for k in pruned if teacher.get(k)}


# --------------------------------------------------------------------------- plots


def _save(fig: Any, out: Path, name: str) -> str:
    """Write ``fig`` as ``out/plots/NAME.png``; its path relative to the run folder."""
    rel = f"plots/{name}.png"
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    atomic_write_bytes(out / rel, buf.getvalue(), error_cls=ReportError)
    return rel


# --------------------------------------------------------------------------- entry point


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):  # not available on this platform
        return None


def _to_tensorboard(out: Path, report: dict[str, Any], markdown: str) -> None:
    """The report's numbers, table and plots as one TensorBoard entry (step 0)."""
    import matplotlib.image as mpimg

    from tasprune.tracking import TensorBoardMirror

    board = TensorBoardMirror(out / "tensorboard" / "report")
    for role in ("teacher", "pruned"):
        entry = report[role]
        values = {f"{role}/{k}": entry.get(k) for k in ("top1", "top5", "flops", "params")}
        if entry.get("int8"):
            values[f"{role}/int8_top1"] = entry["int8"]["top1"]
        kinds = ("latency_ms", "onnx_latency_ms", "int8_latency_ms")
        for kind in (*kinds, *(k.replace("_ms", "_ratio") for k in kinds)):
            values.update({f"{role}/{kind}_b{b}": v for b, v in (entry.get(kind) or {}).items()})
        for key in ("flops_ratio", "params_ratio"):
            if key in entry:
                values[f"{role}/{key}"] = entry[key]
        board.scalars(values, 0)
    board.text("report", markdown)
    for name, rel in report["plots"].items():
        image = mpimg.imread(out / rel)  # H x W x 4 floats in [0, 1]
        board.image(f"plots/{name}", image)
    board.close()


def write_report(
    run_dir: str | Path,
    *,
    device: str = "cpu",
    latency_batches: Sequence[int] = (1, 64),
    repeats: int = 20,
    tensorboard: bool = False,
    int8: bool = True,
) -> dict[str, Any]:
    """Write ``report.json``, ``report.md`` and ``plots/*.png`` for a finished run; return the
    report dict. With ``tensorboard`` the figures also go to ``run_dir/tensorboard/report``
    (scalars ``teacher/*``, ``pruned/*``, the report table as text, the plots as images).

    ``device`` is where eager latency is measured (ONNX Runtime always runs on CPU);
    ``latency_batches`` are the batch sizes timed, each the median of ``repeats`` runs;
    ``int8``: also quantise both networks and report their int8 top-1 and latency.
    """
    out = Path(run_dir).expanduser()
    if not out.is_dir():
        raise ReportError(
            f"run folder {out} does not exist. Fix: run `tasprune run RECIPE --out {out}` first"
        )
    missing = [f"{f}/model.pt" for _, f in ROLES if not checkpoint_exists(out / f / "model.pt")]
    if missing:
        raise ReportError(
            f"run folder {out} has no {' and no '.join(missing)}, which the report compares. "
            f"Fix: run `tasprune run RECIPE --out {out}` first"
        )
    batches = [int(b) for b in latency_batches]
    dev = pick_device(device)
    notes: list[str] = []
    entries: dict[str, dict[str, Any]] = {}
    metas: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="tasprune-report-") as tmp:
        for role, folder in ROLES:
            entry, meta = _measure(
                role, out / folder / "model.pt", dev, batches, repeats, Path(tmp), notes, int8
            )
            entries[role], metas[role] = entry, meta
    teacher, pruned = entries["teacher"], entries["pruned"]
    if metas["teacher"]["model"] != metas["pruned"]["model"]:
        notes.append(
            f"teacher is {metas['teacher']['model']} but the student is "
            f"{metas['pruned']['model']}; its widths and depths are drawn against the student's space"
        )
    pruned["flops_ratio"] = pruned["flops"] / teacher["flops"]
    pruned["params_ratio"] = pruned["params"] / teacher["params"]
    pruned["latency_ratio"] = _ratios(pruned["latency_ms"], teacher["latency_ms"])
    pruned["onnx_latency_ratio"] = _ratios(pruned["onnx_latency_ms"], teacher["onnx_latency_ms"])
    if "int8_latency_ms" in pruned and "int8_latency_ms" in teacher:
        pruned["int8_latency_ratio"] = _ratios(
            pruned["int8_latency_ms"], teacher["int8_latency_ms"]
        )

    search, search_rows, budget = _search_section(out, metas["pruned"], notes)
    band = budget.band if budget is not None else None
    lat_budget = search.get("latency_budget")
    if lat_budget is not None:
        _measure_latency_budget(lat_budget, metas, notes)
    if budget is not None and band is not None:
        if budget.metric == "latency":
            achieved = (lat_budget or {}).get("predicted_ratio")
        else:
            achieved = pruned["flops_ratio"]
        inside = achieved is not None and budget.contains_ratio(achieved)
        search["pruned_in_band"] = inside
        if not inside:
            notes.append(
                f"the pruned {budget.label} ratio {fmt(achieved, '.3f')} is outside the "
                f"target band [{band[0]:.3f}, {band[1]:.3f}]: search longer or raise "
                "search.arch_lr"
            )
    model_name = str(metas["pruned"]["model"])
    full = Shape.from_dict(metas["teacher"]["shape"])
    if metas["teacher"]["model"] != model_name:
        from tasprune.models import get_model_spec

        full = get_model_spec(model_name).full_shape()
    small = Shape.from_dict(metas["pruned"]["shape"])

    plots: dict[str, str] = {}
    # A network without width (or depth) choices has nothing to draw there: say so instead.
    for name, choices, draw, kind in (
        ("widths", full.widths, plot_widths, "width"),
        ("depths", full.depths, plot_depths, "depth"),
    ):
        if choices:
            plots[name] = _save(draw(full, small, model_name), out, name)
        else:
            notes.append(f"{name}.png skipped: {model_name} has no {kind} choices")
    if search_rows:
        metric = budget.metric if budget is not None else "flops"
        plots["search_trajectory"] = _save(
            plot_search(search_rows, band, metric), out, "search_trajectory"
        )
    else:
        notes.append("search_trajectory.png skipped: no search/history.jsonl rows")
    histories = {role: JsonlLogger(out / folder / "history.jsonl").rows() for role, folder in ROLES}
    histories = {
        role: rows
        for role, rows in histories.items()
        if any(has_value(r, "test_top1") for r in rows)
    }
    if histories:
        plots["training"] = _save(plot_training(histories), out, "training")
        notes += [
            f"training.png has no {role} curve: {folder}/history.jsonl is missing or empty"
            for role, folder in ROLES
            if role not in histories
        ]
    else:
        notes.append("training.png skipped: no teacher/ or student/ history.jsonl with test top-1")

    load = _load_average()
    cores = os.cpu_count() or 1
    if load is not None and load > cores:
        notes.append(
            f"latency measured on a busy machine (1-minute load average {load:.1f} on {cores} "
            "cores): the ratios hold better than the milliseconds; rerun `tasprune report DIR` "
            "on a quiet machine for absolute latencies"
        )
    report: dict[str, Any] = {
        "model": model_name,
        "dataset": metas["pruned"].get("dataset"),
        "input_size": list(metas["pruned"]["input_size"]),
        "num_classes": int(metas["pruned"].get("num_classes", 10)),
        "teacher": teacher,
        "pruned": pruned,
        "search": search,
        "latency": {
            "device": str(dev),
            "threads": torch.get_num_threads(),
            "repeats": repeats,
            "batches": batches,
            "statistic": "median",
            "load_average_1min": load,
            "cpu_count": cores,
        },
        "plots": plots,
        "notes": notes,
    }
    text = markdown(report)
    atomic_write_text(out / "report.md", text, error_cls=ReportError)
    if tensorboard:
        _to_tensorboard(out, report, text)
    # report.json last: it marks the report stage as finished.
    atomic_write_text(
        out / "report.json", json.dumps(report, indent=2) + "\n", error_cls=ReportError
    )
    for note in notes:
        logger.info("report: %s", note)
    return report
