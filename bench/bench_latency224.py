"""Latency against FLOPs at the size people deploy: torchvision resnet18 and mobilenet_v2 at
3 x 224 x 224, pruned to 0.5 of their FLOPs by a short TAS search.

    python bench/bench_latency224.py [--models resnet18 mobilenet_v2] [--threads 1 2]

Random weights (latency does not depend on them): each network is searched for ``--steps``
architecture steps on random images under a FLOPs budget of ``--ratio`` (its widths and
depths move; the kept shape is projected into the band), pruned, then timed alone: eager
PyTorch and ONNX Runtime (the export's 8-channel padding, bound buffers: `tasprune.latency`),
batch 1 and 8, medians of ``--repeats``. The goal (issue 32): ONNX Runtime latency ratio at
most 1.10 x the FLOPs ratio. Writes bench/results/latency224.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import tasprune
from tasprune.latency import LatencySettings, measure

RESULTS = Path(__file__).parent / "results"
SIZE = (3, 224, 224)


def counted_flops(model: torch.nn.Module) -> int:
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model.eval()(torch.rand(1, *SIZE))
    return fc.get_total_flops() // 2


def searched(name: str, ratio: float, steps: int, seed: int) -> tuple[Any, Any, Any]:
    """(unpruned, pruned, shape): ``steps`` architecture steps of TAS on random images."""
    import torchvision

    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(weights=None)
    x = torch.rand(4, *SIZE)
    tas = tasprune.TAS(model, x[:2], epochs=1, flops_ratio=ratio, arch_lr=0.2, seed=seed)
    net = tas.model.train()
    y = torch.randint(0, 1000, (4,))
    for _ in range(steps):
        tas.arch_step(lambda: F.cross_entropy(net(x), y))
    shape = tas.shape()
    return model.eval(), tas.prune().eval(), shape


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", type=Path, default=RESULTS / "latency224.json")
    args = ap.parse_args()
    rows = []
    for name in args.models:
        full, pruned, shape = searched(name, args.ratio, args.steps, 0)
        flops_ratio = counted_flops(pruned) / counted_flops(full)
        for threads in args.threads:
            for batch in args.batches:
                row: dict[str, Any] = {
                    "model": f"torchvision:{name}",
                    "threads": threads,
                    "batch": batch,
                    "flops_ratio": flops_ratio,
                }
                for runtime in ("eager", "onnxruntime"):
                    settings = LatencySettings(runtime, batch, threads, args.repeats, 3)
                    t_full = measure(full, SIZE, settings)["median_ms"]
                    t_pruned = measure(pruned, SIZE, settings)["median_ms"]
                    key = "eager" if runtime == "eager" else "onnx"
                    row[f"{key}_ms"] = [t_full, t_pruned]
                    row[f"{key}_ratio"] = t_pruned / t_full
                row["onnx_over_flops"] = row["onnx_ratio"] / flops_ratio
                print(json.dumps(row), flush=True)
                rows.append(row)
    result = {
        "benchmark": "latency ratio against FLOPs ratio at 3x224x224",
        "cpu": platform.processor() or "unknown",
        "torch": torch.__version__,
        "ratio": args.ratio,
        "search_steps": args.steps,
        "rows": rows,
        "note": "timed alone on the machine; random weights; ONNX Runtime with the export's "
        "8-channel padding and bound buffers",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "| model | threads | batch | FLOPs ratio | eager ms (full / pruned) | eager ratio | "
        "ONNX ms (full / pruned) | ONNX ratio | ONNX ratio / FLOPs ratio |",
        "|---|---:|---:|---:|---|---:|---|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['threads']} | {r['batch']} | {r['flops_ratio']:.3f} | "
            f"{r['eager_ms'][0]:.1f} / {r['eager_ms'][1]:.1f} | {r['eager_ratio']:.3f} | "
            f"{r['onnx_ms'][0]:.1f} / {r['onnx_ms'][1]:.1f} | {r['onnx_ratio']:.3f} | "
            f"{r['onnx_over_flops']:.2f} |"
        )
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
