"""Rendering a protocol result (the JSON the runner wrote) as the markdown table."""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)


def _fmt(v: Any, spec: str = ".2f") -> str:
    return format(v, spec) if isinstance(v, int | float) else "-"


def format_markdown(result: dict[str, Any]) -> str:
    """The results as a markdown page: tables, targets, machine and wall times."""
    p = result["protocol"]
    batches = [str(b) for b in p["latency_batches"]]
    teacher = result["teacher"]
    rows = result["methods"]
    lines = [
        f"# Benchmark `{p['name']}`",
        "",
        p.get("description") or "",
        "",
        f"Model `{result['recipe']['model']}` on `{result['recipe']['data']['name']}`, FLOPs "
        f"budget {result['budget']['flops_ratio']} (band [{result['budget']['band'][0]:.3f}, "
        f"{result['budget']['band'][1]:.3f}] x unpruned), seeds {p['seeds']}. "
        f"One teacher, {teacher['note']}. Every student has the same distill schedule "
        f"({result['recipe']['distill']['train']['epochs']} epochs, init "
        f"`{result['recipe']['distill']['init']}` except l1_kd).",
        "",
        "## Accuracy and cost",
        "",
        "| method | top-1 % (mean ± std) | per seed | MFLOPs | FLOPs ratio | params (M) |",
        "|---|---|---|---|---|---|",
        f"| teacher (unpruned) | {_fmt(teacher['top1'])} | - | {_fmt(teacher['mflops'])} | "
        f"1.000 | {_fmt(teacher['params_m'], '.3f')} |",
    ]
    for m, row in rows.items():
        per = ", ".join(_fmt(v) for v in row["top1_per_seed"].values())
        lines.append(
            f"| {m} | {_fmt(row['top1_mean'])} ± {_fmt(row['top1_std'])} | {per} | "
            f"{_fmt(row['mflops_mean'])} | {_fmt(row['flops_ratio_mean'], '.3f')} | "
            f"{_fmt(row['params_m_mean'], '.3f')} |"
        )
    lat_head = " | ".join(f"CPU b{b} ms | ORT b{b} ms" for b in batches)
    ratio_head = " | ".join(f"lat ratio b{b} (CPU/ORT) | lat/FLOPs b{b} (CPU/ORT)" for b in batches)
    lines += [
        "",
        "## Latency (median ms per batch; mean over seeds of each seed's network)",
        "",
        f"| method | {lat_head} | {ratio_head} |",
        "|---|" + "---|" * (4 * len(batches)),
    ]

    def lat_cells(lat: dict[str, dict[str, Any]]) -> str:
        return " | ".join(
            f"{_fmt(lat['eager'].get(b), '.3f')} | {_fmt(lat['onnx'].get(b), '.3f')}"
            for b in batches
        )

    blank_ratio = " | ".join("1.000 / 1.000 | 1.000 / 1.000" for _ in batches)
    lines.append(f"| teacher | {lat_cells(teacher['latency_ms'])} | {blank_ratio} |")
    for m, row in rows.items():
        rat = " | ".join(
            f"{_fmt(row['latency_ratio']['eager'].get(b), '.3f')} / "
            f"{_fmt(row['latency_ratio']['onnx'].get(b), '.3f')} | "
            f"{_fmt(row['latency_over_flops_ratio']['eager'].get(b), '.3f')} / "
            f"{_fmt(row['latency_over_flops_ratio']['onnx'].get(b), '.3f')}"
            for b in batches
        )
        lines.append(f"| {m} | {lat_cells(row['latency_ms'])} | {rat} |")
    searches = result.get("searches") or {}
    if searches:
        lines += [
            "",
            "## Searches (last epoch; normalised entropy, 0 = decided)",
            "",
            "| seed | epochs | entropy mean | entropy max | kept shape | its FLOPs ratio |",
            "|---|---:|---:|---:|---|---:|",
        ]
        for seed, srow in searches.items():
            lines.append(
                f"| {seed} | {srow.get('epochs', '-')} | {_fmt(srow.get('entropy_mean'), '.3f')} | "
                f"{_fmt(srow.get('entropy_max'), '.3f')} | {srow.get('source') or '-'} | "
                f"{_fmt(srow.get('flops_ratio'), '.3f')} |"
            )
        lines += [
            "",
            "Seed agreement of the kept shapes (mean over pairs of seeds of the fraction of conv "
            f"widths and stage depths that are equal; 1 = the same shape): "
            f"{_fmt(result.get('search_agreement'))}",
        ]
    lines += ["", "## Targets", "", "| target | status | numbers |", "|---|---|---|"]
    for t in result["targets"]:
        lines.append(f"| {t['target']} | **{t['status']}** | {t['detail']} |")
    mach = result["machine"]
    wall = result["wall_s"]
    lines += [
        "",
        "## Machine and wall time",
        "",
        f"- CPU: {mach['cpu_model']} ({mach['cpu_count']} logical cores), torch "
        f"{mach['torch_version']} (intra-op threads: {mach['torch_threads']}; latency: "
        f"{mach['latency_threads']}); onnxruntime {mach['onnxruntime_version']}; load "
        f"average at start {result['load_average_start']}, at end {mach['load_average']}",
        f"- Command: `{result['command']}`",
        "- Stage wall times (s, the invocation that finished each step): "
        + ", ".join(f"{k} {v:.0f}" for k, v in wall["stages"].items()),
        f"- Sum of stages: {wall['stages_total']:.0f} s ({wall['stages_total'] / 60:.1f} min); "
        f"this invocation: {wall['invocation']:.0f} s",
        f"- Author's estimate: {p.get('estimate') or '-'}",
    ]
    for note in result.get("notes", []):
        lines.append(f"- Note: {note}")
    return "\n".join(lines) + "\n"
