"""Validate the per-layer latency table: predicted against measured whole-network latency.

For each runtime (eager PyTorch, ONNX Runtime) the search's table is built (or loaded from
the cache) for the model's search space, then random in-space shapes (`SuperNet.sample`:
every width and depth choice drawn uniformly from its candidates) are built with random
weights and timed whole (ONNX: exported padded to 8 channels, as `tasprune export` does),
alone, at one thread. The
relative error |predicted - measured| / measured is reported per shape, with its median and
worst, and the same for the latency *ratio* to the unpruned network (what the budget uses).

    python bench/bench_latency.py --model cifar_resnet20 --shapes 20
Writes bench/results/latency_table_MODEL.json and .md.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from tasprune.latency_table import TableKey
from tasprune.models import create_model
from tasprune.search import SearchConfig, SuperNet
from tasprune.search.latency import attach_latency, measure_network

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="cifar_resnet20")
    ap.add_argument("--input", default="1x28x28", help="CxHxW")
    ap.add_argument("--shapes", type=int, default=20)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--runtimes", default="eager,onnxruntime")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder of the JSON and table")
    ap.add_argument("--tag", default="", help="appended to the file names")
    args = ap.parse_args()
    c, h, w = (int(v) for v in args.input.split("x"))
    torch.set_num_threads(args.threads)
    out: dict[str, object] = {
        "model": args.model,
        "input": [c, h, w],
        "batch": args.batch,
        "threads": args.threads,
        "repeats": args.repeats,
        "runtimes": {},
    }
    lines = [
        f"# Latency table validation: {args.model} @ {args.input}, batch {args.batch}, "
        f"{args.threads} thread(s)",
        "",
        f"{args.shapes} random in-space shapes with random weights, each timed whole (median of "
        f"{args.repeats} calls) against the table's prediction. Command: `python "
        f"bench/bench_latency.py --model {args.model} --input {args.input} --shapes "
        f"{args.shapes}`.",
        "",
        "| runtime | table points | build s | unpruned ms (pred / meas) | median error | "
        "worst error | median ratio error | worst ratio error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for runtime in args.runtimes.split(","):
        cfg = SearchConfig(
            latency_ratio=0.5,
            latency_runtime=runtime,  # type: ignore[arg-type]
            latency_batch=args.batch,
            latency_threads=args.threads,
        )
        net = SuperNet(
            args.model, num_classes=10, in_channels=c, input_size=(h, w), options=cfg.space()
        )
        t0 = time.perf_counter()
        info = attach_latency(net, cfg, progress=False)
        build_s = time.perf_counter() - t0
        key = TableKey.here(runtime, args.threads, args.batch)
        assert net.latency_table is not None
        full_meas = measure_network(
            create_model(args.model, num_classes=10, in_channels=c), key, (c, h, w), args.repeats
        )
        rng = random.Random(args.seed)
        rows = []
        for i in range(args.shapes):
            shape = net.sample(rng)
            pred = net.shape_costs(shape)["latency"]
            model = create_model(args.model, shape, num_classes=10, in_channels=c)
            meas = measure_network(model, key, (c, h, w), args.repeats)
            rows.append(
                {
                    "shape": i,
                    "flops_ratio": net.shape_cost(shape)[0] / net.full_flops,
                    "predicted_ms": pred,
                    "measured_ms": meas,
                    "error": abs(pred - meas) / meas,
                    "predicted_ratio": pred / net.full_latency,
                    "measured_ratio": meas / full_meas,
                    "ratio_error": abs(pred / net.full_latency - meas / full_meas)
                    / (meas / full_meas),
                }
            )
            print(runtime, rows[-1], flush=True)
        errs = [r["error"] for r in rows]
        rerrs = [r["ratio_error"] for r in rows]
        summary = {
            "table": info,
            "points": len(net.latency_table.entries),
            "build_seconds": build_s,
            "unpruned_predicted_ms": net.full_latency,
            "unpruned_measured_ms": full_meas,
            "median_error": statistics.median(errs),
            "worst_error": max(errs),
            "median_ratio_error": statistics.median(rerrs),
            "worst_ratio_error": max(rerrs),
            "rows": rows,
        }
        out["runtimes"][runtime] = summary  # type: ignore[index]
        lines.append(
            f"| {runtime} | {summary['points']} | {build_s:.0f} | {net.full_latency:.2f} / "
            f"{full_meas:.2f} | {100 * summary['median_error']:.1f}% | "
            f"{100 * summary['worst_error']:.1f}% | {100 * summary['median_ratio_error']:.1f}% | "
            f"{100 * summary['worst_ratio_error']:.1f}% |"
        )
    args.results.mkdir(parents=True, exist_ok=True)
    stem = args.results / f"latency_table_{args.model}{args.tag}"
    stem.with_suffix(".json").write_text(json.dumps(out, indent=2) + "\n")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
