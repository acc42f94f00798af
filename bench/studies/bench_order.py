"""Channel ordering measured end to end: the same recipe, teacher and schedules, with the
teacher's coupled channels ordered by none / l1 / bn / taylor before the warm-started search
and the student's initialisation (``teacher.order``).

    python bench/studies/bench_order.py [--recipe configs/fmnist-r20-quick.yaml]
        [--orders none l1 bn] [--seeds 0] [--threads 1] [--out runs/bench-order]

One teacher is trained once (the recipe's teacher stage) and imported by every variant, so
only the ordering differs. Resumable: every variant is a `tasprune run` folder; a rerun skips
finished stages. Writes bench/results/order.json and order.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from tasprune.config import load_recipe
from tasprune.pipeline import load_run_data, run
from tasprune.stages import StageContext, train_teacher

RESULTS = Path(__file__).resolve().parents[1] / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="configs/fmnist-r20-quick.yaml")
    ap.add_argument("--orders", nargs="+", default=["none", "l1", "bn", "taylor"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="runs/bench-order")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(args.out)
    base = {"device": "cpu", "report": {"latency_batches": [1], "latency_repeats": 1}}
    teacher_run = root / "teacher-run"
    t0 = time.perf_counter()
    # The teacher: the recipe's own teacher stage, once.
    if not (teacher_run / "teacher" / "final.json").is_file():
        recipe = load_recipe(args.recipe, base)
        ctx = StageContext(recipe, load_run_data(recipe), torch.device("cpu"), progress=False)
        train_teacher(ctx, teacher_run / "teacher")
    teacher_s = time.perf_counter() - t0
    rows: list[dict[str, Any]] = []
    for order in args.orders:
        for seed in args.seeds:
            over = {
                **base,
                "seed": seed,
                "teacher": {"checkpoint": str(teacher_run / "teacher"), "order": order},
            }
            recipe = load_recipe(args.recipe, over)
            t1 = time.perf_counter()
            result = run(recipe, root / f"{order}-seed{seed}", progress=False)
            shape = json.loads((root / f"{order}-seed{seed}" / "search" / "shape.json").read_text())
            hist = [
                json.loads(x)
                for x in (root / f"{order}-seed{seed}" / "search" / "history.jsonl")
                .read_text()
                .splitlines()
                if x.strip()
            ]
            rows.append(
                {
                    "order": order,
                    "seed": seed,
                    "student_top1": result["distill"]["top1"],
                    "teacher_top1": result["teacher"]["top1"],
                    "flops_ratio": shape["flops_ratio"],
                    "depths": shape["depths"],
                    "final_entropy": hist[-1]["entropy_mean"] if hist else None,
                    "final_valid_top1": hist[-1]["valid_top1"] if hist else None,
                    "seconds": round(time.perf_counter() - t1, 1),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
            write(args, rows, teacher_s)
    write(args, rows, teacher_s)


def write(args: argparse.Namespace, rows: list[dict[str, Any]], teacher_s: float) -> None:
    """bench/results/order.json and .md from the rows so far (called after every variant)."""
    summary: dict[str, dict[str, Any]] = {}
    for order in args.orders:
        tops = [r["student_top1"] for r in rows if r["order"] == order]
        if not tops:
            continue
        summary[order] = {
            "top1_mean": statistics.fmean(tops),
            "top1_std": statistics.stdev(tops) if len(tops) > 1 else None,
            "top1_per_seed": tops,
        }
    out = {
        "recipe": args.recipe,
        "orders": args.orders,
        "seeds": args.seeds,
        "threads": args.threads,
        "teacher_seconds": round(teacher_s, 1),
        "rows": rows,
        "summary": summary,
        "command": "python bench/studies/bench_order.py "
        + " ".join(
            f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items()
        ),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "order.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [
        "# Channel ordering before the search and the student init (`teacher.order`)",
        "",
        f"Recipe {args.recipe}, seeds {args.seeds}, one shared teacher "
        f"({rows[0]['teacher_top1']:.2f}% top-1), {args.threads} thread(s). Command: "
        f"`{out['command']}`",
        "",
        "| order | student top-1 % | FLOPs ratio | depths | search entropy | valid top-1 % |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['order']} (seed {r['seed']}) | {r['student_top1']:.2f} | "
            f"{r['flops_ratio']:.3f} | {'/'.join(map(str, r['depths'].values()))} | "
            f"{r['final_entropy']:.3f} | {r['final_valid_top1']:.2f} |"
        )
    lines += [
        "",
        "| order | student top-1 % (mean ± std over seeds) | per seed |",
        "|---|---:|---|",
    ]
    for order, row in summary.items():
        std = f"{row['top1_std']:.2f}" if row["top1_std"] is not None else "-"
        per = ", ".join(f"{t:.2f}" for t in row["top1_per_seed"])
        lines.append(f"| {order} | {row['top1_mean']:.2f} ± {std} | {per} |")
    (RESULTS / "order.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
