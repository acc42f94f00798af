"""Design choices measured end to end: search warm start, student init, search-space ablations.

Every variant is a real search on a recipe's data followed by the recipe's distillation (same
schedule, same teacher, same seed), then the student's test top-1, exact FLOPs, params and CPU
latency (batch 1 and 64, eager, median over interleaved rounds). Three groups:

- ``search_init``: supernet weights warm-started from the teacher vs from scratch (the
  reference code); the student of each shape is distilled with the recipe's settings.
- ``student_init``: one shape (the warm-started search's), its student initialised from scratch,
  from the teacher's leading channels, or from the searched supernet.
- ``space``: the paper's ablations (width only, depth only, I = 1 or 3 sampled widths,
  zero-padding instead of channel-wise interpolation, residual widths tied within a stage),
  each searched and distilled like the default (width + depth, I = 2, interpolation, independent
  residual widths).

    python bench/studies/bench_choices.py --teacher runs/demo/teacher/model.pt [--groups search_init]
        [--seeds 0 1] [--threads 1]

Resumable: every search and student lives under ``--out`` and continues from its checkpoint.
Writes bench/results/choices.json and prints a markdown table (also choices.md).
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
from tasprune.cost import model_cost
from tasprune.distill import distill
from tasprune.latency import measure_latency
from tasprune.pipeline import (
    load_model_checkpoint,
    load_run_data,
    load_supernet_state,
)
from tasprune.search import search
from tasprune.shape import Shape
from tasprune.utils import atomic_write_text

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"

# name -> (search overrides, distill init or None for the recipe's); None search = reuse "default"
VARIANTS: dict[str, dict[str, tuple[dict[str, Any] | None, str | None]]] = {
    "search_init": {
        "warm": ({"warm_start": True}, None),
        "scratch": ({"warm_start": False}, None),
    },
    "student_init": {
        "init=scratch": (None, "scratch"),
        "init=teacher": (None, "teacher"),
        "init=supernet": (None, "supernet"),
    },
    "space": {
        "width+depth (default)": (None, None),
        "width only": ({"search_depth": False}, None),
        "depth only": ({"search_width": False}, None),
        "I=1": ({"num_sampled": 1}, None),
        "I=3": ({"num_sampled": 3}, None),
        "zero-pad": ({"align": "pad"}, None),
        "tied residual": ({"tie_residual": True}, None),
    },
}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").replace("--", "-")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=str(ROOT / "configs" / "fmnist-r20-quick.yaml"))
    ap.add_argument("--teacher", required=True, help="model.pt of the recipe's trained teacher")
    ap.add_argument("--groups", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--variants", nargs="+", default=None, help="only these variant names")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--out", default="runs/choices")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--results", default=str(RESULTS / "choices.json"))
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    recipe = load_recipe(args.recipe)
    train, test = load_run_data(recipe)
    teacher, tmeta = load_model_checkpoint(args.teacher)
    if tmeta["model"] != recipe.model:
        raise SystemExit(f"error: teacher is a {tmeta['model']}, the recipe a {recipe.model}")
    size = (train.in_channels, *train.image_size)
    full_flops, _ = model_cost(recipe.model, None, size, train.num_classes)
    out = Path(args.out)
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()

    def run_search(seed: int, over: dict[str, Any]) -> tuple[Shape, Path, str]:
        key = "default" if not over or over == {"warm_start": True} else slug(json.dumps(over))
        folder = out / f"seed-{seed}" / "search" / key
        cfg = recipe.search.model_copy(update={**over, "seed": seed})
        warm = cfg.warm_start
        res = search(
            recipe.model,
            train,
            cfg,
            folder,
            teacher_state=teacher.state_dict() if warm else None,
            device="cpu",
            progress=False,
            augment=recipe.data.augment,
        )
        return res.shape, folder, key

    for group in args.groups:
        for name, (over, init) in VARIANTS[group].items():
            if args.variants is not None and name not in args.variants:
                continue
            for seed in args.seeds:
                t0 = time.perf_counter()
                shape, sfolder, skey = run_search(seed, over or {})
                scfg = recipe.search.model_copy(update=over or {})
                dcfg = recipe.distill.model_copy(
                    update={
                        "init": init or recipe.distill.init,
                        "train": recipe.distill.train.model_copy(update={"seed": seed}),
                    }
                )
                supernet = None
                if dcfg.init == "supernet":
                    supernet = load_supernet_state(sfolder / "supernet.pt")
                student_key = f"{skey}-{dcfg.init}"  # one student per (shape, init)
                metrics = distill(
                    recipe.model,
                    shape,
                    teacher,
                    train,
                    test,
                    dcfg,
                    out / f"seed-{seed}" / "student" / student_key,
                    supernet_state=supernet,
                    space=scfg.space(),
                    device="cpu",
                    progress=False,
                    augment=recipe.data.augment,
                )
                flops, params = model_cost(recipe.model, shape, size, train.num_classes)
                history = [
                    json.loads(line)
                    for line in (sfolder / "history.jsonl").read_text().splitlines()
                    if line.strip()
                ]
                rows.append(
                    {
                        "group": group,
                        "variant": name,
                        "seed": seed,
                        "top1": metrics.get("top1"),
                        "flops": flops,
                        "flops_ratio": flops / full_flops,
                        "params": params,
                        "depths": shape.depths,
                        "search_entropy_end": history[-1].get("entropy_mean"),
                        "search_valid_top1_end": history[-1].get("valid_top1"),
                        "shape": shape.to_dict(),
                        "wall_s_this_invocation": round(time.perf_counter() - t0, 1),
                    }
                )
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "shape"}), flush=True)

    # Latency of every distinct shape: interleaved rounds, medians (one thread is steadier).
    teacher_shape = Shape.from_dict(tmeta["shape"])
    shapes = {json.dumps(r["shape"], sort_keys=True): Shape.from_dict(r["shape"]) for r in rows}
    shapes["teacher"] = teacher_shape
    from tasprune.models import create_model

    nets = {
        k: create_model(recipe.model, s, num_classes=train.num_classes, in_channels=size[0])
        .eval()
        .to(memory_format=torch.channels_last)
        for k, s in shapes.items()
    }
    lat: dict[str, dict[int, list[float]]] = {k: {1: [], 64: []} for k in nets}
    for _ in range(3):
        for k, net in nets.items():
            for b in (1, 64):
                lat[k][b].append(measure_latency(net, size, b, repeats=20, warmup=3)["median_ms"])
    med = {k: {b: statistics.median(v) for b, v in d.items()} for k, d in lat.items()}
    for r in rows:
        k = json.dumps(r["shape"], sort_keys=True)
        r["latency_ms"] = {str(b): med[k][b] for b in (1, 64)}
        r["latency_ratio_b64"] = med[k][64] / med["teacher"][64]
    result = {
        "benchmark": "design choices (search init, student init, search-space ablations)",
        "recipe": str(args.recipe),
        "teacher": str(args.teacher),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "teacher_latency_ms": {str(b): med["teacher"][b] for b in (1, 64)},
        "wall_s": round(time.perf_counter() - started, 1),
        "rows": rows,
    }
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(args.results), json.dumps(result, indent=2) + "\n")
    lines = [
        "| group | variant | seeds | student top-1 % | FLOPs ratio | params (M) | depths | "
        "latency b64 / teacher |",
        "|---|---|---|---|---|---|---|---|",
    ]
    by: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault((r["group"], r["variant"]), []).append(r)
    for (group, name), rs in by.items():
        top1 = [r["top1"] for r in rs]
        mean = statistics.fmean(top1)
        spread = f" ± {statistics.stdev(top1):.2f}" if len(top1) > 1 else ""
        lines.append(
            f"| {group} | {name} | {len(rs)} | {mean:.2f}{spread} | "
            f"{statistics.fmean(r['flops_ratio'] for r in rs):.3f} | "
            f"{statistics.fmean(r['params'] for r in rs) / 1e6:.3f} | "
            f"{'/'.join(str(d) for d in rs[0]['depths'].values())} | "
            f"{statistics.fmean(r['latency_ratio_b64'] for r in rs):.3f} |"
        )
    table = "\n".join(lines) + "\n"
    atomic_write_text(Path(args.results).with_suffix(".md"), table)
    print(table)


if __name__ == "__main__":
    main()
