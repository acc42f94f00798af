"""Prune a trained torchvision segmenter to half its FLOPs in your own training loop.

Everything here is the user's code: the segmenter (torchvision's LRASPP-MobileNetV3, a dict
output ``{"out": logits}``), the data, the loss, the optimiser and the loops. tasprune supplies
`tasprune.TAS`, `tasprune.Distiller` (per-pixel distillation of the class scores) and
`tasprune.prune` (a saved shape applied to a freshly built original).

    python examples/segmentation.py --out runs/segmentation          # committed teacher
    python examples/segmentation.py --tiny --out /tmp/segmentation   # a smoke run

The data is the offline canvas set (`tasprune.tasks.build_canvas_set`): Fashion-MNIST items
on 96 x 96 grey canvases, each pixel labelled with its item's class (0: background), built on
first use and cached. Steps as examples/detection.py: load the teacher
(bench/teachers/canvas-lraspp.pt; ``--train-teacher`` trains one), search at 0.5 of its
FLOPs, prune, fine-tune with distillation, score mIoU on the test split, save shape + weights,
rebuild from a fresh original, export to ONNX with parity.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

import tasprune
from tasprune.tasks import CanvasSegmentation, build_canvas_set, miou

TEACHER = Path(__file__).resolve().parent.parent / "bench" / "teachers" / "canvas-lraspp.pt"
SIZE = 96
CLASSES = CanvasSegmentation.num_classes  # the background and the ten item classes


def build_segmenter() -> nn.Module:
    """The user's segmenter: LRASPP-MobileNetV3 for 11 classes, no downloaded weights."""
    from torchvision.models.segmentation import lraspp_mobilenet_v3_large

    return lraspp_mobilenet_v3_large(num_classes=CLASSES, weights=None, weights_backbone=None)


def loader(data: Any, batch: int, seed: int, train: bool = True) -> DataLoader:
    return DataLoader(data, batch, shuffle=train, generator=torch.Generator().manual_seed(seed))


def augment(images: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
    """A random horizontal flip of each image with its mask."""
    flip = torch.rand(images.shape[0]) < 0.5
    images, masks = images.clone(), masks.clone()
    images[flip], masks[flip] = images[flip].flip(-1), masks[flip].flip(-1)
    return images, masks


def train(
    model: nn.Module,
    data: Any,
    epochs: int,
    *,
    lr: float = 2e-3,
    batch: int = 32,
    seed: int = 0,
    extra: Callable[[Tensor, Any], Tensor] | None = None,
    every: int = 0,
    val: Any = None,
    log: Callable[[str], None] = print,
) -> list[dict[str, float]]:
    """The user's loop: AdamW, cosine schedule, per-pixel cross-entropy (+ ``extra(images,
    output)``, e.g. distillation); mIoU on ``val`` every ``every`` epochs."""
    torch.manual_seed(seed)
    batches = loader(data, batch, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps, warm = epochs * len(batches), len(batches) // 2

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    history = []
    for epoch in range(epochs):
        model.train()
        total, start = 0.0, time.perf_counter()
        for images, masks in batches:
            images, masks = augment(images, masks)
            out = model(images)
            loss = F.cross_entropy(out["out"], masks)
            if extra is not None:
                loss = loss + extra(images, out)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach())
        row = {"epoch": epoch + 1, "loss": total / len(batches)}
        row["seconds"] = time.perf_counter() - start
        if val is not None and every and ((epoch + 1) % every == 0 or epoch + 1 == epochs):
            row["val_miou"] = evaluate(model, val)
        log(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}))
        history.append(row)
    return history


@torch.no_grad()
def evaluate(model: nn.Module, data: Any, batch: int = 64) -> float:
    """mIoU over the 11 classes (background included) on a canvas split."""
    model.eval()
    preds, targets = [], []
    for images, masks in loader(data, batch, 0, train=False):
        preds.append(model(images)["out"].argmax(1))
        targets.append(masks)
    return miou(torch.cat(preds), torch.cat(targets), CLASSES)


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
    architecture step on the other half after each, the same cross-entropy in both."""
    half = len(data) // 2
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).tolist()
    split_a, split_b = Subset(data, order[:half]), Subset(data, order[half:])
    example = torch.stack([data[i][0] for i in order[:2]])
    tas = tasprune.TAS(
        teacher.train(),
        example,
        epochs=epochs,
        flops_ratio=ratio,
        arch_lr=0.05,
        seed=seed,
        width_snap=width_snap,  # 8: widths an ONNX Runtime's kernels run fast
    )
    net = tas.model  # your segmenter, searchable; the architecture logits live in `tas`
    opt = torch.optim.AdamW(net.parameters(), lr=5e-4, weight_decay=1e-4)
    pairs = zip(loader(split_a, batch, seed), loader(split_b, batch, seed + 1), strict=False)
    for _ in range(epochs):
        net.train()
        for (xa, ya), (xb, yb) in pairs:
            loss = F.cross_entropy(net(xa)["out"], ya)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tas.arch_step(lambda xb=xb, yb=yb: F.cross_entropy(net(xb)["out"], yb))
        pairs = zip(loader(split_a, batch, seed), loader(split_b, batch, seed + 1), strict=False)
        log(json.dumps({"search": tas.end_epoch()}, default=float))
    return tas


class Logits(nn.Module):
    """What is exported: the class scores per pixel."""

    def __init__(self, segmenter: nn.Module) -> None:
        super().__init__()
        self.segmenter = segmenter

    def forward(self, x: Tensor) -> Tensor:
        return self.segmenter(x)["out"]


def export_onnx(segmenter: nn.Module, path: Path) -> float:
    """Export to ONNX; the largest difference from eager in ONNX Runtime."""
    import onnxruntime as ort

    net = Logits(segmenter).eval()
    x = torch.rand(2, 3, SIZE, SIZE)
    torch.onnx.export(
        net,
        (x,),
        str(path),
        input_names=["images"],
        output_names=["logits"],
        dynamic_axes={"images": {0: "batch"}},
        dynamo=False,
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    with torch.no_grad():
        return float((got - net(x)).abs().max())


def flops(segmenter: nn.Module) -> int:
    """Multiply-accumulates of one image (counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        segmenter.eval()(torch.rand(1, 3, SIZE, SIZE))
    return counter.get_total_flops() // 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/segmentation"))
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
    train_set, val_set, test_set = (
        CanvasSegmentation(root, s, channels=3) for s in ("train", "val", "test")
    )
    teacher = build_segmenter()
    if args.tiny or args.train_teacher or not TEACHER.is_file():
        epochs = 1 if args.tiny else args.teacher_epochs
        train(teacher, train_set, epochs, seed=args.seed, every=5, val=val_set)
        if args.train_teacher:
            half = {
                k: v.half() if v.is_floating_point() else v for k, v in teacher.state_dict().items()
            }
            torch.save(half, args.out / "teacher.pt")
    else:
        state = torch.load(TEACHER, weights_only=True)
        teacher.load_state_dict(
            {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        )
    report: dict[str, Any] = {
        "teacher": {"test": {"miou": evaluate(teacher, test_set)}, "flops": flops(teacher)}
    }
    print("teacher test mIoU", report["teacher"]["test"]["miou"])

    tas = search(
        teacher, train_set, 1 if args.tiny else args.search_epochs, args.ratio, seed=args.seed
    )
    tas.save_shape(args.out / "shape.json")
    student = tas.prune()  # an LRASPP, physically smaller, weights from the searched network
    teacher.eval()
    kd = None
    if not args.no_kd:
        kd = tasprune.Distiller(teacher, student, outputs={"out": "soft"}, temperature=2.0)
    epochs = 1 if args.tiny else args.finetune_epochs
    train(
        student,
        train_set,
        epochs,
        lr=1e-3,
        seed=args.seed,
        every=epochs,
        val=val_set,
        extra=None if kd is None else lambda images, out: kd(images, out),
    )
    report["student"] = {"test": {"miou": evaluate(student, test_set)}, "flops": flops(student)}
    report["flops_ratio"] = report["student"]["flops"] / report["teacher"]["flops"]
    print(
        "student test mIoU", report["student"]["test"]["miou"], "FLOPs ratio", report["flops_ratio"]
    )

    torch.save(student.state_dict(), args.out / "student.pt")  # the shape + weights, no pickle
    example = torch.stack([test_set[0][0], test_set[1][0]])
    rebuilt = tasprune.prune(
        build_segmenter(),
        args.out / "shape.json",
        example_inputs=example,
        pruned_state=torch.load(args.out / "student.pt", weights_only=True),
    )
    with torch.no_grad():
        report["reload_equal"] = bool(
            rebuilt.eval()(example)["out"].equal(student.eval()(example)["out"])
        )
    report["onnx_max_abs_diff"] = export_onnx(student, args.out / "student.onnx")
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("flops_ratio", "reload_equal", "onnx_max_abs_diff")}))


if __name__ == "__main__":
    main()
