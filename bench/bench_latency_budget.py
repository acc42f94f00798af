"""The latency budget against the FLOPs budget on a protocol's data, schedule and distillation.

For each variant (a search budget) and seed this script runs the protocol's TAS search
(warm-started from ``--teacher-dir`` when given; the protocol's teacher is trained there
first when the folder holds none) and, with a teacher, trains the student with
the protocol's distillation; then, alone (``--only latency``, or last in a full run), it times
every searched network whole at one thread and batch 64: eager PyTorch, and ONNX Runtime on
the network exported padded to 8 channels as `tasprune export` does (median of 3 rounds of
20 calls; random weights: latency does not depend on them), and the unpruned network.

Variants: ``latency-onnx`` (latency_ratio 0.5 on the ONNX Runtime table, candidates snapped to
its 8-channel blocks), ``latency-onnx-nosnap`` (the same without snapping), ``latency-eager``
(the eager table), ``flops-0.5`` (the protocol's FLOPs budget), ``flops-0.5-m8`` (the same
with width candidates rounded to multiples of 8), ``flops-0.3`` (a FLOPs budget at about the
latency-budget shapes' measured latency, for the accuracy comparison at equal latency).

Resumable: every finished piece is in the results JSON before the next starts.

    python bench/bench_latency_budget.py --protocol bench/protocols/fmnist-r20.yaml \
        --teacher-dir runs/cache/teacher-fmnist-r20-converged --out runs/latency-budget
        [--only search|students|latency] [--variants NAME ...] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from tasprune.bench import load_protocol, machine_info
from tasprune.checkpoint import load_model_checkpoint
from tasprune.config import Recipe
from tasprune.latency_table import TableKey
from tasprune.models import create_model
from tasprune.pipeline import load_run_data
from tasprune.search.latency import measure_network
from tasprune.shape import Shape
from tasprune.stages import StageContext, search_shape, train_student, train_teacher
from tasprune.utils import atomic_write_text, read_json_object

logger = logging.getLogger("bench_latency_budget")
ROOT = Path(__file__).resolve().parents[1]
LAT = {"latency_ratio": 0.5, "latency_batch": 64, "latency_threads": 1}
VARIANTS: dict[str, dict[str, Any]] = {
    "latency-onnx": {**LAT, "latency_runtime": "onnxruntime"},
    "latency-onnx-nosnap": {**LAT, "latency_runtime": "onnxruntime", "latency_snap": False},
    "latency-eager": {**LAT, "latency_runtime": "eager"},
    "flops-0.5": {"flops_ratio": 0.5},
    "flops-0.5-m8": {"flops_ratio": 0.5, "width_multiple": 8},
    "flops-0.3": {"flops_ratio": 0.3},
}
BATCH, ROUNDS, REPEATS = 64, 3, 20


class Study:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        _, recipe = load_protocol(args.protocol)
        self.recipe: Recipe = recipe.model_copy(update={"device": "cpu"})
        self.out = Path(args.out)
        self.teacher_dir = Path(args.teacher_dir) if args.teacher_dir else None
        self.path = Path(args.results)
        self.res: dict[str, Any] = read_json_object(self.path) or {}
        self.res.setdefault("runs", {})
        self.res["command"] = args.command
        self.res["protocol"] = str(args.protocol)
        self.data = load_run_data(self.recipe)
        self.ctx = StageContext(self.recipe, self.data, torch.device("cpu"), progress=False)
        self.teacher = None
        if self.teacher_dir is not None:
            if not (self.teacher_dir / "final.json").is_file():  # the protocol's teacher
                logger.info("training the protocol's teacher into %s", self.teacher_dir)
                train_teacher(self.ctx, self.teacher_dir)
            self.teacher, _ = load_model_checkpoint(self.teacher_dir / "model.pt")
            self.res["teacher_dir"] = str(self.teacher_dir)
        train = self.data[0]
        self.input_size = (train.in_channels, *train.image_size)

    def save(self) -> None:
        self.res["updated"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        atomic_write_text(self.path, json.dumps(self.res, indent=2) + "\n")
        atomic_write_text(self.path.with_suffix(".md"), markdown(self.res))

    def run_key(self, variant: str, seed: int) -> str:
        return f"{variant}/seed-{seed}"

    def search(self, variant: str, seed: int) -> None:
        key = self.run_key(variant, seed)
        entry = self.res["runs"].setdefault(key, {})
        if "shape" in entry:
            return
        base = self.recipe.search.model_dump()
        base.pop("flops_ratio")  # each variant names its own budget
        cfg = type(self.recipe.search).model_validate({**base, **VARIANTS[variant], "seed": seed})
        t0 = time.perf_counter()
        res = search_shape(
            self.ctx, self.out / variant / f"seed-{seed}" / "search", self.teacher, cfg
        )
        hist = res.history
        entry.update(
            {
                "variant": variant,
                "seed": seed,
                "shape": res.shape.to_dict(),
                "flops_ratio": res.flops_ratio,
                "predicted": res.latency,
                "final_entropy_mean": hist[-1].get("entropy_mean") if hist else None,
                "search_wall_s": round(time.perf_counter() - t0, 1),
            }
        )
        logger.info("%s: FLOPs ratio %.3f predicted %s", key, res.flops_ratio, res.latency)
        self.save()

    def student(self, variant: str, seed: int) -> None:
        key = self.run_key(variant, seed)
        entry = self.res["runs"].get(key, {})
        if "shape" not in entry or "top1" in entry or self.teacher is None:
            return
        r = self.recipe
        cfg = r.distill.model_copy(
            update={"train": r.distill.train.model_copy(update={"seed": seed})}
        )
        t0 = time.perf_counter()
        metrics = train_student(
            self.ctx,
            self.out / variant / f"seed-{seed}" / "student",
            Shape.from_dict(entry["shape"]),
            self.teacher,
            cfg=cfg,
            meta={"study": "latency-budget", "variant": variant},
        )
        entry.update(
            {"top1": metrics["top1"], "student_wall_s": round(time.perf_counter() - t0, 1)}
        )
        logger.info("%s: top-1 %.2f%%", key, metrics["top1"])
        self.save()

    def latency(self) -> None:
        torch.set_num_threads(1)
        model, c = self.recipe.model, self.input_size[0]
        nets = {"teacher": None, **{k: v["shape"] for k, v in self.res["runs"].items()}}
        times: dict[str, dict[str, list[float]]] = {k: {"eager": [], "onnx": []} for k in nets}
        keys = {
            "eager": TableKey.here("eager", 1, BATCH),
            "onnx": TableKey.here("onnxruntime", 1, BATCH),
        }
        for _ in range(ROUNDS):  # rounds interleave the networks: drifts hit all alike
            for name, shape in nets.items():
                sh = Shape.from_dict(shape) if shape is not None else None
                net = create_model(model, sh, num_classes=10, in_channels=c)
                for rt, key in keys.items():
                    times[name][rt].append(measure_network(net, key, self.input_size, REPEATS))
        med = {k: {rt: statistics.median(v) for rt, v in t.items()} for k, t in times.items()}
        self.res["teacher_ms"] = med["teacher"]
        for name, entry in self.res["runs"].items():
            entry["measured_ms"] = med[name]
            entry["measured_ratio"] = {rt: med[name][rt] / med["teacher"][rt] for rt in keys}
        self.res["machine"] = machine_info(1)
        self.res["latency_protocol"] = {"batch": BATCH, "rounds": ROUNDS, "repeats": REPEATS}
        self.save()


def markdown(res: dict[str, Any]) -> str:
    lines = [
        "# Latency budget vs FLOPs budget",
        "",
        f"Protocol `{res.get('protocol')}`; command: `{res.get('command')}`. Latency: batch "
        f"{BATCH}, one thread, median of {ROUNDS} rounds of {REPEATS} calls, ONNX exported "
        "padded to 8 channels. Ratios are to the unpruned network in the same runtime.",
        "",
    ]
    t = res.get("teacher_ms")
    if t:
        lines += [f"Unpruned: eager {t['eager']:.2f} ms, ONNX Runtime {t['onnx']:.2f} ms.", ""]
    lines += [
        "| variant | seed | FLOPs ratio | predicted ratio | eager ratio | ONNX ratio | "
        "ONNX / FLOPs | top-1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for entry in res["runs"].values():
        if "shape" not in entry:
            continue
        pred = entry.get("predicted") or {}
        meas = entry.get("measured_ratio") or {}
        fmt = lambda v, f=".3f": format(v, f) if isinstance(v, (int, float)) else "-"  # noqa: E731
        onnx_flops = meas["onnx"] / entry["flops_ratio"] if "onnx" in meas else None
        lines.append(
            f"| {entry['variant']} | {entry['seed']} | {fmt(entry['flops_ratio'])} | "
            f"{fmt(pred.get('predicted_ratio'))} ({pred.get('runtime', '-')}) | "
            f"{fmt(meas.get('eager'))} | {fmt(meas.get('onnx'))} | {fmt(onnx_flops)} | "
            f"{fmt(entry.get('top1'), '.2f')} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--protocol", type=Path, default=ROOT / "bench/protocols/fmnist-r20.yaml")
    ap.add_argument("--teacher-dir", default=None)
    ap.add_argument("--out", default=str(ROOT / "runs/latency-budget"))
    ap.add_argument("--results", default=None)
    ap.add_argument("--only", choices=("search", "students", "latency"), default=None)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--seeds", nargs="*", type=int, default=[0])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    args.command = shlex.join(["python", *sys.argv])
    if args.results is None:
        stem = Path(args.protocol).stem
        args.results = str(ROOT / "bench/results" / f"latency-budget-{stem}.json")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    study = Study(args)
    if args.only in (None, "search"):
        for seed in args.seeds:
            for v in args.variants:
                study.search(v, seed)
    if args.only in (None, "students"):
        for seed in args.seeds:
            for v in args.variants:
                study.student(v, seed)
    if args.only in (None, "latency"):
        study.latency()


if __name__ == "__main__":
    main()
