"""Distillation study on a converged teacher, on the fmnist-r20 protocol's data.

Does KD help the TAS student once the teacher is trained until its test accuracy is flat?
On the protocol's data (10000-image stratified train subset, seed 0; full test set; crop
padding 2, flip) this script

1. trains a converged ResNet-20 teacher (40 epochs cosine, lr 0.1, batch 128, warm-up 1,
   evaluated every 5 epochs) into a normal tasprune fit folder (``--teacher-dir``; usable as a
   protocol's ``teacher.checkpoint``),
2. runs one TAS search warm-started from it with the protocol's search settings (seed 0),
3. evaluates the two student initialisations (teacher's leading channels, searched supernet)
   before training, raw and with BN statistics recalibrated on training batches,
4. trains students of that one shape with the protocol's student schedule (10 epochs, lr
   0.05, batch 128, seed 0), one variant after another (most informative first): CE only,
   KD (0.9, 4), KD (0.5, 2), KD (0.9, 4) with alpha ramped up over 3 epochs, supernet init
   with BN recalibration, the rest of the alpha x T grid, attention transfer (on CE and on the
   best KD setting), a second student seed of CE and of the best KD setting; then (added once
   the ramp and the supernet init had won) seeds 1-2 of those, the supernet init with CE and
   without recalibration, and the ramp's length and target (alpha, T) varied.

Resumable: rerun the same command and it continues (every finished piece is in
``bench/results/kd-study.json`` before the next starts; a student interrupted mid-way resumes
from its checkpoint under ``--out``).

    python bench/studies/bench_kd.py --teacher-dir /work/main/runs/cache/teacher-fmnist-r20-converged
        [--out runs/kd-study] [--only teacher|search|init|students] [--variants NAME ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from tasprune.bench import load_protocol, machine_info
from tasprune.checkpoint import load_model_checkpoint
from tasprune.config import DistillConfig, Recipe, TeacherConfig, TrainConfig
from tasprune.data import ArrayDataset, DeviceLoader
from tasprune.distill import build_student, recalibrate_bn
from tasprune.epoch import evaluate
from tasprune.pipeline import load_run_data, load_supernet_state
from tasprune.shape import Shape
from tasprune.stages import StageContext, search_shape, train_student, train_teacher
from tasprune.utils import JsonlLogger, atomic_write_text, read_json_object

logger = logging.getLogger("bench_kd")

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"
SEED = 0
IMG_PER_S = 300.0  # a priori: ResNet-20 training on 28x28, one thread (refined after the teacher)
TEACHER = TrainConfig(epochs=40, batch_size=128, lr=0.1, warmup_epochs=1, eval_every=5, seed=SEED)
FLAT_PT = 0.2  # converged: the last two evaluations within this many points
RECAL_BATCHES = 50  # training batches (x128 images) for BN recalibration
RAMP_EPOCHS = 3.0

# Variants in the order they run: name -> DistillConfig fields (besides train; "seed" is the
# student's training seed). "loss" takes the loss settings of a finished variant: "best4" of the
# best of the first four (so the init comparison is made at the best loss measured by then),
# "best" / "bestkd" of the best seed-0, teacher-init, feature-loss-free variant (with KD).
RAMP: dict[str, Any] = {"alpha": 0.9, "temperature": 4.0, "alpha_ramp_epochs": RAMP_EPOCHS}
SUPERNET: dict[str, Any] = {"init": "supernet", "recalibrate_bn": RECAL_BATCHES}
VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("ce", {"kd": False}),
    ("kd a0.9 T4", {"alpha": 0.9, "temperature": 4.0}),
    ("kd a0.5 T2", {"alpha": 0.5, "temperature": 2.0}),
    ("kd a0.9 T4 ramp3", {"alpha": 0.9, "temperature": 4.0, "alpha_ramp_epochs": RAMP_EPOCHS}),
    ("supernet+recal", {"init": "supernet", "recalibrate_bn": RECAL_BATCHES, "loss": "best4"}),
    ("kd a0.5 T1", {"alpha": 0.5, "temperature": 1.0}),
    ("kd a0.5 T4", {"alpha": 0.5, "temperature": 4.0}),
    ("kd a0.7 T1", {"alpha": 0.7, "temperature": 1.0}),
    ("kd a0.7 T2", {"alpha": 0.7, "temperature": 2.0}),
    ("kd a0.7 T4", {"alpha": 0.7, "temperature": 4.0}),
    ("kd a0.9 T1", {"alpha": 0.9, "temperature": 1.0}),
    ("kd a0.9 T2", {"alpha": 0.9, "temperature": 2.0}),
    # Attention transfer on the three stage outputs, on top of CE and of the best KD setting.
    ("ce+at", {"kd": False, "feature_loss": "at"}),
    ("best kd+at", {"feature_loss": "at", "loss": "bestkd"}),
    # A second student seed for CE and for the best KD setting, to size the seed noise.
    ("ce seed1", {"kd": False, "seed": 1}),
    ("best kd seed1", {"loss": "bestkd", "seed": 1}),
    # Added after the first five: the ramp and the supernet init won; size their seed noise,
    # separate the init's effect from the loss's, and vary the ramp.
    ("supernet+recal seed1", {**SUPERNET, **RAMP, "seed": 1}),
    ("ce seed2", {"kd": False, "seed": 2}),
    ("kd a0.9 T4 ramp3 seed2", {**RAMP, "seed": 2}),
    ("supernet+recal seed2", {**SUPERNET, **RAMP, "seed": 2}),
    ("supernet+recal ce", {**SUPERNET, "kd": False}),
    ("supernet, no recal", {"init": "supernet", **RAMP}),  # recal cannot change training
    ("kd a0.9 T4 ramp1", {**RAMP, "alpha_ramp_epochs": 1.0}),
    ("kd a0.9 T4 ramp5", {**RAMP, "alpha_ramp_epochs": 5.0}),
    ("kd a0.7 T4 ramp3", {**RAMP, "alpha": 0.7}),
    ("kd a0.9 T2 ramp3", {**RAMP, "temperature": 2.0}),
    ("kd a0.5 T2 ramp3", {**RAMP, "alpha": 0.5, "temperature": 2.0}),
]
LOSS_KEYS = ("kd", "alpha", "temperature", "alpha_ramp_epochs")


def slug(name: str) -> str:
    return "".join(c if c.isalnum() or c == "." else "-" for c in name)


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


class Study:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        proto, recipe = load_protocol(args.protocol)
        self.proto = proto
        self.recipe: Recipe = recipe.model_copy(
            update={"teacher": TeacherConfig(train=TEACHER), "device": "cpu"}
        )
        self.out = Path(args.out)
        self.teacher_dir = Path(args.teacher_dir)
        self.search_dir = self.out / "search"
        self.results_path = Path(args.results)
        self.results: dict[str, Any] = read_json_object(self.results_path) or {}
        self.results.setdefault("variants", {})
        self.results["command"] = args.command
        self.results["protocol"] = str(args.protocol)
        self.results["machine"] = machine_info(args.threads)
        self._data: tuple[ArrayDataset, ArrayDataset] | None = None
        self._teacher: torch.nn.Module | None = None
        self.device = torch.device("cpu")

    # ------------------------------------------------------------------ helpers
    @property
    def ctx(self) -> StageContext:
        return StageContext(self.recipe, self.data, self.device, progress=False)

    @property
    def data(self) -> tuple[ArrayDataset, ArrayDataset]:
        if self._data is None:
            self._data = load_run_data(self.recipe)
        return self._data

    @property
    def teacher(self) -> torch.nn.Module:
        if self._teacher is None:
            self._teacher, _ = load_model_checkpoint(self.teacher_dir / "model.pt")
        return self._teacher

    @property
    def input_size(self) -> tuple[int, int, int]:
        train = self.data[0]
        return (train.in_channels, *train.image_size)

    def save(self) -> None:
        self.results["updated"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        write_json(self.results_path, self.results)
        atomic_write_text(self.results_path.with_suffix(".md"), format_markdown(self.results))

    def estimate(self, img_per_s: float) -> dict[str, float]:
        """Expected minutes per piece at ``img_per_s`` training images per second."""
        n = len(self.data[0])
        r = self.recipe
        evals = (TEACHER.epochs // TEACHER.eval_every) * 10000 / (3 * img_per_s)
        est = {
            "teacher": (TEACHER.epochs * n / img_per_s + evals) / 60,
            "search": r.search.epochs * (n / 2) * 2.3 / img_per_s / 60,
            "init": 4 * 10000 / (3 * img_per_s) / 60,
        }
        for name, v in VARIANTS:
            kd = v.get("kd", True)
            est[name] = (r.distill.train.epochs * n * (0.9 if kd else 0.6) / img_per_s + 30) / 60
        return est

    # ------------------------------------------------------------------ pieces
    def piece_teacher(self) -> None:
        done = (self.teacher_dir / "final.json").is_file()
        if not done:
            logger.info("teacher: %d epochs into %s", TEACHER.epochs, self.teacher_dir)
            t0 = time.perf_counter()
            train_teacher(self.ctx, self.teacher_dir)  # self.recipe's teacher.train is TEACHER
            logger.info("teacher done in %.0f s", time.perf_counter() - t0)
        rows = JsonlLogger(self.teacher_dir / "history.jsonl").rows()
        curve = [
            {
                "epoch": r["epoch"] + 1,
                "test_top1": r["test_top1"],
                "test_top5": r["test_top5"],
                "train_top1": round(r["train_top1"], 2),
            }
            for r in rows
            if r.get("test_top1") is not None
        ]
        final = json.loads((self.teacher_dir / "final.json").read_text())["metrics"]
        last = [c["test_top1"] for c in curve[-3:]]
        img_s = [r["img_per_s"] for r in rows]
        self.results["teacher"] = {
            "dir": str(self.teacher_dir),
            "config": TEACHER.model_dump(mode="json"),
            "epochs": final["epochs"],
            "top1": final["top1"],
            "top5": final["top5"],
            "curve": curve,
            "last2_diff_pt": round(abs(last[-1] - last[-2]), 2) if len(last) >= 2 else None,
            "last3_spread_pt": round(max(last) - min(last), 2) if last else None,
            "converged": len(last) >= 2 and abs(last[-1] - last[-2]) <= FLAT_PT,
            "train_s": round(sum(r["seconds"] for r in rows), 1),
            "img_per_s_median": round(sorted(img_s)[len(img_s) // 2], 1) if img_s else None,
        }
        self.save()

    def piece_search(self) -> None:
        r = self.recipe
        cfg = r.search.model_copy(update={"seed": SEED})
        done = (self.search_dir / "search_done.json").is_file()
        t0 = time.perf_counter()
        res = search_shape(self.ctx, self.search_dir, self.teacher, cfg)
        entry = self.results.get("search", {}) if done else {}
        hist = res.history
        entry.update(
            {
                "dir": str(self.search_dir),
                "config": cfg.model_dump(mode="json"),
                "shape": res.shape.to_dict(),
                "flops": res.flops,
                "params": res.params,
                "flops_ratio": res.flops_ratio,
                "final_entropy_mean": hist[-1].get("entropy_mean") if hist else None,
            }
        )
        if not done:
            entry["wall_s"] = round(time.perf_counter() - t0, 1)
        self.results["search"] = entry
        self.save()

    def shape(self) -> Shape:
        return Shape.load(self.search_dir / "shape.json")[0]

    def piece_init(self) -> None:
        """Test top-1 of the untrained student under both inits, raw and BN-recalibrated."""
        if "init_eval" in self.results:
            return
        r = self.recipe
        train, test = self.data
        test_loader = DeviceLoader(test, 256, train=False, device=self.device)
        recal_loader = DeviceLoader(
            train,
            128,
            train=True,
            device=self.device,
            augment=r.data.augment,
            seed=SEED + 1,
        )
        out: dict[str, Any] = {"recal_batches": RECAL_BATCHES}
        supernet = load_supernet_state(self.search_dir / "supernet.pt")
        for init in ("teacher", "supernet"):
            torch.manual_seed(SEED)
            student = build_student(
                r.model,
                self.shape(),
                train.num_classes,
                train.in_channels,
                init,
                supernet_state=supernet,
                teacher_state=self.teacher.state_dict(),
                space=r.search.space(),
            )
            raw = evaluate(student, test_loader, self.device)["top1"]
            recalibrate_bn(student, recal_loader, RECAL_BATCHES, self.device)
            recal = evaluate(student, test_loader, self.device)["top1"]
            out[init] = {"raw_top1": raw, "recal_top1": recal}
            logger.info("untrained student, init=%s: %.2f%% raw, %.2f%% recal", init, raw, recal)
        self.results["init_eval"] = out
        self.save()

    def variant_cfg(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        spec = dict(spec)
        rule = spec.pop("loss", None)
        if rule is None:
            return spec
        finished = self.results["variants"]
        if rule == "best4":
            firsts = [n for n, _ in VARIANTS[:4]]
            done = {n: finished[n] for n in firsts if n in finished}
            if len(done) < 4:
                raise SystemExit(f"{name} needs the first four variants finished: {firsts}")
        else:
            done = {
                n: v
                for n, v in finished.items()
                if v["config"]["init"] == "teacher"
                and v["config"].get("feature_loss", "none") == "none"
                and v["train"]["seed"] == SEED
                and (rule != "bestkd" or v["config"]["kd"])
            }
            if not done:
                raise SystemExit(f"{name} needs finished loss variants first")
        best = max(done, key=lambda n: done[n]["top1"])
        spec.update({k: v for k, v in done[best]["config"].items() if k in LOSS_KEYS})
        spec["loss_from"] = best
        return spec

    def piece_variant(self, name: str, spec: dict[str, Any]) -> None:
        if name in self.results["variants"]:
            return
        r = self.recipe
        spec = self.variant_cfg(name, spec)
        loss_from = spec.pop("loss_from", None)
        seed = spec.pop("seed", SEED)
        tcfg = r.distill.train.model_copy(update={"seed": seed})
        cfg = r.distill.model_copy(update={"train": tcfg, **spec})
        cfg = DistillConfig.model_validate(cfg.model_dump())
        folder = self.out / "students" / slug(name)
        supernet = None
        if cfg.init == "supernet":
            supernet = load_supernet_state(self.search_dir / "supernet.pt")
        logger.info("variant %r: %s", name, cfg.model_dump(mode="json", exclude={"train"}))
        t0 = time.perf_counter()
        metrics = train_student(
            self.ctx,
            folder,
            self.shape(),
            self.teacher,
            cfg=cfg,
            supernet_state=supernet,
            meta={"study": "kd-study", "variant": name},
        )
        wall = time.perf_counter() - t0
        rows = JsonlLogger(folder / "history.jsonl").rows()
        config = cfg.model_dump(mode="json", exclude={"train"})
        if loss_from is not None:
            config["loss_from"] = loss_from
        self.results["variants"][name] = {
            "top1": metrics["top1"],
            "top5": metrics["top5"],
            "train_top1": metrics.get("train_top1"),
            "train_s": round(sum(row["seconds"] for row in rows), 1),
            "wall_s_last_call": round(wall, 1),
            "config": config,
            "train": tcfg.model_dump(mode="json"),
            "train_top1_per_epoch": [round(row["train_top1"], 2) for row in rows],
        }
        logger.info("variant %r: top1 %.2f%%", name, metrics["top1"])
        self.save()


def format_markdown(res: dict[str, Any]) -> str:
    lines = ["# KD study on a converged teacher (fmnist-r20 protocol data)", ""]
    lines += [
        "Made by (resumable; rerun to continue):",
        "",
        f"    {res.get('command', '')}",
        "",
    ]
    t = res.get("teacher")
    if t:
        curve = ", ".join(f"{c['epoch']}: {c['test_top1']:.2f}" for c in t["curve"])
        lines += [
            f"Teacher: ResNet-20, {t['epochs']} epochs (cosine, lr 0.1, batch 128, warm-up 1), "
            f"test top-1 **{t['top1']:.2f}%** (top-5 {t['top5']:.2f}%), {t['train_s']:.0f} s. "
            f"Test top-1 by epoch: {curve}. Last two evaluations differ by "
            f"{t['last2_diff_pt']} pt (converged: {t['converged']}).",
            "",
        ]
    s = res.get("search")
    if s:
        lines += [
            f"Shape: one TAS search (seed 0, protocol settings, warm-started from that teacher): "
            f"{s['flops'] / 1e6:.2f} MFLOPs, FLOPs ratio {s['flops_ratio']:.3f}, "
            f"{s['params'] / 1e6:.3f} M params; depths {s['shape'].get('depths')}.",
            "",
        ]
    ie = res.get("init_eval")
    if ie:
        lines += [
            f"Untrained student (test top-1): teacher init {ie['teacher']['raw_top1']:.2f}% raw, "
            f"{ie['teacher']['recal_top1']:.2f}% after BN recalibration on "
            f"{ie['recal_batches']} training batches; supernet init "
            f"{ie['supernet']['raw_top1']:.2f}% raw, {ie['supernet']['recal_top1']:.2f}% "
            "recalibrated.",
            "",
        ]
    v = res.get("variants", {})
    if v:
        ce = v.get("ce", {}).get("top1")
        lines += [
            "Students: that shape, 10 epochs, lr 0.05, batch 128; vs CE = against the seed-0 CE "
            "student.",
            "",
            "| variant | init | loss | seed | top-1 % | vs CE (pt) | top-5 % | train s |",
            "|---|---|---|---:|---:|---:|---:|---:|",
        ]
        for name, row in sorted(v.items(), key=lambda kv: -kv[1]["top1"]):
            c = row["config"]
            if c.get("kd", True):
                loss = f"KD a={c['alpha']} T={c['temperature']:g}"
                if c.get("alpha_ramp_epochs"):
                    loss += f", alpha ramped over {c['alpha_ramp_epochs']:g} epochs"
            else:
                loss = "CE"
            if c.get("feature_loss", "none") != "none":
                loss += f" + AT (beta {c['feature_weight']:g})"
            init = c["init"] + (" + BN recal" if c.get("recalibrate_bn") else "")
            if c.get("loss_from"):
                loss += f" (from {c['loss_from']})"
            delta = f"{row['top1'] - ce:+.2f}" if ce is not None else "-"
            lines.append(
                f"| {name} | {init} | {loss} | {row['train']['seed']} | {row['top1']:.2f} | {delta} | "
                f"{row['top5']:.2f} | {row['train_s']:.0f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--protocol", default=str(ROOT / "bench" / "protocols" / "fmnist-r20.yaml"))
    ap.add_argument("--teacher-dir", default="runs/cache/teacher-fmnist-r20-converged")
    ap.add_argument("--out", default="runs/kd-study")
    ap.add_argument("--results", default=str(RESULTS / "kd-study.json"))
    ap.add_argument("--only", choices=["teacher", "search", "init", "students"], default=None)
    ap.add_argument("--variants", nargs="+", default=None, help="only these variant names")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    args.command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(name)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
    )
    torch.set_num_threads(args.threads)
    study = Study(args)
    est = study.estimate(IMG_PER_S)
    logger.info(
        "estimate at %.0f img/s: %s; total %.0f min",
        IMG_PER_S,
        ", ".join(f"{k} {v:.1f}" for k, v in est.items()),
        sum(est.values()),
    )
    if args.only in (None, "teacher"):
        study.piece_teacher()
        t = study.results["teacher"]
        logger.info(
            "teacher: %.2f%% top-1, converged %s, median %.0f img/s",
            t["top1"],
            t["converged"],
            t["img_per_s_median"] or 0,
        )
        if t["img_per_s_median"]:
            est = study.estimate(t["img_per_s_median"])
            rest = [k for k in est if k != "teacher" and k not in study.results["variants"]]
            logger.info("remaining estimate: %.0f min", sum(est[k] for k in rest))
    if args.only in (None, "search"):
        study.piece_search()
        s = study.results["search"]
        logger.info("search: FLOPs ratio %.3f", s["flops_ratio"])
    if args.only in (None, "init"):
        study.piece_init()
    if args.only in (None, "students"):
        for name, spec in VARIANTS:
            if args.variants and name not in args.variants:
                continue
            study.piece_variant(name, spec)
    logger.info("all asked pieces finished")


if __name__ == "__main__":
    main()
