"""TAS beyond classification: a torchvision detector and segmenter pruned to 0.5 of their FLOPs,
against Torch-Pruning's magnitude (L1) pruning and uniform width scaling, on the canvas set.

    python bench/bench_tasks.py detection --seeds 0 1 2 --out /tmp/tasks      # resumable
    python bench/bench_tasks.py segmentation --seeds 0 1 2 --out /tmp/tasks
    python bench/bench_tasks.py detection --latency --out /tmp/tasks          # alone, after
    python bench/bench_tasks.py detection --arms tas_kd --width-snap 8 --out /tmp/snap8

The task's code is the example's (examples/detection.py: SSDlite320-MobileNetV3, COCO's
mAP@[.5:.95]; examples/segmentation.py: LRASPP-MobileNetV3, mIoU), its teacher the committed
one (bench/teachers/canvas-*.pt). Arms, each seed:

- ``tas_kd``: TAS in the user's loop (``--search-epochs`` over the training canvases split in
  two halves), the kept shape pruned with the searched weights, fine-tuned with distillation;
- ``tas_ft``: the same search and shape, fine-tuned without distillation (what KD adds);
- ``l1_kd``: Torch-Pruning's documented approach: ``tp.pruner.MagnitudePruner`` with L1
  importance, the same layers ignored (what feeds the outputs), one pruning ratio for every
  layer bisected so that the counted FLOPs land in the band; fine-tuned with distillation;
- ``uniform_kd``: every searchable width times one factor (`tasprune.baselines.uniform_shape`,
  the teacher's leading channels), fine-tuned with distillation.

Every arm's fine-tuning has the same schedule; the table reports the training images each arm
saw (the search's included). Results go to OUT/TASK/results.json after every arm (a rerun
skips finished arms) and bench/results/tasks-TASK.{json,md}. ``--latency`` times the teacher
and each arm's seed-0 network alone (eager and ONNX Runtime, batch 1 and 32, one thread) and
checks ONNX parity on the raw outputs (the detector's head outputs before box decoding).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
ARMS = ("tas_kd", "tas_ft", "l1_kd", "uniform_kd")
TOLERANCE = 0.05


def example(task: str) -> Any:
    """The example script of ``task`` as a module (its functions are the task's code)."""
    path = ROOT / "examples" / f"{task}.py"
    spec = importlib.util.spec_from_file_location(f"example_{task}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class Task:
    """What differs between detection and segmentation: data, metric, loss hooks, outputs."""

    def __init__(
        self, name: str, counts: tuple[int, int, int], kd_stages: Sequence[str] = ()
    ) -> None:
        from tasprune.tasks import CanvasDetection, CanvasSegmentation, build_canvas_set

        self.name, self.ex = name, example(name)
        self.kd_stages = list(kd_stages)  # detection: feature maps distilled beside the head
        root = build_canvas_set(size=self.ex.SIZE, counts=counts)
        if name == "detection":
            self.train = CanvasDetection(root, "train", channels=3, transforms=self.ex.flip)
            self.val, self.test = (CanvasDetection(root, s, channels=3) for s in ("val", "test"))
            self.metric = "map"
        else:
            self.train, self.val, self.test = (
                CanvasSegmentation(root, s, channels=3) for s in ("train", "val", "test")
            )
            self.metric = "miou"

    def build(self) -> nn.Module:
        return self.ex.build_detector() if self.name == "detection" else self.ex.build_segmenter()

    def teacher(self) -> nn.Module:
        model = self.build()
        state = torch.load(self.ex.TEACHER, weights_only=True)
        model.load_state_dict(
            {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        )
        return model.eval()

    def score(self, model: nn.Module, split: Any) -> float:
        got = self.ex.evaluate(model, split)
        return float(got["map"] if isinstance(got, dict) else got)

    def example_inputs(self) -> Any:
        if self.name == "detection":
            return next(iter(self.ex.loader(self.train, 2, 0)))
        return torch.stack([self.train[0][0], self.train[1][0]])

    def exported(self, model: nn.Module) -> nn.Module:
        """The raw outputs that are exported and compared (no post-processing)."""
        return self.ex.HeadOutputs(model) if self.name == "detection" else self.ex.Logits(model)

    def output_layers(self, model: nn.Module) -> list[nn.Module]:
        """The layers whose outputs are the network's outputs (kept by every method)."""
        if self.name == "detection":
            heads = (model.head.classification_head, model.head.regression_head)
            return [m[1] for h in heads for m in h.module_list]
        return [model.classifier.low_classifier, model.classifier.high_classifier]

    def finetune(
        self, student: nn.Module, teacher: nn.Module | None, epochs: int, seed: int
    ) -> None:
        if self.name == "detection":
            kd = None
            if teacher is not None:
                kd = self.ex.distiller(teacher, student, [self.test[0][0]], self.kd_stages)
            self.ex.train(
                student,
                self.train,
                epochs,
                lr=1e-3,
                seed=seed,
                every=0,
                extra=None if kd is None else lambda batch, _: kd((batch[0],), None),
                extra_params=() if kd is None else kd.parameters(),
            )
            if kd is not None:
                kd.remove()
        else:
            import tasprune

            kd = None
            if teacher is not None:
                kd = tasprune.Distiller(teacher, student, outputs={"out": "soft"}, temperature=2.0)
            self.ex.train(
                student,
                self.train,
                epochs,
                lr=1e-3,
                seed=seed,
                every=0,
                extra=None if kd is None else lambda images, out: kd(images, out),
            )

    def flops(self, model: nn.Module) -> int:
        return int(self.ex.flops(model))


def l1_pruned(task: Task, teacher: nn.Module, ratio: float) -> tuple[nn.Module, float]:
    """Torch-Pruning's MagnitudePruner (L1), one ratio for every layer, bisected into the band
    [ratio - tolerance, ratio] of the counted FLOPs; the pruned copy and that layer ratio."""
    import torch_pruning as tp

    full = task.flops(teacher)

    def prune_at(r: float) -> nn.Module:
        model = copy.deepcopy(teacher).eval()
        pruner = tp.pruner.MagnitudePruner(
            model,
            task.example_inputs() if task.name == "segmentation" else (task.example_inputs()[0],),
            importance=tp.importance.MagnitudeImportance(p=1),
            pruning_ratio=r,
            ignored_layers=task.output_layers(model),
            round_to=8,
        )
        pruner.step()
        return model

    found = bisect_layer_ratio(prune_at, lambda m: task.flops(m) / full, ratio)
    if found is None or found[2] < ratio - TOLERANCE:
        raise RuntimeError(f"Torch-Pruning's layer ratio found no FLOPs in the band near {ratio}")
    return found[0], found[1]


def bisect_layer_ratio(
    prune_at: Any, ratio_of: Any, ratio: float
) -> tuple[nn.Module, float, float] | None:
    """Bisect Torch-Pruning's one layer ratio (12 steps over [0, 0.95]) until the network's
    FLOPs ratio (``ratio_of``) lands in the band [ratio - tolerance, ratio]: (the largest
    network found at or under ``ratio``, its layer ratio, its FLOPs ratio), None if none."""
    lo, hi = 0.0, 0.95
    under: tuple[nn.Module, float, float] | None = None
    for _ in range(12):
        mid = (lo + hi) / 2
        model = prune_at(mid)
        got = ratio_of(model)
        if got > ratio:
            lo = mid
        else:
            hi = mid
            if under is None or got > under[2]:
                under = (model, mid, got)
            if got >= ratio - TOLERANCE:
                break
    return under


def run_arm(task: Task, arm: str, seed: int, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    import tasprune
    from tasprune.baselines import uniform_shape
    from tasprune.models import get_model_spec
    from tasprune.models.traced import register_module

    teacher = task.teacher()
    n_train = len(task.train)
    images = 0
    extra: dict[str, Any] = {}
    start = time.perf_counter()
    folder = out / f"{arm}-seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    if arm.startswith("tas"):
        shared = out / f"tas-seed{seed}"
        shared.mkdir(parents=True, exist_ok=True)
        if not (shared / "shape.json").is_file():
            tas = task.ex.search(
                copy.deepcopy(teacher),
                task.train,
                args.search_epochs,
                args.ratio,
                seed=seed,
                width_snap=args.width_snap,
            )
            tas.save_shape(shared / "shape.json")
            torch.save(tas.prune().state_dict(), shared / "searched.pt")
        extra["shape"] = json.loads((shared / "shape.json").read_text())  # to rebuild or time
        student = tasprune.prune(
            task.build().train(),
            shared / "shape.json",
            example_inputs=task.example_inputs(),
            pruned_state=torch.load(shared / "searched.pt", weights_only=True),
        )
        images += 2 * (n_train // 2) * args.search_epochs  # weight + architecture steps' images
    elif arm == "l1_kd":
        student, layer_ratio = l1_pruned(task, teacher, args.ratio)
        extra["tp_layer_ratio"] = layer_ratio
    else:
        name = register_module(copy.deepcopy(teacher).train(), task.example_inputs())
        spec = get_model_spec(name)
        shape = uniform_shape(name, args.ratio, spec.default_input, 10, TOLERANCE)
        student = tasprune.prune(
            task.build().train(),
            shape,
            example_inputs=task.example_inputs(),
            state=teacher.state_dict(),
        )
    torch.manual_seed(seed)
    task.finetune(student.train(), None if arm == "tas_ft" else teacher, args.finetune_epochs, seed)
    images += n_train * args.finetune_epochs
    student.eval()
    row = {
        "arm": arm,
        "seed": seed,
        "metric": task.metric,
        "test": task.score(student, task.test),
        "val": task.score(student, task.val),
        "flops_ratio": task.flops(student) / task.flops(teacher),
        "params_ratio": sum(p.numel() for p in student.parameters())
        / sum(p.numel() for p in teacher.parameters()),
        "images_seen": images,
        "seconds": time.perf_counter() - start,
        **extra,
    }
    torch.save(student, folder / "student.pt")  # the benchmark's own copy (pickled modules)
    return row


def latency(task: Task, out: Path, threads: int) -> dict[str, Any]:
    """Eager and ONNX Runtime medians of the teacher and each arm's seed-0 network, alone,
    timed by `tasprune.latency` (the ONNX file exported and checked by the example's own
    ``export_onnx``)."""
    from tasprune.latency import LatencySettings, measure, measure_onnx_latency

    torch.set_num_threads(threads)
    nets = {"teacher": task.teacher()}
    for arm in ARMS:
        path = out / f"{arm}-seed0" / "student.pt"
        if path.is_file():
            nets[arm] = torch.load(path, weights_only=False)
    size = (3, task.ex.SIZE, task.ex.SIZE)
    rows: dict[str, Any] = {}
    for name, model in nets.items():
        net = task.exported(model.eval()).eval()
        path = out / f"{name}.onnx"
        entry: dict[str, Any] = {"onnx_max_abs_diff": task.ex.export_onnx(model, path)}
        for batch in (1, 32):
            eager = LatencySettings("eager", batch, threads, 15, 3)
            entry[f"eager_ms_b{batch}"] = measure(net, size, eager)["median_ms"]
            onnx = measure_onnx_latency(path, size, batch, 15, 3, threads=threads)
            entry[f"onnx_ms_b{batch}"] = onnx["median_ms"]
        rows[name] = entry
    return rows


def search_words(settings: dict[str, Any]) -> str:
    """The TAS arms' search in words (also bench_yolo's)."""
    snap = settings.get("width_snap", 1)
    return (
        f"Search {settings['search_epochs']} epochs (TAS arms"
        f"{f', widths in multiples of {snap}' if snap != 1 else ''})"
    )


def settings_line(settings: dict[str, Any]) -> str:
    """The schedule every arm had, in words."""
    stages = settings.get("kd_stages")
    return (
        f"{search_words(settings)}; every arm fine-tuned "
        f"{settings['finetune_epochs']} epochs (AdamW, cosine), distillation on the outputs"
        f"{' and ' + ', '.join(stages) if stages else ''}."
    )


def table(task: Task, results: dict[str, Any]) -> str:
    metric = {"map": "mAP@[.5:.95]", "miou": "mIoU"}[task.metric]
    teacher = results["teacher"]
    lines = [
        f"# {task.name}: TAS vs Torch-Pruning L1 vs uniform at {results['ratio']} of the FLOPs",
        "",
        f"Teacher: test {metric} {teacher['test']:.4f}, {teacher['flops'] / 1e6:.1f} MMACs.",
        "",
        settings_line(results["settings"]),
        *arm_lines(results["rows"], teacher["test"], metric),
    ]
    lat = results.get("latency")
    if lat:
        lines += latency_lines(lat, "")
    return "\n".join(lines) + "\n"


def arm_lines(rows: list[dict[str, Any]], teacher: float, metric: str) -> list[str]:
    """The methods' table: each arm's test score over its seeds (mean +- std), its share of
    the teacher's, FLOPs and params ratios, the training images it saw."""
    lines = [
        "",
        f"| method | test {metric} (mean +- std) | of teacher | FLOPs ratio | params ratio | "
        "images seen | seeds |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for arm in ARMS:
        mine = [r for r in rows if r["arm"] == arm]
        if not mine:
            continue
        vals = [r["test"] for r in mine]
        mean = statistics.mean(vals)
        std = statistics.stdev(vals) if len(vals) > 1 else 0.0
        share = f"{mean / teacher:.3f}" if teacher > 0 else "n/a"
        lines.append(
            f"| {arm} | {mean:.4f} +- {std:.4f} | {share} | "
            f"{statistics.mean(r['flops_ratio'] for r in mine):.3f} | "
            f"{statistics.mean(r['params_ratio'] for r in mine):.3f} | "
            f"{mine[0]['images_seen']:,} | {len(mine)} |"
        )
    return lines


def latency_lines(lat: dict[str, Any], note: str) -> list[str]:
    """The latency table of ``--latency``'s rows (teacher first), ratios to the teacher."""
    lines = [
        "",
        f"Latency (one thread, medians of 15, timed alone; ratios to the teacher{note}):",
        "",
        "| network | eager b1 | eager b32 | ONNX b1 | ONNX b32 | ONNX parity |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    t = lat["teacher"]
    for name, e in lat.items():
        cells = [
            f"{e[k]:.2f} ms ({e[k] / t[k]:.2f}x)"
            for k in ("eager_ms_b1", "eager_ms_b32", "onnx_ms_b1", "onnx_ms_b32")
        ]
        lines.append(f"| {name} | {' | '.join(cells)} | {e['onnx_max_abs_diff']:.1e} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("task", choices=("detection", "segmentation"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--search-epochs", type=int, default=4)
    ap.add_argument("--finetune-epochs", type=int, default=8)
    ap.add_argument("--counts", type=int, nargs=3, default=(4000, 500, 1000))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--width-snap", type=int, default=1, help="TAS widths in multiples of this (8: ONNX RT)"
    )
    ap.add_argument(
        "--kd-stages",
        nargs="+",
        default=[],
        help="detection: feature maps distilled too (mse, 1x1 adapters), e.g. backbone.features.0",
    )
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--latency", action="store_true", help="time the saved networks (alone)")
    ap.add_argument("--teacher", type=Path, default=None, help="another teacher state dict")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    task = Task(args.task, tuple(args.counts), args.kd_stages)
    if args.teacher is not None:
        task.ex.TEACHER = args.teacher
    out = args.out / args.task
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    settings = {k: getattr(args, k) for k in ("ratio", "search_epochs", "finetune_epochs")}
    settings["counts"] = list(args.counts)
    if args.width_snap != 1:  # recorded only where set: earlier results had no such setting
        settings["width_snap"] = args.width_snap
    if args.kd_stages:
        if args.task != "detection":
            sys.exit("error: --kd-stages is for detection. Fix: leave it out for segmentation")
        settings["kd_stages"] = args.kd_stages
    if results and results.get("settings") != settings:
        sys.exit(
            f"error: {path} holds another protocol ({results.get('settings')}). Fix: use another --out"
        )
    results.setdefault("settings", settings)
    results.setdefault("ratio", args.ratio)
    results.setdefault("rows", [])
    if "teacher" not in results:
        teacher = task.teacher()
        results["teacher"] = {
            "test": task.score(teacher, task.test),
            "val": task.score(teacher, task.val),
            "flops": task.flops(teacher),
        }
    if args.latency:
        results["latency"] = latency(task, out, args.threads)
    else:
        done = {(r["arm"], r["seed"]) for r in results["rows"]}
        for seed in args.seeds:
            for arm in args.arms:
                if (arm, seed) in done:
                    continue
                row = run_arm(task, arm, seed, args, out)
                print(json.dumps(row), flush=True)
                results["rows"].append(row)
                path.write_text(json.dumps(results, indent=2))
    path.write_text(json.dumps(results, indent=2))
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"tasks-{args.task}.json").write_text(json.dumps(results, indent=2))
    md = table(task, results)
    (args.results / f"tasks-{args.task}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
