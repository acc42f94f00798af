"""The report's tables: ``format_table`` (teacher vs pruned) and the whole ``report.md``,
rendered from the report dict `tasprune.report` measured; nothing here measures."""

from __future__ import annotations

from typing import Any

from tasprune.plots import PLOTS

__all__ = ["fmt", "format_table", "markdown"]


def fmt(value: Any, spec: str) -> str:
    return format(value, spec) if isinstance(value, int | float) else "-"


def format_table(report: dict[str, Any]) -> str:
    """Markdown table, teacher vs pruned: accuracy, MFLOPs, params, eager and ONNX latency
    (and the int8 ONNX model's top-1 and latency when measured)."""
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
        ("top-1 (%)", fmt(t.get("top1"), ".2f"), fmt(p.get("top1"), ".2f"), diff("top1")),
        ("top-5 (%)", fmt(t.get("top5"), ".2f"), fmt(p.get("top5"), ".2f"), diff("top5")),
    ]
    for key, label, scale, spec in (
        ("flops", "MFLOPs (MACs)", 1e6, ".2f"),
        ("params", "params (M)", 1e6, ".4f"),
    ):
        a, b = t.get(key), p.get(key)
        rows.append(
            (
                label,
                fmt(a / scale if a is not None else None, spec),
                fmt(b / scale if b is not None else None, spec),
                ratio(a, b),
            )
        )
    ti, pi = t.get("int8") or {}, p.get("int8") or {}
    if ti or pi:
        n = ti.get("images") or pi.get("images")
        for key, label in (("onnx_fp32_top1", "ONNX fp32"), ("top1", "ONNX int8")):
            a, b = ti.get(key), pi.get(key)
            delta = f"{b - a:+.2f} pt" if isinstance(a, float) and isinstance(b, float) else "-"
            rows.append(
                (f"{label} top-1, {n} test images (%)", fmt(a, ".2f"), fmt(b, ".2f"), delta)
            )
    for key, label in (
        ("latency_ms", "latency"),
        ("onnx_latency_ms", "ONNX Runtime latency"),
        ("int8_latency_ms", "ONNX Runtime int8 latency"),
    ):
        tl, pl = t.get(key) or {}, p.get(key) or {}
        for batch in sorted(set(tl) | set(pl), key=lambda k: int(k)):
            a, b = tl.get(batch), pl.get(batch)
            rows.append((f"{label}, batch {batch} (ms)", fmt(a, ".3f"), fmt(b, ".3f"), ratio(a, b)))
    lines = ["| | teacher | pruned | pruned vs teacher |", "|---|---:|---:|---:|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
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
    int8 = (report.get("pruned") or {}).get("int8") or (report.get("teacher") or {}).get("int8")
    if int8:
        lines += [
            "",
            "int8: each fp32 ONNX model quantised as `tasprune export --int8` quantises it "
            f"(ONNX Runtime static QDQ, calibrated on {int8.get('calibration')}); its top-1 and "
            f"the fp32 ONNX model's are on {int8.get('images')} seeded test images, not the "
            "whole test set of the top-1 row.",
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
            f"{fmt(search.get('target_ratio'), '.3f')}, band {band_txt}; "
            f"pruned FLOPs ratio {fmt((report.get('pruned') or {}).get('flops_ratio'), '.3f')}",
            f"- {search.get('epochs', 0)} search epochs ({search.get('epochs_in_band', 0)} in the "
            f"band), final mean entropy {fmt(search.get('final_entropy'), '.3f')}",
            f"- kept shape: {search.get('kept_shape_source')}",
        ]
        lb = search.get("latency_budget")
        if lb:
            lines.append(
                f"- latency budget ({lb.get('runtime')}, {lb.get('threads')} thread(s), batch "
                f"{lb.get('batch')}): predicted ratio {fmt(lb.get('predicted_ratio'), '.3f')} "
                f"({fmt(lb.get('predicted_ms'), '.2f')} ms), measured "
                f"{fmt(lb.get('measured_ratio'), '.3f')} ({fmt(lb.get('measured_ms'), '.2f')} "
                f"of {fmt(lb.get('teacher_measured_ms'), '.2f')} ms)"
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
