"""Does CPU latency follow FLOPs? ResNet-20 (1x28x28) at stage widths aligned to 8 or not.

Eager latency (median over interleaved rounds, channels-last, one thread by default) of the
unpruned ResNet-20 and of uniform shapes whose widths are or are not multiples of 8; then of
random in-band shapes (FLOPs ratio in [0.45, 0.50]) drawn from the TAS search space with width
candidates as they are (``width_multiple`` 1) and rounded to multiples of 4 and 8.

    python bench/studies/bench_alignment.py [--threads 1]

Writes bench/results/alignment.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from tasprune.baselines import random_shape
from tasprune.config import SpaceOptions
from tasprune.cost import model_cost
from tasprune.latency import measure_latency
from tasprune.models import create_model, get_model_spec
from tasprune.shape import Shape

RESULTS = Path(__file__).resolve().parents[1] / "results"
WIDTHS = {
    "16/32/64 (unpruned)": (16, 32, 64),
    "11/23/45 (uniform, ratio 0.49)": (11, 23, 45),
    "16/24/48 (aligned)": (16, 24, 48),
    "8/16/40 (aligned)": (8, 16, 40),
    "8/16/32 (aligned)": (8, 16, 32),
    "12/20/44 (not aligned)": (12, 20, 44),
}


def stage_shape(a: int, b: int, c: int) -> Shape:
    full = get_model_spec("cifar_resnet20").full_shape()
    widths = {
        k: a if k == "stem" or k.startswith("layer1") else b if k.startswith("layer2") else c
        for k in full.widths
    }
    return Shape(widths=widths, depths=dict(full.depths))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--samples", type=int, default=6, help="random shapes per width multiple")
    ap.add_argument("--out", default=str(RESULTS / "alignment.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    size = (1, 28, 28)
    shapes = {k: stage_shape(*w) for k, w in WIDTHS.items()}
    multiples = (1, 4, 8)
    for m in multiples:
        for seed in range(args.samples):
            shapes[f"random m={m} seed={seed}"] = random_shape(
                "cifar_resnet20", 0.5, size, 10, 0.05, seed, space=SpaceOptions(width_multiple=m)
            )
    nets = {
        k: create_model("cifar_resnet20", s, in_channels=1)
        .eval()
        .to(memory_format=torch.channels_last)
        for k, s in shapes.items()
    }
    lat: dict[str, dict[int, list[float]]] = {k: {1: [], 64: []} for k in nets}
    for _ in range(args.rounds):
        for k, net in nets.items():
            for b in (1, 64):
                lat[k][b].append(measure_latency(net, size, b, repeats=20, warmup=3)["median_ms"])
    base = {b: statistics.median(lat["16/32/64 (unpruned)"][b]) for b in (1, 64)}
    full_flops = model_cost("cifar_resnet20", None, size, 10)[0]
    rows = []
    for k, s in shapes.items():
        flops = model_cost("cifar_resnet20", s, size, 10)[0]
        med = {b: statistics.median(lat[k][b]) for b in (1, 64)}
        rows.append(
            {
                "widths": k,
                "mflops": flops / 1e6,
                "flops_ratio": flops / full_flops,
                "latency_ms": med,
                "latency_ratio": {b: med[b] / base[b] for b in (1, 64)},
            }
        )
    summary = []
    for m in multiples:
        mine = [r for r in rows if r["widths"].startswith(f"random m={m} ")]
        summary.append(
            {
                "width_multiple": m,
                "shapes": len(mine),
                "flops_ratio_mean": statistics.fmean(r["flops_ratio"] for r in mine),
                "latency_over_flops_ratio": {
                    b: statistics.fmean(r["latency_ratio"][b] / r["flops_ratio"] for r in mine)
                    for b in (1, 64)
                },
            }
        )
    out = {
        "benchmark": "latency vs FLOPs, aligned and unaligned widths (ResNet-20, 1x28x28)",
        "threads": args.threads,
        "rounds": args.rounds,
        "torch": torch.__version__,
        "rows": rows,
        "random_shapes_by_width_multiple": summary,
    }
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print("| stage widths | MFLOPs | FLOPs ratio | b1 ms | b1 ratio | b64 ms | b64 ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if r["widths"].startswith("random"):
            continue
        print(
            f"| {r['widths']} | {r['mflops']:.2f} | {r['flops_ratio']:.3f} | "
            f"{r['latency_ms'][1]:.3f} | {r['latency_ratio'][1]:.2f} | "
            f"{r['latency_ms'][64]:.2f} | {r['latency_ratio'][64]:.2f} |"
        )


def _print_summary(path: str) -> None:
    data = json.loads(Path(path).read_text())
    print(
        "\n| width multiple | random in-band shapes | mean FLOPs ratio | "
        "latency ratio / FLOPs ratio, b1 | b64 |"
    )
    print("|---:|---:|---:|---:|---:|")
    for r in data["random_shapes_by_width_multiple"]:
        lf = r["latency_over_flops_ratio"]
        print(
            f"| {r['width_multiple']} | {r['shapes']} | {r['flops_ratio_mean']:.3f} | "
            f"{lf['1']:.2f} | {lf['64']:.2f} |"
        )


if __name__ == "__main__":
    main()
    _print_summary(
        sys.argv[sys.argv.index("--out") + 1]
        if "--out" in sys.argv
        else str(RESULTS / "alignment.json")
    )
