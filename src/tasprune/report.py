"""The report of a run folder: teacher vs pruned accuracy, exact cost, CPU latency, plots.

Reads only what the pipeline wrote (``teacher/``, ``search/``, ``student/``, ``recipe.yaml``)
and writes ``DIR/report.json`` (written last: it is the stage's completion marker),
``DIR/report.md`` and ``DIR/plots/{widths,depths,search_trajectory,training}.png``. Both
networks are rebuilt from their ``model.pt`` (weights-only load), so FLOPs and params are the
exact ones of the stored shapes and the latency is that of the real, physically smaller net.
Optional inputs that are absent (no search history when the shape was given, no training
history of an imported teacher, no depth choices in a network of plain convs) skip their part
with a note instead of failing.
"""

from __future__ import annotations

import io
import json
import logging
import math
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
from tasprune.errors import TaspruneError
from tasprune.export import export_model, load_exportable
from tasprune.latency import LatencySettings, measure
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

__all__ = ["PLOTS", "ReportError", "format_table", "write_report"]

ROLES: tuple[tuple[str, str], ...] = (("teacher", "teacher"), ("pruned", "student"))
PLOTS: dict[str, str] = {
    "widths": "out-channels of every conv: unpruned (grey) vs pruned (blue); "
    "hatched red = conv of a removed block",
    "depths": "residual blocks per stage: unpruned vs pruned",
    "search_trajectory": "search: the budget's ratio (FLOPs or latency) of the argmax shape per epoch with the target "
    "band shaded, validation top-1 (right axis), and mean choice entropy below",
    "training": "test top-1 per epoch of the teacher and the distilled pruned network "
    "(dashed: train top-1)",
}
DPI = 120
TEACHER_COLOR = "#7f7f7f"
PRUNED_COLOR = "#1f77b4"
SKIPPED_COLOR = "#d62728"


class ReportError(TaspruneError):
    """A run folder lacks what the report needs, or its contents disagree."""


# --------------------------------------------------------------------------- reading


def _final_metrics(folder: Path) -> dict[str, Any]:
    """``final.json``'s metrics (the engine nests them under "metrics"), or {} if absent."""
    final = read_json_object(folder / "final.json") or {}
    metrics = final.get("metrics", final)
    return metrics if isinstance(metrics, dict) else {}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


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
        section["shape_flops_ratio"] = _number(data.get("flops_ratio"))
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
                "final_flops_ratio": _number(last.get("flops_ratio")),
                "final_valid_top1": _number(last.get("valid_top1")),
                "final_entropy": _number(last.get("entropy_mean")),
                "final_tau": _number(last.get("tau")),
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
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(report entry, meta) of one stored network: cost, accuracy and latency."""
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
        "top1": _number(metrics.get("top1")),
        "top5": _number(metrics.get("top5")),
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
    try:
        onnx_file = export_model(model_file, "onnx", onnx_dir / f"{role}.onnx")
        for b in batches:
            settings = LatencySettings("onnxruntime", b, None, repeats, warmup)
            stats = measure(model, size, settings, onnx_file=onnx_file)
            onnx_latency[str(b)] = stats["median_ms"]
    except TaspruneError as err:
        notes.append(f"ONNX latency of the {role} skipped: {err}")
    entry["onnx_latency_ms"] = onnx_latency
    logger.info(
        "%s: %.2f MFLOPs, %.3f M params, latency %s ms (onnx %s ms)",
        role,
        flops / 1e6,
        params / 1e6,
        {k: round(v, 3) for k, v in latency.items()},
        {k: round(v, 3) for k, v in onnx_latency.items()},
    )
    return entry, meta


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


def _new_figure(width: float, height: float, rows: int = 1) -> tuple[Any, Any]:
    """A pyplot-free Agg figure (no global state, safe in threads and headless)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    axes = fig.subplots(rows, 1, sharex=True) if rows > 1 else fig.add_subplot()
    return fig, axes


def _save(fig: Any, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    atomic_write_bytes(path, buf.getvalue(), error_cls=ReportError)
    return path


def _block_of(conv: str, depths: dict[str, int]) -> tuple[str, int] | None:
    """("layer2", 3) for "layer2.3.conv1"; None for convs outside any block (the stem)."""
    parts = conv.split(".")
    if len(parts) >= 3 and parts[0] in depths and parts[1].isdigit():
        return parts[0], int(parts[1])
    return None


def _epoch_axis(ax: Any, epochs: Sequence[int]) -> None:
    """Whole-number epoch ticks; a lone epoch gets a little room on both sides."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    if len(set(epochs)) == 1:
        ax.set_xlim(epochs[0] - 0.5, epochs[0] + 0.5)


def plot_widths(full: Shape, pruned: Shape, path: Path, model: str) -> Path:
    """Bar per conv: unpruned width behind, pruned width in front, removed blocks hatched."""
    names = list(full.widths)
    n = len(names)
    x = list(range(n))
    skipped = []
    for name in names:
        block = _block_of(name, pruned.depths)
        skipped.append(block is not None and block[1] >= pruned.depths[block[0]])
    fig, ax = _new_figure(min(max(8.0, 0.28 * n + 2.0), 40.0), 5.0)
    ax.bar(x, [full.widths[k] for k in names], width=0.8, color="#d9d9d9", label="unpruned")
    kept_x = [i for i in x if not skipped[i]]
    ax.bar(
        kept_x,
        [pruned.widths[names[i]] for i in kept_x],
        width=0.55,
        color=PRUNED_COLOR,
        label="pruned",
    )
    gone_x = [i for i in x if skipped[i]]
    if gone_x:
        ax.bar(
            gone_x,
            [full.widths[names[i]] for i in gone_x],
            width=0.8,
            facecolor="none",
            edgecolor=SKIPPED_COLOR,
            hatch="///",
            linewidth=0.8,
            label="removed block (depth pruned)",
        )
    # Stage boundaries and names, so a long row of convs stays readable.
    stage_of = [(_block_of(k, full.depths) or ("", 0))[0] for k in names]
    top = max(full.widths.values())
    for i in range(1, n):
        if stage_of[i] != stage_of[i - 1]:
            ax.axvline(i - 0.5, color="#555555", linestyle=":", linewidth=1)
    for stage in dict.fromkeys(s for s in stage_of if s):
        idx = [i for i, s in enumerate(stage_of) if s == stage]
        kept_blocks = f"{pruned.depths[stage]}/{full.depths[stage]}"
        # Narrow stages (few convs) get a two-line label so neighbours do not overlap.
        label = f"{stage}: {kept_blocks} blocks" if len(idx) >= 5 else f"{stage}\n{kept_blocks}"
        ax.text((idx[0] + idx[-1]) / 2, top * 1.03, label, ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, top * 1.2)
    ax.set_xlim(-0.7, n - 0.3)
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=90, fontsize=8 if n <= 60 else 6)
    ax.set_ylabel("output channels")
    kept = sum(pruned.widths[names[i]] for i in kept_x)
    ax.set_title(
        f"{model}: conv widths, unpruned vs pruned "
        f"({kept}/{sum(full.widths.values())} channels kept)"
    )
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.06), ncol=3, fontsize=9, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_depths(full: Shape, pruned: Shape, path: Path, model: str) -> Path:
    """Grouped bars: blocks per stage, unpruned vs pruned, counts written on the bars."""
    from matplotlib.ticker import MaxNLocator

    stages = list(full.depths)
    x = list(range(len(stages)))
    fig, ax = _new_figure(max(5.0, 0.9 * len(stages) + 2.5), 4.0)
    for offset, shape, color, label in (
        (-0.2, full, "#bdbdbd", "unpruned"),
        (0.2, pruned, PRUNED_COLOR, "pruned"),
    ):
        values = [shape.depths[s] for s in stages]
        bars = ax.bar([i + offset for i in x], values, width=0.4, color=color, label=label)
        ax.bar_label(bars, fontsize=9, padding=2)
    ax.set_xticks(x)
    ax.set_xticklabels(stages)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(0, max(full.depths.values()) * 1.15)
    ax.set_ylabel("blocks")
    ax.set_xlabel("stage")
    ax.set_title(
        f"{model}: depth per stage ({sum(pruned.depths.values())}/"
        f"{sum(full.depths.values())} blocks kept)"
    )
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.08), ncol=2, fontsize=9, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_search(
    rows: list[dict[str, Any]],
    band: tuple[float, float] | None,
    path: Path,
    metric: str = "flops",
) -> Path:
    """The budget's ratio (``metric``: flops | latency; band shaded) + valid top-1 on a twin
    axis; entropy (and tau) below."""
    label = "FLOPs" if metric == "flops" else metric
    epochs = [int(r["epoch"]) + 1 for r in rows]
    ms = 4 if len(rows) <= 40 else 0  # point markers only while they stay distinguishable
    fig, (top, bottom) = _new_figure(8.0, 6.5, rows=2)
    handles = []
    if band is not None:
        handles.append(
            top.axhspan(band[0], band[1], color="#2ca02c", alpha=0.18, label="target band")
        )
        top.axhline(band[1], color="#2ca02c", linestyle="--", linewidth=1)
    ratio = [_number(r.get(f"{metric}_ratio")) for r in rows]
    (line,) = top.plot(epochs, ratio, "o-", color=PRUNED_COLOR, ms=ms, label=f"{label} ratio")
    handles.insert(0, line)
    top.set_ylabel(f"{label} ratio (pruned / unpruned)")
    top.set_ylim(0, 1.3)  # headroom above 1.0 for the legend row
    top.set_yticks([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    top.grid(alpha=0.3)
    acc = [_number(r.get("valid_top1")) for r in rows]
    if any(a is not None for a in acc):
        twin = top.twinx()
        (acc_line,) = twin.plot(
            epochs, acc, "s--", color="#ff7f0e", ms=ms * 0.75, label="valid top-1 (right)"
        )
        twin.set_ylabel("valid top-1 (%)", color="#ff7f0e")
        known = [a for a in acc if a is not None]
        lo, hi = min(known), max(known)
        pad = max(hi - lo, 1.0)
        twin.set_ylim(lo - 0.05 * pad, hi + 0.35 * pad)  # same headroom as the left axis
        handles.append(acc_line)
    top.legend(handles=handles, loc="upper center", ncol=3, fontsize=9, framealpha=0.9)
    top.set_title("Search trajectory: cost and accuracy of the argmax shape per epoch")

    ent = [_number(r.get("entropy_mean")) for r in rows]
    handles = []
    (e_line,) = bottom.plot(
        epochs, ent, "o-", color="#9467bd", ms=ms * 0.75, label="mean over choices"
    )
    handles.append(e_line)
    ent_max = [_number(r.get("entropy_max")) for r in rows]
    if any(e is not None for e in ent_max):
        (m_line,) = bottom.plot(epochs, ent_max, ":", color="#9467bd", label="max over choices")
        handles.append(m_line)
    bottom.set_ylabel("entropy (normalised, 1 = uniform)")
    known_ent = [e for e in ent + ent_max if e is not None]
    bottom.set_ylim(0, max(known_ent, default=1.0) * 1.15 or 1.0)
    bottom.grid(alpha=0.3)
    tau = [_number(r.get("tau")) for r in rows]
    if any(t is not None for t in tau):
        twin_b = bottom.twinx()
        (t_line,) = twin_b.plot(
            epochs, tau, ".-", color="#8c564b", ms=ms, alpha=0.7, label="tau (right)"
        )
        twin_b.set_ylabel("Gumbel temperature tau", color="#8c564b")
        handles.append(t_line)
    bottom.legend(handles=handles, loc="upper right", fontsize=9, framealpha=0.9)
    bottom.set_xlabel("search epoch")
    _epoch_axis(bottom, epochs)
    bottom.set_title("Architecture distribution: entropy (lower = more decided)")
    return _save(fig, path)


def plot_training(histories: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    """Test top-1 per epoch (solid) and train top-1 (dashed) of teacher and student."""
    fig, ax = _new_figure(8.0, 4.5)
    colors = {"teacher": TEACHER_COLOR, "pruned": PRUNED_COLOR}
    for role, rows in histories.items():
        test = [(int(r["epoch"]) + 1, float(r["test_top1"])) for r in rows if _has(r, "test_top1")]
        train = [
            (int(r["epoch"]) + 1, float(r["train_top1"])) for r in rows if _has(r, "train_top1")
        ]
        label = "teacher (unpruned)" if role == "teacher" else "pruned (student)"
        if test:
            ax.plot(*zip(*test, strict=True), "o-", color=colors[role], ms=3, label=f"{label} test")
        if train:
            ax.plot(
                *zip(*train, strict=True),
                "--",
                color=colors[role],
                alpha=0.6,
                label=f"{label} train",
            )
    _epoch_axis(
        ax,
        [r["epoch"] + 1 for rows in histories.values() for r in rows if _has(r, "train_top1")],
    )
    ax.set_xlabel("epoch")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("Training: top-1 per epoch, teacher vs pruned student")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9, loc="lower right")
    return _save(fig, path)


def _has(row: dict[str, Any], key: str) -> bool:
    return isinstance(row.get("epoch"), int) and _number(row.get(key)) is not None


# --------------------------------------------------------------------------- markdown


def _fmt(value: Any, spec: str) -> str:
    return format(value, spec) if isinstance(value, int | float) else "-"


def format_table(report: dict[str, Any]) -> str:
    """Markdown table, teacher vs pruned: accuracy, MFLOPs, params, eager and ONNX latency."""
    t, p = report.get("teacher") or {}, report.get("pruned") or {}

    def diff(key: str) -> str:
        a, b = t.get(key), p.get(key)
        if isinstance(a, int | float) and isinstance(b, int | float):
            return f"{b - a:+.2f} pt"
        return "-"

    def ratio(a: Any, b: Any) -> str:
        if isinstance(a, int | float) and isinstance(b, int | float) and a:
            return f"{b / a:.3f}x"
        return "-"

    rows = [
        ("top-1 (%)", _fmt(t.get("top1"), ".2f"), _fmt(p.get("top1"), ".2f"), diff("top1")),
        ("top-5 (%)", _fmt(t.get("top5"), ".2f"), _fmt(p.get("top5"), ".2f"), diff("top5")),
    ]
    for key, label, scale, spec in (
        ("flops", "MFLOPs (MACs)", 1e6, ".2f"),
        ("params", "params (M)", 1e6, ".4f"),
    ):
        a, b = t.get(key), p.get(key)
        rows.append(
            (
                label,
                _fmt(a / scale if a is not None else None, spec),
                _fmt(b / scale if b is not None else None, spec),
                ratio(a, b),
            )
        )
    for key, label in (("latency_ms", "latency"), ("onnx_latency_ms", "ONNX Runtime latency")):
        tl, pl = t.get(key) or {}, p.get(key) or {}
        for batch in sorted(set(tl) | set(pl), key=lambda k: int(k)):
            a, b = tl.get(batch), pl.get(batch)
            rows.append(
                (f"{label}, batch {batch} (ms)", _fmt(a, ".3f"), _fmt(b, ".3f"), ratio(a, b))
            )
    lines = ["| | teacher | pruned | pruned vs teacher |", "|---|---:|---:|---:|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines)


def _markdown(report: dict[str, Any]) -> str:
    lat = report.get("latency") or {}
    lines = [
        f"# TAS pruning report: {report.get('model')} on {report.get('dataset')}",
        "",
        format_table(report),
        "",
        f"Latency: median of {lat.get('repeats')} timed runs per batch on {lat.get('device')} "
        f"(eager PyTorch) and CPU (ONNX Runtime), {lat.get('threads')} threads. "
        "Ratios are pruned / teacher; accuracy changes are in percentage points.",
    ]
    search = report.get("search") or {}
    if search:
        band = search.get("band")
        band_txt = f"[{band[0]:.3f}, {band[1]:.3f}]" if band else "unknown"
        lines += [
            "",
            "## Search",
            "",
            f"- target {search.get('metric', 'flops').replace('flops', 'FLOPs')} ratio "
            f"{_fmt(search.get('target_ratio'), '.3f')}, band {band_txt}; "
            f"pruned FLOPs ratio {_fmt((report.get('pruned') or {}).get('flops_ratio'), '.3f')}",
            f"- {search.get('epochs', 0)} search epochs ({search.get('epochs_in_band', 0)} in the "
            f"band), final mean entropy {_fmt(search.get('final_entropy'), '.3f')}",
            f"- kept shape: {search.get('kept_shape_source')}",
        ]
        lb = search.get("latency_budget")
        if lb:
            lines.append(
                f"- latency budget ({lb.get('runtime')}, {lb.get('threads')} thread(s), batch "
                f"{lb.get('batch')}): predicted ratio {_fmt(lb.get('predicted_ratio'), '.3f')} "
                f"({_fmt(lb.get('predicted_ms'), '.2f')} ms), measured "
                f"{_fmt(lb.get('measured_ratio'), '.3f')} ({_fmt(lb.get('measured_ms'), '.2f')} "
                f"of {_fmt(lb.get('teacher_measured_ms'), '.2f')} ms)"
            )
    plots = report.get("plots") or {}
    if plots:
        lines += ["", "## Plots", ""]
        for name, rel in plots.items():
            lines.append(f"- [{rel}]({rel}): {PLOTS[name]}")
    notes = report.get("notes") or []
    if notes:
        lines += ["", "## Notes", ""]
        lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


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
        for kind in ("latency_ms", "onnx_latency_ms", "latency_ratio", "onnx_latency_ratio"):
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
) -> dict[str, Any]:
    """Write ``report.json``, ``report.md`` and ``plots/*.png`` for a finished run; return the
    report dict. With ``tensorboard`` the figures also go to ``run_dir/tensorboard/report``
    (scalars ``teacher/*``, ``pruned/*``, the report table as text, the plots as images).

    ``device`` is where eager latency is measured (ONNX Runtime always runs on CPU);
    ``latency_batches`` are the batch sizes timed, each the median of ``repeats`` runs.
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
                role, out / folder / "model.pt", dev, batches, repeats, Path(tmp), notes
            )
            entries[role], metas[role] = entry, meta
    teacher, pruned = entries["teacher"], entries["pruned"]
    if metas["teacher"]["model"] != metas["pruned"]["model"]:
        notes.append(
            f"teacher is {metas['teacher']['model']} but the student is "
            f"{metas['pruned']['model']}; widths/depths are drawn against the student's family"
        )
    pruned["flops_ratio"] = pruned["flops"] / teacher["flops"]
    pruned["params_ratio"] = pruned["params"] / teacher["params"]
    pruned["latency_ratio"] = _ratios(pruned["latency_ms"], teacher["latency_ms"])
    pruned["onnx_latency_ratio"] = _ratios(pruned["onnx_latency_ms"], teacher["onnx_latency_ms"])

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
                f"the pruned {budget.label} ratio {_fmt(achieved, '.3f')} is outside the "
                f"target band [{band[0]:.3f}, {band[1]:.3f}]: search longer or raise "
                "search.arch_lr"
            )
    model_name = str(metas["pruned"]["model"])
    full = Shape.from_dict(metas["teacher"]["shape"])
    if metas["teacher"]["model"] != model_name:
        from tasprune.models import get_model_spec

        full = get_model_spec(model_name).full_shape()
    small = Shape.from_dict(metas["pruned"]["shape"])

    plot_dir = out / "plots"
    plots: dict[str, str] = {}
    # A network without width (or depth) choices has nothing to draw there: say so instead.
    for name, choices, draw, kind in (
        ("widths", full.widths, plot_widths, "width"),
        ("depths", full.depths, plot_depths, "depth"),
    ):
        if choices:
            draw(full, small, plot_dir / f"{name}.png", model_name)
            plots[name] = f"plots/{name}.png"
        else:
            notes.append(f"{name}.png skipped: {model_name} has no {kind} choices")
    if search_rows:
        metric = budget.metric if budget is not None else "flops"
        plot_search(search_rows, band, plot_dir / "search_trajectory.png", metric)
        plots["search_trajectory"] = "plots/search_trajectory.png"
    else:
        notes.append("search_trajectory.png skipped: no search/history.jsonl rows")
    histories = {role: JsonlLogger(out / folder / "history.jsonl").rows() for role, folder in ROLES}
    histories = {
        role: rows for role, rows in histories.items() if any(_has(r, "test_top1") for r in rows)
    }
    if histories:
        plot_training(histories, plot_dir / "training.png")
        plots["training"] = "plots/training.png"
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
    markdown = _markdown(report)
    atomic_write_text(out / "report.md", markdown, error_cls=ReportError)
    if tensorboard:
        _to_tensorboard(out, report, markdown)
    # report.json last: it marks the report stage as finished.
    atomic_write_text(
        out / "report.json", json.dumps(report, indent=2) + "\n", error_cls=ReportError
    )
    for note in notes:
        logger.info("report: %s", note)
    return report
