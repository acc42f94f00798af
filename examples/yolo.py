"""Prune an Ultralytics YOLOv8n to half its FLOPs inside the Ultralytics trainer.

The model is Ultralytics' own (built from its YAML, C2f as written), and so are the trainer,
the loss, the validation and the export. tasprune supplies the searchable model and the
architecture step around the trainer's optimiser step (`tasprune.integrations.ultralytics`),
the pruned model, and the pickle-free save (shape + weights) re-applied to a fresh original.

    python examples/yolo.py --out runs/yolo                 # committed teacher
    python examples/yolo.py --tiny --out /tmp/yolo          # a smoke run, about a minute
    python examples/yolo.py --train-teacher --out runs/yolo-teacher   # the teacher itself
    python examples/yolo.py --tiny --model yolo11n.yaml --out /tmp/yolo11  # YOLO11n (attention)

Ultralytics is AGPL-3.0, an optional extra (``pip install 'tasprune[yolo]'``). The example
runs it offline (`tasprune.integrations.ultralytics.offline`: its settings under OUT, no
downloads). The data is the canvas set (`tasprune.tasks.build_canvas_set`, Fashion-MNIST items
on grey canvases; its images/ and labels/ folders are the YOLO layout), described to
Ultralytics by a data.yaml. Steps: load the teacher (bench/teachers/canvas-yolov8n.pt, a state
dict; the file says how it was trained) or train one; search a shape at 0.5 of its FLOPs
inside the trainer; prune; fine-tune the pruned model with Ultralytics' distillation from the
teacher; validate both with Ultralytics' val (mAP50-95 on the test split); save the shape and
weights, rebuild from a fresh YOLOv8n and check the outputs are the same; export to ONNX with
Ultralytics' exporter and compare ONNX Runtime's raw outputs with the model's. With
``--model yolo11n.yaml`` its C2PSA attention's heads are searched too (no committed teacher:
one is trained here).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import tasprune
from tasprune.integrations import ultralytics as tu
from tasprune.tasks import build_canvas_set

TEACHER = Path(__file__).resolve().parent.parent / "bench" / "teachers" / "canvas-yolov8n.pt"
SIZE = 128
CLASSES = 10


def build_yolo(yaml: str = "yolov8n.yaml") -> nn.Module:
    """The user's detector: YOLOv8n (or another Ultralytics YAML: yolo11n.yaml, whose C2PSA
    block is attention) for the canvas set's ten classes."""
    from ultralytics.nn.tasks import DetectionModel

    return DetectionModel(yaml, nc=CLASSES, verbose=False)


def flops(model: nn.Module, size: int = SIZE) -> int:
    """Multiply-accumulates of one forward at ``size`` (the counted network, eval mode)."""
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model.eval()(torch.zeros(1, 3, size, size))
    return int(fc.get_total_flops() // 2)


def validate(
    model: nn.Module | Path, data: Path, size: int, out: Path, name: str, yaml: str = "yolov8n.yaml"
) -> float:
    """Ultralytics' own val on the test split: mAP@[.5:.95]."""
    from ultralytics import YOLO

    if isinstance(model, Path):
        yolo = YOLO(str(model))
    else:
        yolo = YOLO(yaml, task="detect")
        yolo.model = model.float().eval()
    metrics = yolo.val(
        data=str(data),
        imgsz=size,
        batch=32,
        split="test",
        plots=False,
        project=str(out),
        name=name,
        exist_ok=True,
        verbose=False,
    )
    return float(metrics.box.map)


def raw(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's decoded head output before NMS (what the ONNX export holds)."""
    with torch.no_grad():
        out = model.eval()(x)
    return out[0] if isinstance(out, (tuple, list)) else out


def onnx_parity(best: Path, model: nn.Module, size: int) -> float:
    """Ultralytics' ONNX export of ``best`` run by ONNX Runtime against ``model`` in PyTorch."""
    import onnxruntime as ort
    from ultralytics import YOLO

    path = YOLO(str(best)).export(format="onnx", imgsz=size, simplify=False, verbose=False)
    x = torch.rand(1, 3, size, size)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    return float((torch.from_numpy(got) - raw(model, x)).abs().max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/yolo"))
    ap.add_argument("--ratio", type=float, default=0.5, help="FLOPs budget of the search")
    ap.add_argument("--search-epochs", type=int, default=5)
    ap.add_argument("--finetune-epochs", type=int, default=15)
    ap.add_argument("--teacher-epochs", type=int, default=60)
    ap.add_argument("--teacher-hours", type=float, default=None, help="stop the teacher early")
    ap.add_argument("--train-teacher", action="store_true", help="train the teacher here")
    ap.add_argument("--no-kd", action="store_true", help="fine-tune without distillation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny", action="store_true", help="a smoke run on a few canvases")
    ap.add_argument(
        "--model", default="yolov8n.yaml", help="Ultralytics YAML (yolo11n.yaml: its attention too)"
    )
    args = ap.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    tu.offline(out / "ultralytics")
    size = 96 if args.tiny else SIZE
    counts = (64, 16, 16) if args.tiny else (4000, 500, 1000)
    data = tu.data_yaml(build_canvas_set(size=size, counts=counts), out / "data.yaml")
    common: dict[str, Any] = {
        "imgsz": size,
        "batch": 16 if args.tiny else 32,
        "seed": args.seed,
        "workers": 0,
        "project": str(out),
        "exist_ok": True,
        "verbose": False,
    }

    torch.manual_seed(args.seed)
    teacher = build_yolo(args.model)
    committed = args.model == "yolov8n.yaml" and TEACHER.is_file()  # the committed teacher's
    if args.tiny or args.train_teacher or not committed:
        epochs = 1 if args.tiny else args.teacher_epochs
        trained = tu.finetune(
            teacher, data, epochs=epochs, name="teacher", time=args.teacher_hours, **common
        )
        from ultralytics.nn.tasks import load_checkpoint

        teacher = load_checkpoint(str(trained.best))[0].float()
        if args.train_teacher:
            state = {
                k: v.half() if v.is_floating_point() else v for k, v in teacher.state_dict().items()
            }
            torch.save(state, out / "teacher.pt")  # a state dict: commit it as TEACHER
    else:
        state = torch.load(TEACHER, weights_only=True)
        teacher.load_state_dict(
            {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        )
    teacher.eval()
    report: dict[str, Any] = {"teacher": {"flops": flops(teacher, size)}}
    report["teacher"]["test_map"] = validate(teacher, data, size, out, "teacher-val", args.model)
    print("teacher test mAP50-95", report["teacher"]["test_map"])
    if args.train_teacher:
        (out / "report.json").write_text(json.dumps(report, indent=2))
        return

    search_epochs = 1 if args.tiny else args.search_epochs
    tas = tu.search(
        teacher, data, epochs=search_epochs, flops_ratio=args.ratio, name="search", **common
    )
    tas.save_shape(out / "shape.json")
    student = tas.prune()  # a DetectionModel, physically smaller, weights from the search
    epochs = 1 if args.tiny else args.finetune_epochs
    trainer = tu.finetune(
        student,
        data,
        teacher=None if args.no_kd else teacher,
        epochs=epochs,
        name="student",
        **common,
    )
    from ultralytics.nn.tasks import load_checkpoint

    student = load_checkpoint(str(trainer.best))[0].float().eval()
    report["student"] = {"flops": flops(student, size)}
    report["student"]["test_map"] = validate(trainer.best, data, size, out, "student-val")
    report["flops_ratio"] = report["student"]["flops"] / report["teacher"]["flops"]
    print(
        "student test mAP50-95", report["student"]["test_map"], "FLOPs ratio", report["flops_ratio"]
    )

    # Save without pickling the class: the shape and the weights; rebuild from a fresh model.
    torch.save(student.state_dict(), out / "student.pt")
    rebuilt = tasprune.prune(
        build_yolo(args.model).eval(),
        out / "shape.json",
        example_inputs=torch.zeros(1, 3, size, size),
        pruned_state=torch.load(out / "student.pt", weights_only=True),
    )
    x = torch.rand(2, 3, size, size)
    report["reload_equal"] = bool(torch.equal(raw(rebuilt, x), raw(student, x)))
    report["onnx_max_abs_diff"] = onnx_parity(trainer.best, student, size)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("flops_ratio", "reload_equal", "onnx_max_abs_diff")}))


if __name__ == "__main__":
    sys.exit(main())
