"""Which search epoch to keep: the last in-band shape or the best in-band one by held-out
validation accuracy? Decided by the students' test accuracy, on a finished protocol run.

For every seed of the run whose search ended in the band with a different best-by-validation
shape, the TAS+KD student of that best shape is trained with the protocol's own recipe
(schedule, distillation, the seed's supernet as init) and set beside the protocol's TAS+KD
student of the kept (last) shape. Resumable (one folder per seed under RUN/keep-best/).

    python bench/studies/bench_keep.py bench/protocols/fmnist-r20.yaml bench/protocols/fmnist-r20-f30.yaml \\
        --out-root runs/bench-win --threads 1

Also, for the searches whose last shape ended outside the band, the best in-band shape of an
earlier epoch against the last shape projected onto the band (`SuperNet.project`, the
default since this study).
Writes bench/results/keep.json and keep.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from tasprune.bench.protocol import load_protocol
from tasprune.bench.runner import _Bench
from tasprune.pipeline import load_supernet_state
from tasprune.search.supernet import SuperNet
from tasprune.shape import Shape
from tasprune.stages import train_student

RESULTS = Path(__file__).resolve().parents[1] / "results"


def _rows(history: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in history.read_text().splitlines() if line.strip()]


def _student(bench: _Bench, seed: int, shape: Shape, folder: Path) -> float:
    """Top-1 of the TAS+KD student of ``shape`` under the protocol's recipe (resumable)."""
    result_file = folder / "result.json"
    if not result_file.is_file():
        recipe = bench.recipe
        tcfg = recipe.distill.train.model_copy(update={"seed": seed})
        cfg = recipe.distill.model_copy(update={"train": tcfg})
        supernet = load_supernet_state(bench.root / f"seed-{seed}" / "search" / "supernet.pt")
        folder.mkdir(parents=True, exist_ok=True)
        metrics = train_student(
            bench.ctx, folder, shape, bench.teacher, cfg=cfg, supernet_state=supernet
        )
        result_file.write_text(json.dumps({"top1": metrics["top1"]}) + "\n")
    return float(json.loads(result_file.read_text())["top1"])


def projected(bench: _Bench) -> list[dict[str, Any]]:
    """Searches whose last shape ended outside the band: an earlier epoch's best in-band shape
    against the last shape projected onto the band (`SuperNet.project`). Whichever of the two
    the run kept is the protocol's own TAS+KD student; the other one is trained here."""
    proto, recipe = bench.proto, bench.recipe
    train = bench.data[0]
    out = []
    for seed in proto.seeds:
        search = bench.root / f"seed-{seed}" / "search"
        kept, meta = Shape.load(search / "shape.json")
        best_file = search / "shape_best.json"
        if meta.get("source") not in ("best", "projected") or not best_file.is_file():
            continue
        last, _ = Shape.load(search / "shape_last.json")
        best, best_meta = Shape.load(best_file)
        net = SuperNet.for_input(
            recipe.model, bench.input_size, train.num_classes, recipe.search.space()
        )
        net.load_state_dict(load_supernet_state(search / "supernet.pt"))
        proj = net.project(last, recipe.search.budget)
        tas = json.loads((bench.root / f"seed-{seed}" / "tas_kd" / "result.json").read_text())
        if meta["source"] == "best":  # a run of the earlier default: train the projected one
            best_top1 = tas["top1"]
            proj_top1 = _student(bench, seed, proj, bench.root / "keep-projected" / f"seed-{seed}")
        else:
            proj_top1 = tas["top1"]
            best_top1 = _student(bench, seed, best, bench.root / "keep-best" / f"seed-{seed}")
        out.append(
            {
                "protocol": proto.name,
                "seed": seed,
                "kept": meta["source"],
                "last_flops_ratio": net.shape_costs(last)["flops"] / net.full_flops,
                "kept_best_flops_ratio": best_meta["flops_ratio"],
                "kept_best_student_top1": best_top1,
                "projected_flops_ratio": net.shape_costs(proj)["flops"] / net.full_flops,
                "projected_student_top1": proj_top1,
            }
        )
    return out


def study(bench: _Bench) -> list[dict[str, Any]]:
    """Searches whose last shape ended in the band with a different best-by-validation one:
    the two shapes' students."""
    proto = bench.proto
    out = []
    for seed in proto.seeds:
        search = bench.root / f"seed-{seed}" / "search"
        kept, meta = Shape.load(search / "shape.json")
        best_file = search / "shape_best.json"
        if meta.get("source") != "last" or not best_file.is_file():
            continue  # the kept shape already is the best in-band one (or projected)
        best, _ = Shape.load(best_file)
        if best == kept:
            continue
        rows = _rows(search / "history.jsonl")
        in_band = [r for r in rows if r["in_band"]]
        best_row = max(in_band, key=lambda r: r["valid_top1"])
        best_top1 = _student(bench, seed, best, bench.root / "keep-best" / f"seed-{seed}")
        tas = json.loads((bench.root / f"seed-{seed}" / "tas_kd" / "result.json").read_text())
        out.append(
            {
                "protocol": proto.name,
                "seed": seed,
                "last_epoch": rows[-1]["epoch"],
                "last_valid_top1": rows[-1]["valid_top1"],
                "last_flops_ratio": rows[-1]["flops_ratio"],
                "last_student_top1": tas["top1"],
                "best_epoch": best_row["epoch"],
                "best_valid_top1": best_row["valid_top1"],
                "best_flops_ratio": best_row["flops_ratio"],
                "best_student_top1": best_top1,
            }
        )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("protocols", nargs="+")
    ap.add_argument("--out-root", type=Path, default=Path("runs/bench"))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    proj: list[dict[str, Any]] = []
    for protocol in args.protocols:
        proto, recipe = load_protocol(protocol)
        bench = _Bench(proto, recipe, args.out_root / proto.name, progress=False)
        rows += study(bench)  # one bench per protocol: its data and teacher load once
        proj += projected(bench)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "keep.json").write_text(
        json.dumps({"rows": rows, "projected": proj}, indent=1) + "\n"
    )
    lines = [
        "# Keep the last in-band shape or the best by held-out validation?",
        "",
        "Command: `python " + " ".join(sys.argv) + "`",
        "",
        "| protocol | seed | last: epoch, valid %, FLOPs | last: student % | "
        "best: epoch, valid %, FLOPs | best: student % | best - last (pt) |",
        "|---|---:|---|---:|---|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['protocol']} | {r['seed']} | {r['last_epoch']}, {r['last_valid_top1']:.1f}, "
            f"{r['last_flops_ratio']:.3f} | {r['last_student_top1']:.2f} | {r['best_epoch']}, "
            f"{r['best_valid_top1']:.1f}, {r['best_flops_ratio']:.3f} | "
            f"{r['best_student_top1']:.2f} | {r['best_student_top1'] - r['last_student_top1']:+.2f} |"
        )
    lines += [
        "",
        "Searches whose last shape ended outside the band: the kept best in-band shape of an",
        "earlier epoch vs the last shape projected onto the band (`SuperNet.project`).",
        "",
        "| protocol | seed | last FLOPs | kept best: FLOPs, student % | "
        "projected last: FLOPs, student % | projected - kept (pt) |",
        "|---|---:|---:|---|---|---:|",
    ]
    for r in proj:
        lines.append(
            f"| {r['protocol']} | {r['seed']} | {r['last_flops_ratio']:.3f} | "
            f"{r['kept_best_flops_ratio']:.3f}, {r['kept_best_student_top1']:.2f} | "
            f"{r['projected_flops_ratio']:.3f}, {r['projected_student_top1']:.2f} | "
            f"{r['projected_student_top1'] - r['kept_best_student_top1']:+.2f} |"
        )
    (RESULTS / "keep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
