"""Does zero-padding the pruned widths to the runtime's channel blocks make the exported
network faster? ONNX Runtime and eager PyTorch latency of the teacher, and of the protocols'
pruned shapes as searched, padded to 8 and padded to 16 (same outputs).

Weights are random (latency does not depend on their values); shapes are the protocols'
TAS and uniform shapes of seed 0 (bench/results/fmnist-r20.json, fmnist-r56.json). One
thread, the machine alone, medians of repeated rounds.

    python bench/bench_padding.py [--batches 1 64] [--repeats 30]

Writes bench/results/padding.json and padding.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from tasprune.cost import model_cost
from tasprune.models import create_model
from tasprune.padding import pad_channels
from tasprune.shape import Shape

RESULTS = Path(__file__).parent / "results"
SIZE = (1, 28, 28)


def ort_ms(net: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.onnx")
        torch.onnx.export(net, (x,), path, dynamo=False, opset_version=17, input_names=["x"])
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        feed = {"x": x.numpy()}
        return _median(lambda: sess.run(None, feed), repeats)


def eager_ms(net: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    with torch.inference_mode():
        return _median(lambda: net(x), repeats)


def _median(fn: Any, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows: list[dict[str, Any]] = []
    for protocol in ("fmnist-r20", "fmnist-r56"):
        data = json.loads((RESULTS / f"{protocol}.json").read_text())
        model = data["recipe"]["model"]
        full_flops = model_cost(model, None, SIZE, 10)[0]
        nets: dict[str, tuple[torch.nn.Module, float]] = {
            "teacher": (create_model(model, num_classes=10, in_channels=1), 1.0)
        }
        for method in ("tas_kd", "uniform_kd"):
            shape = Shape.from_dict(data["methods"][method]["shapes"]["0"])
            flops = model_cost(model, shape, SIZE, 10)[0] / full_flops
            nets[method] = (create_model(model, shape, num_classes=10, in_channels=1), flops)
        for batch in args.batches:
            x = torch.rand(batch, *SIZE)
            base: dict[str, float] = {}
            for name, (net, ratio) in nets.items():
                variants = [("as searched", net)]
                if name != "teacher":
                    for m in (8, 16):
                        twin = copy.deepcopy(net).eval()
                        pad_channels(twin, m, x[:1])
                        variants.append((f"padded to {m}", twin))
                for variant, v in variants:
                    v.eval()
                    row = {
                        "protocol": protocol,
                        "model": model,
                        "network": name,
                        "variant": variant,
                        "batch": batch,
                        "flops_ratio": ratio,
                        "onnx_ms": ort_ms(v, x, args.repeats),
                        "eager_ms": eager_ms(v, x, args.repeats),
                    }
                    if name == "teacher":
                        base = {"onnx_ms": row["onnx_ms"], "eager_ms": row["eager_ms"]}
                    row["onnx_ratio"] = row["onnx_ms"] / base["onnx_ms"]
                    row["eager_ratio"] = row["eager_ms"] / base["eager_ms"]
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "padding.json").write_text(
        json.dumps({"threads": 1, "repeats": args.repeats, "rows": rows}, indent=2) + "\n"
    )
    lines = [
        "| protocol | network | widths | batch | FLOPs ratio | ONNX ms | ONNX ratio | "
        "ONNX ratio / FLOPs ratio | eager ms | eager ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['protocol']} | {r['network']} | {r['variant']} | {r['batch']} | "
            f"{r['flops_ratio']:.3f} | {r['onnx_ms']:.2f} | {r['onnx_ratio']:.2f} | "
            f"{r['onnx_ratio'] / r['flops_ratio']:.2f} | {r['eager_ms']:.2f} | "
            f"{r['eager_ratio']:.2f} |"
        )
    (RESULTS / "padding.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
