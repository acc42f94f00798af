"""int8 with pruning: what ONNX Runtime's int8 quantisation costs in accuracy and gains in
latency, on the converged fmnist-r20 teacher and a pruned student of it (issue 32, item 3).

For each network `tasprune.export_model(..., int8=True)` writes the fp32 and int8 ONNX models
(channels zero-padded to 8-channel blocks, as every export is); both run the whole
Fashion-MNIST test set in ONNX Runtime (top-1, and the share of images whose int8 class is the
fp32 one) and are timed at batch 1 and 64 on one thread (`tasprune.latency.measure`).
Controls: the student's int8 model made from an unpadded export (do the zero channels cost
accuracy?), and the teacher calibrated on wrong images (normalised, black, 0-255 pixel values:
what broken calibration looks like, the reference for the export's refusal threshold).

    python bench/bench_int8.py --student RUN/seed-0/tas_kd/model.pt [--repeats 50]

Without --student the teacher is cut to the uniform 0.5-FLOPs shape (its weights, not
retrained: that row's accuracy is not a trained student's). Timing needs the machine to itself:
above a 1-minute load of 1.5 the latencies are left out (--force times anyway).
Writes bench/results/int8.json and int8.md.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tasprune.baselines import uniform_shape
from tasprune.bench.runner import machine_info
from tasprune.checkpoint import load_model_checkpoint, save_checkpoint
from tasprune.cost import model_flops
from tasprune.datasets import load_dataset
from tasprune.export import META, export_model
from tasprune.int8 import (
    CALIBRATION_IMAGES,
    MIN_AGREEMENT,
    check_int8,
    int8_images,
    quantize,
)
from tasprune.latency import LatencySettings, measure
from tasprune.models import get_model_spec
from tasprune.shape import Shape

ROOT = Path(__file__).parent
RESULTS = ROOT / "results"
TEACHER = ROOT / "teachers" / "fmnist-r20.pt"
SIZE = (1, 28, 28)
BATCHES = (1, 64)
MAX_LOAD = 1.5  # 1-minute load average above which timings are not taken
TARGET_SPEEDUP = 2.5  # issue 32: pruned + int8 over the fp32 teacher at batch 64


def uniform_student(folder: Path) -> tuple[Path, str]:
    """The teacher cut to the uniform 0.5-FLOPs shape, its weights transferred, not retrained."""
    model, meta = load_model_checkpoint(TEACHER)
    name = str(meta["model"])
    shape = uniform_shape(name, 0.5, SIZE, 10)
    state = get_model_spec(name).transfer(model.state_dict(), shape, 10, SIZE[0])
    out = folder / "uniform" / "model.pt"
    save_checkpoint(out, {"model": state, "meta": {**meta, "shape": shape.to_dict()}})
    return out, "uniform 0.5-FLOPs shape cut from the teacher, not retrained"


def score(fp32: Path, int8: Path, test: Any) -> dict[str, float]:
    """Top-1 of both models and their agreement on the whole test set (ONNX Runtime)."""
    images = (test.images.float() / 255.0).numpy()
    check = check_int8(fp32, int8, images, test.labels.numpy())
    return {
        "fp32_top1": round(100 * check.fp32_top1, 2),
        "int8_top1": round(100 * check.int8_top1, 2),
        "agreement": round(100 * check.agreement, 2),
        "test_images": check.images,
    }


def latencies(fp32: Path, int8: Path, repeats: int) -> dict[str, float]:
    """Median ms per batch of both models at each of BATCHES, one thread."""
    model, _ = load_model_checkpoint(TEACHER)  # measure() times the file; the module is unused
    out: dict[str, float] = {}
    for batch in BATCHES:
        settings = LatencySettings("onnxruntime", batch, threads=1, repeats=repeats, warmup=10)
        for kind, path in (("fp32", fp32), ("int8", int8)):
            out[f"{kind}_ms_b{batch}"] = measure(model, SIZE, settings, onnx_file=path)["median_ms"]
    return out


def quantization_check(path: Path) -> dict[str, Any]:
    """What the export itself logged: its check on 1000 held-out images, from the metadata."""
    import onnx

    meta = next(p.value for p in onnx.load(str(path)).metadata_props if p.key == META)
    return dict(json.loads(meta)["quantization"]["check"])


def network(
    name: str, source: Path, out: Path, args: argparse.Namespace, shown: str = ""
) -> dict[str, Any]:
    """Export one network (fp32 + int8), score it on the test set and time it; ``shown``
    names its source when ``source`` is a converted copy."""
    _, meta = load_model_checkpoint(source)
    fp32 = out / f"{name}.onnx"
    int8 = export_model(source, "onnx", fp32, int8=True, calibration_images=args.calibration_images)
    model = str(meta["model"])
    flops = model_flops(model, Shape.from_dict(meta["shape"]), SIZE)
    row: dict[str, Any] = {
        "network": name,
        "source": shown or str(source),
        "flops_ratio": flops / model_flops(model, None, SIZE),
        **score(fp32, int8, args.test),
        "export_check": quantization_check(int8),
    }
    if args.time:
        row.update(latencies(fp32, int8, args.repeats))
    print(json.dumps(row), flush=True)
    return row


def unpadded(source: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Control: the student's int8 model made from an export without zero-padded channels."""
    fp32 = out / "student-unpadded.onnx"
    int8 = export_model(
        source,
        "onnx",
        fp32,
        pad_channels=0,
        int8=True,
        calibration_images=args.calibration_images,
    )
    return {"control": "student, export not padded", **score(fp32, int8, args.test)}


# Calibration sets a user or a bug could feed instead of raw images in [0, 1]: the first is
# harmless, the other two must be refused by the export's agreement threshold.
MISCALIBRATIONS: dict[str, Callable[[np.ndarray, float, float], np.ndarray]] = {
    "normalised images": lambda x, mean, std: (x - mean) / std,
    "black images": lambda x, mean, std: np.zeros_like(x),
    "pixel values 0-255": lambda x, mean, std: x * 255.0,
}


def miscalibrated(out: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Controls: the teacher's int8 model calibrated on each of MISCALIBRATIONS."""
    _, meta = load_model_checkpoint(TEACHER)
    mean, std = meta["input"]["mean"][0], meta["input"]["std"][0]
    raw = int8_images(meta, args.calibration_images).calibration
    fp32 = out / "teacher.onnx"
    rows = []
    for name, wrong in MISCALIBRATIONS.items():
        bad = out / "teacher-miscalibrated.int8.onnx"
        model = quantize(fp32.read_bytes(), wrong(raw, mean, std).astype(np.float32))
        bad.write_bytes(model.SerializeToString())
        rows.append({"control": f"teacher, calibrated on {name}", **score(fp32, bad, args.test)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(result: dict[str, Any]) -> str:
    rows, controls = result["rows"], result["controls"]
    timed = all("int8_ms_b64" in r for r in rows)
    head = "| network | FLOPs ratio | top-1 fp32 | top-1 int8 | int8 cost (points) | agreement |"
    rule = "|---|---|---|---|---|---|"
    if timed:
        head += " fp32 ms b1 | int8 ms b1 | fp32 ms b64 | int8 ms b64 | int8 speed-up b64 |"
        head += " vs fp32 teacher b1 | vs fp32 teacher b64 |"
        rule += "---|---|---|---|---|---|---|"
    lines = [head, rule]
    teacher = rows[0]
    for r in rows:
        line = (
            f"| {r['network']} | {r['flops_ratio']:.3f} | {r['fp32_top1']:.2f}% | "
            f"{r['int8_top1']:.2f}% | {r['int8_top1'] - r['fp32_top1']:+.2f} | "
            f"{r['agreement']:.2f}% |"
        )
        if timed:
            line += (
                f" {r['fp32_ms_b1']:.3f} | {r['int8_ms_b1']:.3f} | {r['fp32_ms_b64']:.2f} | "
                f"{r['int8_ms_b64']:.2f} | {r['fp32_ms_b64'] / r['int8_ms_b64']:.2f}x | "
                f"{teacher['fp32_ms_b1'] / r['int8_ms_b1']:.2f}x | "
                f"{teacher['fp32_ms_b64'] / r['int8_ms_b64']:.2f}x |"
            )
        lines.append(line)
    lines += ["", "| control | top-1 fp32 | top-1 int8 | agreement | the export |"]
    lines.append("|---|---|---|---|---|")
    for c in controls:
        verdict = "kept" if c["agreement"] >= 100 * MIN_AGREEMENT else "refused"
        lines.append(
            f"| {c['control']} | {c['fp32_top1']:.2f}% | {c['int8_top1']:.2f}% | "
            f"{c['agreement']:.2f}% | {verdict} |"
        )
    m = result["machine"]
    lines += [
        "",
        f"Whole Fashion-MNIST test set ({rows[0]['test_images']} images) in ONNX Runtime "
        f"{m['onnxruntime_version']}; int8 calibrated on {result['calibration_images']} training "
        f"images; student: {result['student_note']}. Load average at the start "
        f"{m['load_average']}; latency: {result['latency']}.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--student", type=Path, help="a pruned student model.pt of the teacher")
    ap.add_argument("--calibration-images", type=int, default=CALIBRATION_IMAGES)
    ap.add_argument("--repeats", type=int, default=50, help="timed calls per latency")
    ap.add_argument("--force", action="store_true", help="time even on a loaded machine")
    ap.add_argument("--no-latency", action="store_true", help="accuracy only")
    args = ap.parse_args()
    torch.set_num_threads(1)
    machine = machine_info(threads=1)  # the load before this run adds its own
    load = os.getloadavg()[0]
    args.time = not args.no_latency and (args.force or load <= MAX_LOAD)
    latency = f"one thread, median of {args.repeats} calls"
    if not args.time:
        latency = "not measured" + (
            f" (load {load:.2f} > {MAX_LOAD})" if not args.no_latency else ""
        )
    args.test = load_dataset("fashion-mnist", "test")
    with tempfile.TemporaryDirectory(prefix="bench-int8-") as tmp:
        folder = Path(tmp)
        if args.student is not None:
            student, note = args.student, str(args.student)
        else:
            student, note = uniform_student(folder)
        rows = [
            network("teacher", TEACHER, folder, args),
            network("student", student, folder, args, str(args.student or "")),
        ]
        controls = [unpadded(student, folder, args), *miscalibrated(folder, args)]
    result = {
        "command": "python bench/bench_int8.py"
        + (f" --student {args.student}" if args.student else ""),
        "machine": machine,
        "calibration_images": args.calibration_images,
        "student_note": note,
        "latency": latency,
        "target_speedup_b64": TARGET_SPEEDUP,
        "rows": rows,
        "controls": controls,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "int8.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    (RESULTS / "int8.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
