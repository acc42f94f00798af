"""The run report's figures: conv widths and stage depths (unpruned vs pruned), the search
trajectory and the training curves, drawn from the run folder's shapes and history rows.

Each ``plot_*`` returns a pyplot-free Agg figure (no global state, safe in threads and
headless); `tasprune.report` writes them as PNG files.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from tasprune.shape import Shape

__all__ = [
    "DPI",
    "PLOTS",
    "finite",
    "has_value",
    "plot_depths",
    "plot_search",
    "plot_training",
    "plot_widths",
]


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


def finite(value: Any) -> float | None:
    """A history or metrics value as a float; None when it is missing or not finite."""
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def _new_figure(width: float, height: float, rows: int = 1) -> tuple[Any, Any]:
    """A pyplot-free Agg figure and its axes (one, or ``rows`` sharing the x axis)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    axes = fig.subplots(rows, 1, sharex=True) if rows > 1 else fig.add_subplot()
    return fig, axes


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


def plot_widths(full: Shape, pruned: Shape, model: str) -> Any:
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
    return fig


def plot_depths(full: Shape, pruned: Shape, model: str) -> Any:
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
    return fig


def plot_search(
    rows: list[dict[str, Any]],
    band: tuple[float, float] | None,
    metric: str = "flops",
) -> Any:
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
    ratio = [finite(r.get(f"{metric}_ratio")) for r in rows]
    (line,) = top.plot(epochs, ratio, "o-", color=PRUNED_COLOR, ms=ms, label=f"{label} ratio")
    handles.insert(0, line)
    top.set_ylabel(f"{label} ratio (pruned / unpruned)")
    top.set_ylim(0, 1.3)  # headroom above 1.0 for the legend row
    top.set_yticks([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    top.grid(alpha=0.3)
    acc = [finite(r.get("valid_top1")) for r in rows]
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

    ent = [finite(r.get("entropy_mean")) for r in rows]
    handles = []
    (e_line,) = bottom.plot(
        epochs, ent, "o-", color="#9467bd", ms=ms * 0.75, label="mean over choices"
    )
    handles.append(e_line)
    ent_max = [finite(r.get("entropy_max")) for r in rows]
    if any(e is not None for e in ent_max):
        (m_line,) = bottom.plot(epochs, ent_max, ":", color="#9467bd", label="max over choices")
        handles.append(m_line)
    bottom.set_ylabel("entropy (normalised, 1 = uniform)")
    known_ent = [e for e in ent + ent_max if e is not None]
    bottom.set_ylim(0, max(known_ent, default=1.0) * 1.15 or 1.0)
    bottom.grid(alpha=0.3)
    tau = [finite(r.get("tau")) for r in rows]
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
    return fig


def plot_training(histories: dict[str, list[dict[str, Any]]]) -> Any:
    """Test top-1 per epoch (solid) and train top-1 (dashed) of teacher and student."""
    fig, ax = _new_figure(8.0, 4.5)
    colors = {"teacher": TEACHER_COLOR, "pruned": PRUNED_COLOR}
    for role, rows in histories.items():
        test = [
            (int(r["epoch"]) + 1, float(r["test_top1"])) for r in rows if has_value(r, "test_top1")
        ]
        train = [
            (int(r["epoch"]) + 1, float(r["train_top1"]))
            for r in rows
            if has_value(r, "train_top1")
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
        [r["epoch"] + 1 for rows in histories.values() for r in rows if has_value(r, "train_top1")],
    )
    ax.set_xlabel("epoch")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("Training: top-1 per epoch, teacher vs pruned student")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9, loc="lower right")
    return fig


def has_value(row: dict[str, Any], key: str) -> bool:
    """Whether a history row of an epoch holds a finite ``key``."""
    return isinstance(row.get("epoch"), int) and finite(row.get(key)) is not None
