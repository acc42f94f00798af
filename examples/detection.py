"""Prune a trained torchvision detector to half its FLOPs in your own training loop.

Everything here is the user's code: the detector (torchvision's SSDlite320-MobileNetV3, its
own losses), the data, the optimiser and the loops. tasprune supplies `tasprune.TAS` (the
searchable network and the architecture step), `tasprune.Distiller` (a KD loss term on the
head's raw outputs) and `tasprune.prune` (a saved shape applied to a freshly built original).

    python examples/detection.py --out runs/detection          # committed teacher, ~25 min
    python examples/detection.py --tiny --out /tmp/detection   # a smoke run, under a minute

The data is the offline canvas set (`tasprune.tasks.build_canvas_set`): Fashion-MNIST items
on 96 x 96 grey canvases with their boxes, built on first use and cached. Steps: load the
teacher (bench/teachers/canvas-ssdlite.pt, trained by ``--train-teacher``; the file says
how) or train one; search a shape at 0.5 of its FLOPs (weight steps on one half of the
training canvases, architecture steps on the other, the loss is the detector's own loss
dict summed); prune it; fine-tune the pruned detector with its loss plus distillation of
the teacher's class scores and box regressions; score both with COCO's mAP@[.5:.95] on the
test split; save the shape and weights, rebuild from a fresh original and check the
detections are the same; export the raw head outputs to ONNX and check ONNX Runtime's.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

import tasprune
from tasprune.tasks import CanvasDetection, build_canvas_set, coco_map, collate, to_coco_detections

TEACHER = Path(__file__).resolve().parent.parent / "bench" / "teachers" / "canvas-ssdlite.pt"
SIZE = 96
CLASSES = 11  # the background and Fashion-MNIST's ten classes
Batch = tuple[list[Tensor], list[dict[str, Any]]]


def build_detector(size: int = SIZE) -> nn.Module:
    """The user's detector: SSDlite320-MobileNetV3 for the canvas set, resizing to ``size``
    (torchvision resizes to 320 unless told), no downloaded weights."""
    from torchvision.models.detection import ssdlite320_mobilenet_v3_large

    model = ssdlite320_mobilenet_v3_large(num_classes=CLASSES, weights=None, weights_backbone=None)
    model.transform.min_size, model.transform.max_size = (size,), size
    model.transform.fixed_size = (size, size)
    return model


def flip(image: Tensor, target: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
    """A random horizontal flip of an image and its boxes (the training augmentation)."""
    if torch.rand(()) < 0.5:
        return image, target
    width = image.shape[-1]
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    return image.flip(-1), {**target, "boxes": boxes}


def loader(data: Any, batch: int, seed: int, train: bool = True) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(data, batch, shuffle=train, collate_fn=collate, generator=gen)


def detection_loss(losses: dict[str, Tensor]) -> Tensor:
    """The detector's own training loss: the sum of its loss dict."""
    return sum(losses.values(), torch.zeros(()))


def cosine(opt: torch.optim.Optimizer, steps: int, warmup: int = 0) -> Any:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def train(
    model: nn.Module,
    data: Any,
    epochs: int,
    *,
    lr: float = 2e-3,
    batch: int = 32,
    seed: int = 0,
    extra: Callable[[Batch, dict[str, Tensor]], Tensor] | None = None,
    extra_params: Iterable[nn.Parameter] = (),
    every: int = 0,
    val: Any = None,
    log: Callable[[str], None] = print,
) -> list[dict[str, float]]:
    """The user's training loop: AdamW, cosine schedule, the detector's loss (+ ``extra``,
    e.g. a distillation term, on the same batch); evaluated on ``val`` every ``every`` epochs."""
    torch.manual_seed(seed)
    batches = loader(data, batch, seed)
    params = [*model.parameters(), *extra_params]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    sched = cosine(opt, epochs * len(batches), warmup=len(batches) // 2)
    history = []
    for epoch in range(epochs):
        model.train()
        total, start = 0.0, time.perf_counter()
        for images, targets in batches:
            losses = model(images, targets)
            loss = detection_loss(losses)
            if extra is not None:
                loss = loss + extra((images, targets), losses)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, 10.0)
            opt.step()
            sched.step()
            total += float(loss.detach())
        row = {"epoch": epoch + 1, "loss": total / len(batches)}
        row["seconds"] = time.perf_counter() - start
        if val is not None and every and ((epoch + 1) % every == 0 or epoch + 1 == epochs):
            row["val_map"] = evaluate(model, val)["map"]
        log(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}))
        history.append(row)
    return history


@torch.no_grad()
def evaluate(model: nn.Module, data: CanvasDetection, batch: int = 64) -> dict[str, float]:
    """COCO's mAP of the detector on a canvas split (pycocotools' COCOeval)."""
    model.eval()
    results = []
    for images, targets in loader(data, batch, 0, train=False):
        results += to_coco_detections(model(images), [t["image_id"] for t in targets])
    return coco_map(data.annotation_file, results)


def search(
    teacher: nn.Module,
    data: Any,
    epochs: int,
    ratio: float,
    *,
    batch: int = 32,
    seed: int = 0,
    width_snap: int = 1,
    log: Callable[[str], None] = print,
) -> tasprune.TAS:
    """TAS in the user's loop: weight steps on one half of the training canvases, an
    architecture step on the other half after each, the detector's own loss in both."""
    half = len(data) // 2
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).tolist()
    split_a, split_b = Subset(data, order[:half]), Subset(data, order[half:])
    example = next(iter(loader(split_a, 2, seed)))  # the detector traced as it trains
    tas = tasprune.TAS(
        teacher.train(),
        example,
        epochs=epochs,
        flops_ratio=ratio,
        arch_lr=0.05,
        seed=seed,
        width_snap=width_snap,  # 8: widths an ONNX Runtime's kernels run fast
    )
    net = tas.model  # your detector, searchable; the architecture logits live in `tas`
    opt = torch.optim.AdamW(net.parameters(), lr=5e-4, weight_decay=1e-4)
    for _ in range(epochs):
        net.train()
        for (xa, ya), (xb, yb) in zip(
            loader(split_a, batch, seed), loader(split_b, batch, seed + 1), strict=False
        ):
            loss = detection_loss(net(xa, ya))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tas.arch_step(lambda xb=xb, yb=yb: detection_loss(net(xb, yb)))
        log(json.dumps({"search": tas.end_epoch()}, default=float))
    return tas


def distiller(
    teacher: nn.Module, student: nn.Module, example: list[Tensor], stages: Sequence[str] = ()
) -> tasprune.Distiller:
    """KD on the head's raw outputs: the class scores (soft, over the classes of each anchor)
    and the box regressions (mean squared error); ``stages``: feature maps to distil as well
    (mean squared error through a learned 1x1 adapter where the student is narrower, e.g.
    ``backbone.features.0``, ``backbone.features.1``)."""
    return tasprune.Distiller(
        teacher,
        student,
        features={
            "head.classification_head": "soft",
            "head.regression_head": "mse",
            **dict.fromkeys(stages, "mse"),
        },
        class_dim=-1,
        temperature=2.0,
        example_inputs=(example,),
    )


class HeadOutputs(nn.Module):
    """What is exported: the detector's raw head outputs on a normalised, resized batch
    (class scores and box regressions per anchor), before box decoding and NMS."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = detector.backbone, detector.head

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = list(self.backbone(x).values())
        out = self.head(features)
        return out["cls_logits"], out["bbox_regression"]


def export_onnx(detector: nn.Module, path: Path, size: int = SIZE) -> float:
    """Export the head outputs to ONNX; the largest difference from eager in ONNX Runtime."""
    import onnxruntime as ort

    net = HeadOutputs(detector).eval()
    x = torch.rand(2, 3, size, size)
    torch.onnx.export(
        net,
        (x,),
        str(path),
        input_names=["images"],
        dynamo=False,
        output_names=["scores", "boxes"],
        dynamic_axes={"images": {0: "batch"}},
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": x.numpy()})
    with torch.no_grad():
        want = net(x)
    return max(float((torch.from_numpy(g) - w).abs().max()) for g, w in zip(got, want, strict=True))


def flops(detector: nn.Module, size: int = SIZE) -> int:
    """Multiply-accumulates of one image through the detector's backbone and head (counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        HeadOutputs(detector).eval()(torch.rand(1, 3, size, size))
    return counter.get_total_flops() // 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/detection"))
    ap.add_argument("--ratio", type=float, default=0.5, help="FLOPs budget of the search")
    ap.add_argument("--search-epochs", type=int, default=4)
    ap.add_argument("--finetune-epochs", type=int, default=8)
    ap.add_argument("--teacher-epochs", type=int, default=30)
    ap.add_argument("--train-teacher", action="store_true", help="train the teacher here")
    ap.add_argument("--no-kd", action="store_true", help="fine-tune without distillation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--tiny", action="store_true", help="a smoke run on a few canvases")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    counts = (48, 16, 16) if args.tiny else (4000, 500, 1000)
    root = build_canvas_set(size=SIZE, counts=counts)
    train_set = CanvasDetection(root, "train", channels=3, transforms=flip)
    val_set, test_set = (CanvasDetection(root, s, channels=3) for s in ("val", "test"))
    teacher = build_detector()
    if args.tiny or args.train_teacher or not TEACHER.is_file():
        epochs = 1 if args.tiny else args.teacher_epochs
        train(teacher, train_set, epochs, seed=args.seed, every=5, val=val_set)
        if args.train_teacher:
            torch.save(
                {
                    k: v.half() if v.is_floating_point() else v
                    for k, v in teacher.state_dict().items()
                },
                args.out / "teacher.pt",
            )
    else:
        state = torch.load(TEACHER, weights_only=True)
        teacher.load_state_dict(
            {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        )
    teacher.eval()
    report: dict[str, Any] = {
        "teacher": {"test": evaluate(teacher, test_set), "flops": flops(teacher)}
    }
    print("teacher test mAP", report["teacher"]["test"]["map"])

    search_epochs = 1 if args.tiny else args.search_epochs
    tas = search(teacher, train_set, search_epochs, args.ratio, seed=args.seed)
    tas.save_shape(args.out / "shape.json")
    student = tas.prune()  # an SSD, physically smaller, weights from the searched network
    teacher.eval()
    kd = None if args.no_kd else distiller(teacher, student, [test_set[0][0]])
    epochs = 1 if args.tiny else args.finetune_epochs
    train(
        student,
        train_set,
        epochs,
        lr=1e-3,
        seed=args.seed,
        extra=None if kd is None else lambda batch, _: kd((batch[0],), None),
        extra_params=() if kd is None else kd.parameters(),
        every=epochs,
        val=val_set,
    )
    if kd is not None:
        kd.remove()  # its feature hooks: the student is a plain SSD again
    student.eval()
    report["student"] = {"test": evaluate(student, test_set), "flops": flops(student)}
    report["flops_ratio"] = report["student"]["flops"] / report["teacher"]["flops"]
    print(
        "student test mAP", report["student"]["test"]["map"], "FLOPs ratio", report["flops_ratio"]
    )

    # Save without pickling the class: the shape and the weights. Rebuild from a fresh original.
    torch.save(student.state_dict(), args.out / "student.pt")
    fresh = build_detector()
    example = next(iter(loader(train_set, 2, 0)))
    rebuilt = tasprune.prune(
        fresh.train(),
        args.out / "shape.json",
        example_inputs=example,
        pruned_state=torch.load(args.out / "student.pt", weights_only=True),
    )
    image = [test_set[0][0]]
    same = [
        a["boxes"].equal(b["boxes"])
        for a, b in zip(rebuilt.eval()(image), student(image), strict=True)
    ]
    report["reload_equal"] = all(same)
    report["onnx_max_abs_diff"] = export_onnx(student, args.out / "student.onnx")
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("flops_ratio", "reload_equal", "onnx_max_abs_diff")}))


if __name__ == "__main__":
    main()
