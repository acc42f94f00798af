"""TAS inside the Ultralytics trainer: YOLOv8n pruned to 0.5 of its FLOPs, against
Torch-Pruning's magnitude (L1) pruning and uniform width scaling, on the canvas set (issue 30).

    python bench/bench_yolo.py --seeds 0 1 2 --out /tmp/yolo           # resumable
    python bench/bench_yolo.py --latency --out /tmp/yolo               # alone, after
    python bench/bench_yolo.py --tiny --seeds 0 --out /tmp/yolo-smoke  # a smoke run
    python bench/bench_yolo.py --dis 1.0 --arms tas_kd l1_kd uniform_kd --out /tmp/yolo-dis1
    python bench/bench_yolo.py --dis 1.0 --finetune-epochs 10 --warmup-epochs 1 --out /tmp/y10

The task's code is the example's (examples/yolo.py: Ultralytics' YOLOv8n built from its YAML
for the ten classes, Ultralytics' trainer, loss, val (mAP50-95) and ONNX export), run offline
(`tasprune.integrations.ultralytics.offline`, its settings under OUT/ultralytics); its teacher
the committed one (bench/teachers/canvas-yolov8n.pt, a fp16 state dict). Arms, each seed:

- ``tas_kd``: TAS inside the Ultralytics trainer (`tasprune.integrations.ultralytics.search`,
  the joint step, ``--search-epochs``), the kept shape pruned with the searched weights,
  fine-tuned by the stock trainer with Ultralytics' own distillation from the teacher;
- ``tas_ft``: the same search and shape, fine-tuned without distillation (what KD adds);
- ``l1_kd``: Torch-Pruning's documented approach: ``tp.pruner.MagnitudePruner`` with L1
  importance, the Detect head ignored (as Torch-Pruning's YOLOv8 example does), one pruning
  ratio for every layer bisected so that the counted FLOPs land in the band. The stock C2f is
  tried first; when Torch-Pruning cannot prune it (its ``chunk``), every C2f is swapped for
  Torch-Pruning's documented workaround, C2f_v2 (cv1 split into two convolutions, the same
  function), and the results say so. Fine-tuned with distillation;
- ``uniform_kd``: every searchable width times one factor (`tasprune.baselines.uniform_shape`,
  the teacher's leading channels), fine-tuned with distillation.

Sizing (one session on 2 cores): an epoch of YOLOv8n over the 4000 training canvases at
128 px takes about 1.2 min on one quiet thread; per seed the shared search (2 epochs of the
joint step) and four fine-tunings of 5 epochs are about 28 min, 3 seeds about 85 min.

Every arm's fine-tuning has the same schedule (`tasprune.integrations.ultralytics.finetune`);
the table reports the training images each arm saw (the search's included: the joint step
reads each training image once per epoch). Scores are Ultralytics' val of each arm's best.pt
(mAP50-95, test split; the val split too). Results go to OUT/yolo/results.json after every arm
(a rerun skips finished arms) and bench/results/tasks-yolo.{json,md} (``--tiny``: OUT/yolo
only). ``--latency`` times the teacher and each arm's seed-0 network alone (eager, Conv+BN
fused as Ultralytics' predictor runs it, and ONNX Runtime on Ultralytics' export, batch 1 and
32, one thread) and checks ONNX parity on the raw outputs (the decoded head before NMS).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from bench_tasks import (  # shared with the torchvision detection/segmentation benchmark
    TOLERANCE,
    arm_lines,
    bisect_layer_ratio,
    example,
    latency_lines,
    search_words,
)
from torch import nn

from tasprune.integrations import ultralytics as tu

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
ARMS = ("tas_kd", "tas_ft", "l1_kd", "uniform_kd")
CLASSES = 10
C2F_PATCH = (
    "every C2f replaced by C2f_v2 (Torch-Pruning's examples/yolov8/yolov8_pruning.py): cv1 "
    "split into two 1x1 convolutions cv0/cv1 holding its two output halves, forward "
    "y = [cv0(x), cv1(x)] instead of cv1(x).chunk(2, 1); the same function"
)


class C2f_v2(nn.Module):  # noqa: N801 (Torch-Pruning's name)
    """Torch-Pruning's C2f without ``chunk``: ``cv1``'s two output halves as two convolutions
    ``cv0`` and ``cv1`` (weights and batch-norm statistics copied), ``cv2`` and ``m`` the C2f's
    own. Ultralytics' layer attributes (``f``, ``i``, ``type``, ``np``) are kept, so the
    DetectionModel still routes, trains, distils and exports as before."""

    def __init__(self, c2f: nn.Module) -> None:
        from ultralytics.nn.modules import Conv

        super().__init__()
        self.c = int(c2f.c)
        c1 = c2f.cv1.conv.in_channels
        self.cv0, self.cv1 = Conv(c1, self.c, 1, 1), Conv(c1, self.c, 1, 1)
        for half, conv in enumerate((self.cv0, self.cv1)):
            part = slice(half * self.c, (half + 1) * self.c)
            conv.conv.weight.data.copy_(c2f.cv1.conv.weight.data[part])
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(conv.bn, key).data.copy_(getattr(c2f.cv1.bn, key).data[part])
            conv.bn.eps, conv.bn.momentum = c2f.cv1.bn.eps, c2f.cv1.bn.momentum
            conv.act = c2f.cv1.act
        self.cv2, self.m = c2f.cv2, c2f.m
        for attr in ("f", "i", "type", "np"):
            if hasattr(c2f, attr):
                setattr(self, attr, getattr(c2f, attr))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv0(x), self.cv1(x)]
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


def patch_c2f(model: nn.Module) -> int:
    """Swap every C2f of ``model`` for a `C2f_v2` in place (the model object is kept); the
    number swapped."""
    from ultralytics.nn.modules import C2f

    found = [(n, m) for n, m in model.named_modules() if type(m) is C2f]
    for name, module in found:
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, C2f_v2(module))
    return len(found)


class Bench:
    """What every arm shares: the data, the teacher, the trainer's settings and the example."""

    def __init__(self, args: argparse.Namespace, out: Path) -> None:
        import yaml

        from tasprune.tasks import build_canvas_set

        self.ex, self.out, self.tiny = example("yolo"), out, args.tiny
        self.size = 96 if args.tiny else args.size
        counts = (64, 16, 16) if args.tiny else tuple(args.counts)
        self.n_train = counts[0]
        self.data = tu.data_yaml(build_canvas_set(size=self.size, counts=counts), out / "data.yaml")
        # The val split as the example's `validate` reads it (its split "test"), so that the
        # val score is the same code as the test score.
        spec = yaml.safe_load(self.data.read_text())
        spec["test"] = spec["val"]
        self.data_val = out / "data-val.yaml"
        self.data_val.write_text(yaml.safe_dump(spec, sort_keys=False))
        self.common: dict[str, Any] = {
            "imgsz": self.size,
            "batch": args.batch,
            "workers": 0,
            "project": str(out),
            "exist_ok": True,
            "verbose": False,
        }
        # The teacher as an Ultralytics checkpoint (what `YOLO(...)` reads and exports).
        self.teacher_pt = out / "teacher" / ("weights/best.pt" if args.tiny else "teacher.pt")

    def prepare_teacher(self) -> None:
        """--tiny: a 1-epoch teacher trained here; else the state dict as a checkpoint."""
        if self.teacher_pt.is_file():
            return
        if self.tiny:
            torch.manual_seed(0)
            tu.finetune(
                self.ex.build_yolo(), self.data, epochs=1, name="teacher", seed=0, **self.common
            )
        else:
            self.teacher_pt.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"model": self.teacher().half()}, self.teacher_pt)

    def teacher(self) -> nn.Module:
        """A fresh float copy of the teacher in eval mode (Ultralytics' val fuses the module it
        is given and its distillation hooks the teacher: each use gets its own)."""
        if self.tiny:
            from ultralytics.nn.tasks import load_checkpoint

            model = load_checkpoint(str(self.teacher_pt))[0].float()
        else:
            model = self.ex.build_yolo()
            state = torch.load(self.ex.TEACHER, weights_only=True)
            model.load_state_dict(
                {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
            )
        for name, p in model.named_parameters():  # a checkpoint's are frozen; the YAML's are not
            p.requires_grad_(".dfl" not in name)
        return model.eval()

    def flops(self, model: nn.Module) -> int:
        return int(self.ex.flops(model, self.size))

    def example_inputs(self) -> torch.Tensor:
        return torch.zeros(1, 3, self.size, self.size)

    def scores(self, model: nn.Module | Path, folder: Path) -> tuple[float, float]:
        """Ultralytics' val mAP50-95 on the test and the val split (the example's `validate`)."""
        if isinstance(model, nn.Module):
            model = copy.deepcopy(model)  # val fuses the module it is given
        test = self.ex.validate(model, self.data, self.size, folder, "val-test")
        if isinstance(model, nn.Module):
            model = copy.deepcopy(model)
        val = self.ex.validate(model, self.data_val, self.size, folder, "val-val")
        return test, val


class BandError(RuntimeError):
    """No layer ratio of Torch-Pruning's puts the counted FLOPs at or under the budget."""


def l1_pruned(
    bench: Bench, teacher: nn.Module, ratio: float, patched: bool
) -> tuple[nn.Module, float, bool]:
    """Torch-Pruning's MagnitudePruner (L1), one ratio for every layer, the Detect head
    ignored, bisected into the band [ratio - tolerance, ratio] of the counted FLOPs; the
    pruned copy (its C2f swapped for `C2f_v2` first when ``patched``), that layer ratio and
    whether the FLOPs are in the band. With ``round_to=8`` every layer's width steps at the
    same layer ratios, so the FLOPs can jump over the whole band: then the bisection's largest
    network at or under the budget (its edge of the jump), flagged out of the band."""
    import torch_pruning as tp

    full = bench.flops(teacher)

    def prune_at(r: float) -> nn.Module:
        model = copy.deepcopy(teacher).eval()
        if patched:
            patch_c2f(model)
        for name, p in model.named_parameters():  # Torch-Pruning traces the autograd graph
            p.requires_grad_(".dfl" not in name)
        pruner = tp.pruner.MagnitudePruner(
            model,
            bench.example_inputs(),
            importance=tp.importance.MagnitudeImportance(p=1),
            pruning_ratio=r,
            ignored_layers=[model.model[-1]],
            round_to=8,
        )
        pruner.step()
        return model

    under = bisect_layer_ratio(prune_at, lambda m: bench.flops(m) / full, ratio)
    if under is None:
        raise BandError(f"Torch-Pruning's layer ratio found no FLOPs at or under {ratio}")
    model, layer_ratio, got = under
    return model, layer_ratio, got >= ratio - TOLERANCE


def l1_student(bench: Bench, teacher: nn.Module, ratio: float) -> tuple[nn.Module, dict[str, Any]]:
    """The stock model first; on Torch-Pruning's failure, the C2f_v2 workaround (recorded)."""
    try:
        student, layer_ratio, in_band = l1_pruned(bench, teacher, ratio, patched=False)
        return student, {"tp_layer_ratio": layer_ratio, "tp_in_band": in_band, "patched": None}
    except BandError:
        raise
    except Exception as err:  # Torch-Pruning's own failure on the stock C2f, kept as text
        stock = f"{type(err).__name__}: {err}"[:2000]
        print(f"l1_kd: Torch-Pruning failed on the stock C2f ({stock}); using C2f_v2", flush=True)
    check = copy.deepcopy(teacher).eval()
    swapped = patch_c2f(check)
    x = torch.rand(2, 3, bench.size, bench.size)
    diff = float((bench.ex.raw(check, x) - bench.ex.raw(teacher, x)).abs().max())
    student, layer_ratio, in_band = l1_pruned(bench, teacher, ratio, patched=True)
    info = {"patch": C2F_PATCH, "c2f_swapped": swapped, "stock_error": stock, "max_abs_diff": diff}
    return student, {"tp_layer_ratio": layer_ratio, "tp_in_band": in_band, "patched": info}


def run_arm(bench: Bench, arm: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    from ultralytics.nn.tasks import load_checkpoint

    import tasprune
    from tasprune.baselines import uniform_shape
    from tasprune.models import get_model_spec
    from tasprune.models.traced import register_module

    out = bench.out
    teacher = bench.teacher()
    search_epochs = 1 if args.tiny else args.search_epochs
    finetune_epochs = 1 if args.tiny else args.finetune_epochs
    images = 0
    extra: dict[str, Any] = {}
    start = time.perf_counter()
    folder = out / f"{arm}-seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    if arm.startswith("tas"):
        shared = out / f"tas-seed{seed}"
        shared.mkdir(parents=True, exist_ok=True)
        if not (shared / "shape.json").is_file():
            torch.manual_seed(seed)
            tas = tu.search(
                copy.deepcopy(teacher),
                bench.data,
                epochs=search_epochs,
                flops_ratio=args.ratio,
                seed=seed,
                name=shared.name,
                tas_settings={"width_snap": args.width_snap} if args.width_snap != 1 else None,
                **bench.common,
            )
            torch.save(tas.prune().state_dict(), shared / "searched.pt")
            tas.save_shape(shared / "shape.json")  # last: the search is done when it exists
        extra["shape"] = json.loads((shared / "shape.json").read_text())  # to rebuild or time
        student = tasprune.prune(
            bench.ex.build_yolo().eval(),
            shared / "shape.json",
            example_inputs=bench.example_inputs(),
            pruned_state=torch.load(shared / "searched.pt", weights_only=True),
        )
        images += bench.n_train * search_epochs  # the joint step reads each image once an epoch
    elif arm == "l1_kd":
        student, extra = l1_student(bench, teacher, args.ratio)
    else:
        name = register_module(copy.deepcopy(teacher).train(), bench.example_inputs())
        spec = get_model_spec(name)
        shape = uniform_shape(name, args.ratio, spec.default_input, CLASSES, TOLERANCE)
        student = tasprune.prune(
            bench.ex.build_yolo().train(),
            shape,
            example_inputs=bench.example_inputs(),
            state=teacher.state_dict(),
        )
    torch.manual_seed(seed)
    trainer = tu.finetune(
        student.train(),
        bench.data,
        teacher=None if arm == "tas_ft" else bench.teacher(),
        epochs=finetune_epochs,
        seed=seed,
        name=folder.name,
        **bench.common,
        **({} if args.dis is None else {"dis": args.dis}),
        **({} if args.warmup_epochs is None else {"warmup_epochs": args.warmup_epochs}),
    )
    images += bench.n_train * finetune_epochs
    best = Path(trainer.best)
    tuned = load_checkpoint(str(best))[0].float().eval()
    test, val = bench.scores(best, folder)
    row = {
        "arm": arm,
        "seed": seed,
        "metric": "map50-95",
        "test": test,
        "val": val,
        "flops_ratio": bench.flops(tuned) / bench.flops(teacher),
        "params_ratio": sum(p.numel() for p in tuned.parameters())
        / sum(p.numel() for p in teacher.parameters()),
        "images_seen": images,
        "seconds": time.perf_counter() - start,
        "best": str(best),  # Ultralytics' own checkpoint: YOLO(best).val() / .export()
        **extra,
    }
    return row


def latency(bench: Bench, threads: int) -> dict[str, Any]:
    """Eager and ONNX Runtime medians of the teacher and each arm's seed-0 network, alone,
    timed by `tasprune.latency`; the ONNX files are Ultralytics' export of each best.pt (static
    batch: one export per batch), the parity that of the example's ``onnx_parity``."""
    from ultralytics import YOLO
    from ultralytics.nn.tasks import load_checkpoint

    from tasprune.latency import LatencySettings, measure, measure_onnx_latency

    torch.set_num_threads(threads)
    nets = {"teacher": bench.teacher_pt}
    for arm in ARMS:
        path = bench.out / f"{arm}-seed0" / "weights" / "best.pt"
        if path.is_file():
            nets[arm] = path
    size = (3, bench.size, bench.size)
    folder = bench.out / "latency"
    folder.mkdir(parents=True, exist_ok=True)
    rows: dict[str, Any] = {}
    for name, best in nets.items():
        model = load_checkpoint(str(best))[0].float().eval()
        entry: dict[str, Any] = {"onnx_max_abs_diff": bench.ex.onnx_parity(best, model, bench.size)}
        fused = load_checkpoint(str(best), fuse=True)[0].float().eval()
        for batch in (1, 32):
            exported = YOLO(str(best)).export(
                format="onnx", imgsz=bench.size, batch=batch, simplify=False, verbose=False
            )
            path = Path(exported).replace(folder / f"{name}-b{batch}.onnx")
            eager = LatencySettings("eager", batch, threads, 15, 3)
            entry[f"eager_ms_b{batch}"] = measure(fused, size, eager)["median_ms"]
            onnx = measure_onnx_latency(path, size, batch, 15, 3, threads=threads)
            entry[f"onnx_ms_b{batch}"] = onnx["median_ms"]
        rows[name] = entry
    return rows


def settings_line(settings: dict[str, Any]) -> str:
    """The schedule every arm had, in words (Ultralytics' defaults where a setting is absent)."""
    dis = settings.get("dis", "6.0, Ultralytics' default")
    warmup = settings.get("warmup_epochs", "3, Ultralytics' default")
    return (
        f"{search_words(settings)}; every arm fine-tuned "
        f"{settings['finetune_epochs']} epochs by the stock trainer (warm-up {warmup} epochs), "
        f"distillation weight {dis}; batch {settings['batch']}."
    )


def table(results: dict[str, Any]) -> str:
    teacher = results["teacher"]
    lines = [
        f"# YOLOv8n (Ultralytics trainer): TAS vs Torch-Pruning L1 vs uniform at "
        f"{results['ratio']} of the FLOPs",
        "",
        f"Teacher: test mAP50-95 {teacher['test']:.4f} (val {teacher['val']:.4f}), "
        f"{teacher['flops'] / 1e6:.1f} MMACs at {results['settings']['size']} px.",
        "",
        settings_line(results["settings"]),
        *arm_lines(results["rows"], teacher["test"], "mAP50-95"),
    ]
    missed = [r for r in results["rows"] if r["arm"] == "l1_kd" and not r.get("tp_in_band", True)]
    if missed:
        lines += [
            "",
            f"l1_kd: with round_to=8 one layer ratio moves every width at once and the FLOPs "
            f"jump over the band [{results['ratio'] - TOLERANCE:.2f}, {results['ratio']}]; "
            f"its rows are the largest network under the budget (layer ratio "
            f"{missed[0]['tp_layer_ratio']:.3f}), out of the band.",
        ]
    patched = [r for r in results["rows"] if r["arm"] == "l1_kd" and r.get("patched")]
    if patched:
        error = patched[0]["patched"]["stock_error"].splitlines()[0][:200]
        lines += [
            "",
            f"l1_kd ran on the C2f_v2-patched YOLOv8n (Torch-Pruning's documented workaround, the "
            f"same function); on the stock C2f Torch-Pruning failed: `{error}`.",
        ]
    lat = results.get("latency")
    if lat:
        lines += latency_lines(lat, "; eager with Conv+BN fused, ONNX = Ultralytics' export")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--search-epochs", type=int, default=2)
    ap.add_argument("--finetune-epochs", type=int, default=5)
    ap.add_argument("--counts", type=int, nargs=3, default=(4000, 500, 1000))
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--dis", type=float, default=None, help="Ultralytics' distillation weight (its own: 6.0)"
    )
    ap.add_argument(
        "--warmup-epochs",
        type=float,
        default=None,
        help="the fine-tuning's warm-up epochs (Ultralytics' own: 3.0)",
    )
    ap.add_argument(
        "--width-snap", type=int, default=1, help="TAS widths in multiples of this (8: ONNX RT)"
    )
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--latency", action="store_true", help="time the saved networks (alone)")
    ap.add_argument("--teacher", type=Path, default=None, help="another teacher state dict")
    ap.add_argument("--tiny", action="store_true", help="a smoke run: 96 px, 64/16/16, 1+1 epochs")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = args.out.resolve() / "yolo"
    out.mkdir(parents=True, exist_ok=True)
    tu.offline(args.out.resolve() / "ultralytics")  # before anything imports ultralytics
    bench = Bench(args, out)
    if args.teacher is not None:
        bench.ex.TEACHER = args.teacher
    if not args.tiny and not Path(bench.ex.TEACHER).is_file():
        sys.exit(
            f"error: no teacher at {bench.ex.TEACHER}. Fix: train it with `python "
            "examples/yolo.py --train-teacher --out DIR` and copy DIR/teacher.pt there"
        )
    if args.tiny:
        args.results = out  # a smoke run never writes bench/results
    path = out / "results.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    settings: dict[str, Any] = {k: getattr(args, k) for k in ("ratio", "batch", "tiny")}
    settings["search_epochs"] = 1 if args.tiny else args.search_epochs
    settings["finetune_epochs"] = 1 if args.tiny else args.finetune_epochs
    settings["counts"] = [64, 16, 16] if args.tiny else list(args.counts)
    settings["size"] = bench.size
    settings["teacher"] = "1 epoch, trained here (--tiny)" if args.tiny else str(bench.ex.TEACHER)
    if args.dis is not None:  # recorded only where set: earlier results had no such setting
        settings["dis"] = args.dis
    if args.warmup_epochs is not None:
        settings["warmup_epochs"] = args.warmup_epochs
    if args.width_snap != 1:
        settings["width_snap"] = args.width_snap
    if results and results.get("settings") != settings:
        sys.exit(
            f"error: {path} holds another protocol ({results.get('settings')}). Fix: use another --out"
        )
    results.setdefault("settings", settings)
    results.setdefault("ratio", args.ratio)
    results.setdefault("rows", [])
    bench.prepare_teacher()
    if "teacher" not in results:
        teacher = bench.teacher()
        test, val = bench.scores(teacher, out / "teacher")
        results["teacher"] = {"test": test, "val": val, "flops": bench.flops(teacher)}
        path.write_text(json.dumps(results, indent=2))
    if args.latency:
        results["latency"] = latency(bench, args.threads)
    else:
        done = {(r["arm"], r["seed"]) for r in results["rows"]}
        for seed in args.seeds:
            for arm in args.arms:
                if (arm, seed) in done:
                    continue
                row = run_arm(bench, arm, seed, args)
                print(json.dumps(row), flush=True)
                results["rows"].append(row)
                path.write_text(json.dumps(results, indent=2))
    path.write_text(json.dumps(results, indent=2))
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "tasks-yolo.json").write_text(json.dumps(results, indent=2))
    md = table(results)
    (args.results / "tasks-yolo.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
