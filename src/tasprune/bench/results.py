"""A protocol's results from its run folder: per-method rows (top-1 mean and std over seeds,
cost, latency ratios against the teacher), the targets with PASS/MISS and their numbers, and
how each seed's search ended (entropy, kept shape, seed agreement)."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tasprune.bench.protocol import LATENCY_SLACK, METHODS, TARGETS, TOP1_MARGIN, Protocol
from tasprune.budget import Budget
from tasprune.checkpoint import load_model_checkpoint
from tasprune.config import Recipe
from tasprune.cost import model_cost
from tasprune.shape import Shape
from tasprune.utils import JsonlLogger, read_json_object

__all__ = ["aggregate", "evaluate_targets", "searches", "shape_agreement", "shape_key"]


def shape_key(shape: dict[str, Any]) -> str:
    """A network's key in ``measure/latency.json``: its shape as canonical JSON."""
    return json.dumps(shape, sort_keys=True)


def _mean(xs: Sequence[float]) -> float | None:
    return float(statistics.fmean(xs)) if xs else None


def _std(xs: Sequence[float]) -> float | None:
    return float(statistics.stdev(xs)) if len(xs) >= 2 else None


def _latency_of(measure: dict[str, Any], shape: dict[str, Any], kind: str) -> dict[str, float]:
    node = measure["networks"].get(shape_key(shape)) or {}
    return {k: float(v) for k, v in (node.get(f"{kind}_ms") or {}).items()}


def aggregate(
    proto: Protocol, recipe: Recipe, root: Path, measure: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(teacher row, per-method rows) from the stored results and latencies."""
    p, r = proto, recipe
    _, tmeta = load_model_checkpoint(root / "teacher" / "model.pt")
    tfinal = read_json_object(root / "teacher" / "final.json") or {}
    tmetrics = tfinal.get("metrics") or {}
    size = tuple(int(x) for x in tmeta["input_size"])
    tflops, tparams = model_cost(r.model, None, (size[0], size[1], size[2]), tmeta["num_classes"])
    teacher: dict[str, Any] = {
        "top1": tmetrics.get("top1"),
        "mflops": tflops / 1e6,
        "params_m": tparams / 1e6,
        "latency_ms": {
            "eager": _latency_of(measure, tmeta["shape"], "eager"),
            "onnx": _latency_of(measure, tmeta["shape"], "onnx"),
        },
        "note": "trained once (teacher/) and reused as the KD teacher of every method and seed "
        "and as the network the L1 baseline prunes",
    }
    rows: dict[str, dict[str, Any]] = {}
    for method in p.methods:
        runs = {s: read_json_object(root / f"seed-{s}" / method / "result.json") for s in p.seeds}
        done = {s: v for s, v in runs.items() if v is not None}
        top1 = [float(v["top1"]) for v in done.values() if v.get("top1") is not None]
        ratios: dict[str, dict[str, list[float]]] = {"eager": {}, "onnx": {}}
        lats: dict[str, dict[str, list[float]]] = {"eager": {}, "onnx": {}}
        per_flops: dict[str, dict[str, list[float]]] = {"eager": {}, "onnx": {}}
        for v in done.values():
            for kind in ("eager", "onnx"):
                mine = _latency_of(measure, v["shape"], kind)
                ref = teacher["latency_ms"][kind]
                for b, ms in mine.items():
                    lats[kind].setdefault(b, []).append(ms)
                    if ref.get(b):
                        ratio = ms / ref[b]
                        ratios[kind].setdefault(b, []).append(ratio)
                        per_flops[kind].setdefault(b, []).append(ratio / v["flops_ratio"])
        rows[method] = {
            "description": METHODS[method],
            "seeds_done": sorted(done),
            "top1_mean": _mean(top1),
            "top1_std": _std(top1),
            "top1_per_seed": {str(s): v.get("top1") for s, v in done.items()},
            "mflops_mean": _mean([v["flops"] / 1e6 for v in done.values()]),
            "flops_ratio_mean": _mean([v["flops_ratio"] for v in done.values()]),
            "flops_ratio_per_seed": {str(s): v["flops_ratio"] for s, v in done.items()},
            "params_m_mean": _mean([v["params"] / 1e6 for v in done.values()]),
            "latency_ms": {k: {b: _mean(x) for b, x in d.items()} for k, d in lats.items()},
            "latency_ratio": {k: {b: _mean(x) for b, x in d.items()} for k, d in ratios.items()},
            "latency_over_flops_ratio": {
                k: {b: _mean(x) for b, x in d.items()} for k, d in per_flops.items()
            },
            "shapes": {str(s): v["shape"] for s, v in done.items()},
            "train_wall_s": {str(s): v.get("wall_s") for s, v in done.items()},
        }
    return teacher, rows


def _target(name: str, status: str, detail: str) -> dict[str, str]:
    return {"target": name, "status": status, "detail": detail}


def evaluate_targets(
    teacher: dict[str, Any],
    rows: dict[str, dict[str, Any]],
    budget: Budget,
    big_batch: int,
) -> list[dict[str, str]]:
    """PASS/MISS of every target, with the numbers (n/a when a method was not run)."""
    out: list[dict[str, str]] = []
    ratio = budget.ratio
    tas = rows.get("tas_kd")

    def outside(row: dict[str, Any]) -> list[str]:
        """Seeds whose network is outside the FLOPs band (then not 'the same FLOPs')."""
        return [s for s, r in row["flops_ratio_per_seed"].items() if not budget.contains_ratio(r)]

    t_top1 = teacher.get("top1")
    if tas is None or tas["top1_mean"] is None or t_top1 is None:
        out.append(_target(TARGETS[0], "n/a", "tas_kd or the teacher's top-1 is missing"))
    else:
        gap = t_top1 - tas["top1_mean"]
        ok = gap <= TOP1_MARGIN and budget.within_target(tas["flops_ratio_mean"])
        out.append(
            _target(
                TARGETS[0],
                "PASS" if ok else "MISS",
                f"teacher {t_top1:.2f}%, TAS+KD {tas['top1_mean']:.2f}% (gap {gap:+.2f} points, "
                f"allowed {TOP1_MARGIN}); FLOPs ratio {tas['flops_ratio_mean']:.3f} "
                f"(budget {ratio})",
            )
        )
    for idx, other in ((1, "uniform_kd"), (2, "random_kd"), (3, "l1_kd")):
        base = rows.get(other)
        if tas is None or base is None or tas["top1_mean"] is None or base["top1_mean"] is None:
            out.append(_target(TARGETS[idx], "n/a", f"tas_kd or {other} was not run"))
            continue
        margin = tas["top1_mean"] - base["top1_mean"]
        noise = math.hypot(tas["top1_std"] or 0.0, base["top1_std"] or 0.0)
        off = [f"{m} seed {s}" for m, row in (("tas_kd", tas), (other, base)) for s in outside(row)]
        warn = (
            f"; WARNING outside the band [{budget.band[0]:.3f}, {budget.band[1]:.3f}]: "
            f"{', '.join(off)}"
            if off
            else ""
        )
        out.append(
            _target(
                TARGETS[idx],
                "PASS" if margin > noise else "MISS",
                f"TAS+KD {tas['top1_mean']:.2f}% vs {other} {base['top1_mean']:.2f}% "
                f"(margin {margin:+.2f} points; seed std combined {noise:.2f}); FLOPs ratios "
                f"{tas['flops_ratio_mean']:.3f} vs {base['flops_ratio_mean']:.3f}{warn}",
            )
        )
    ce = rows.get("tas_nokd")
    if tas is None or ce is None or tas["top1_mean"] is None or ce["top1_mean"] is None:
        out.append(_target(TARGETS[4], "n/a", "tas_kd or tas_nokd was not run"))
    else:
        gain = tas["top1_mean"] - ce["top1_mean"]
        out.append(
            _target(
                TARGETS[4],
                "PASS" if gain >= 0 else "MISS",
                f"TAS+KD {tas['top1_mean']:.2f}% vs TAS CE-only {ce['top1_mean']:.2f}% "
                f"({gain:+.2f} points) on the same shapes",
            )
        )
    b = str(big_batch)
    value = tas["latency_over_flops_ratio"]["eager"].get(b) if tas else None
    if tas is None or value is None:
        out.append(_target(TARGETS[5], "n/a", f"no eager latency at batch {b} for tas_kd"))
    else:
        onnx = tas["latency_over_flops_ratio"]["onnx"].get(b)
        onnx_txt = f"; ONNX Runtime: {onnx:.3f}" if onnx is not None else ""
        out.append(
            _target(
                TARGETS[5],
                "PASS" if value <= LATENCY_SLACK else "MISS",
                f"latency ratio {tas['latency_ratio']['eager'][b]:.3f} / FLOPs ratio "
                f"{tas['flops_ratio_mean']:.3f} = {value:.3f} (allowed {LATENCY_SLACK}){onnx_txt}",
            )
        )
    return out


def searches(proto: Protocol, root: Path) -> tuple[dict[str, dict[str, Any]], float | None]:
    """Per seed, how its search ended: the last epoch's mean and max normalised entropy, the
    kept shape's source (last / best / projected) and FLOPs ratio; and the kept shapes'
    :func:`shape_agreement`. Empty and None without searches."""
    out: dict[str, dict[str, Any]] = {}
    kept: list[dict[str, Any]] = []
    for seed in proto.seeds:
        folder = root / f"seed-{seed}" / "search"
        if not (folder / "search_done.json").is_file():
            continue
        rows = JsonlLogger(folder / "history.jsonl").rows()
        last = rows[-1] if rows else {}
        shape, meta = Shape.load(folder / "shape.json")
        kept.append(shape.to_dict())
        out[str(seed)] = {
            "epochs": last["epoch"] + 1 if "epoch" in last else None,
            "entropy_mean": last.get("entropy_mean"),
            "entropy_max": last.get("entropy_max"),
            "source": meta.get("source"),
            "flops_ratio": meta.get("flops_ratio"),
        }
    return out, shape_agreement(kept)


def shape_agreement(shapes: Sequence[dict[str, Any]]) -> float | None:
    """Mean over pairs of shapes of the fraction of entries (every conv's width, every stage's
    depth) on which the two agree: 1.0 when all seeds kept the same shape. None for < 2."""
    fractions = []
    for i, a in enumerate(shapes):
        for b in shapes[i + 1 :]:
            keys = [("widths", k) for k in a["widths"]] + [("depths", k) for k in a["depths"]]
            same = sum(a[part][k] == b[part].get(k) for part, k in keys)
            fractions.append(same / len(keys))
    return _mean(fractions)
