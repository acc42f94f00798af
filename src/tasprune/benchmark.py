"""Benchmark protocols: TAS against simple baselines at the same FLOPs, and measured speed-ups.

A protocol (``bench/protocols/*.yaml``) is a base recipe plus the methods to compare, the seeds
and the latency batch sizes. :func:`run_protocol` (or ``python -m tasprune.benchmark FILE``):

1. trains ONE teacher with the pipeline's teacher stage; it is reused as the KD teacher of every
   method and seed and as the network the L1 baseline prunes;
2. per seed, runs one TAS search with the recipe's settings (the seed seeds the search);
3. per seed and method, trains the student with the recipe's SAME distill settings (schedule,
   KD, init rule; the seed seeds the training): ``tas_kd`` (the searched shape, KD),
   ``tas_nokd`` (same shape, cross-entropy only), ``uniform_kd``, ``random_kd`` (shapes from
   :mod:`tasprune.baselines`, KD) and ``l1_kd`` (the L1-pruned teacher's weights as the init,
   KD);
4. measures every distinct network on the CPU: eager PyTorch and ONNX Runtime latency (median
   over interleaved rounds, so load bursts on a shared machine hit every network alike);
5. writes ``bench/results/<protocol>.json`` and ``.md``: top-1 (mean, std over seeds), exact
   MFLOPs and params, latencies, latency ratio vs the teacher and (latency ratio)/(FLOPs ratio),
   the targets with PASS/MISS, the machine and the wall time of every stage.

Layout of ``OUT_ROOT/<protocol>/`` (every step resumable; a rerun continues)::

    protocol.yaml            the resolved protocol and recipe (a different recipe is refused)
    timings.json             wall seconds of every finished step
    teacher/                 the pipeline's teacher stage (final.json = done)
    seed-S/search/           the TAS search of seed S (search_done.json = done)
    seed-S/METHOD/           the student (fit outputs, shape.json; result.json = done)
    measure/latency.json     latencies of every distinct network (+ its .onnx files)
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from tasprune.baselines import l1_prune, random_shape, uniform_shape
from tasprune.config import (
    DistillConfig,
    Recipe,
    deep_merge,
    load_recipe,
    read_yaml,
    validate_model,
)
from tasprune.cost import model_cost
from tasprune.data import ArrayDataset, DeviceLoader
from tasprune.distill import distill, kd_loss_fn, model_meta
from tasprune.engine import LossFn, cross_entropy_loss, fit
from tasprune.errors import ConfigError, TaspruneError
from tasprune.export import export_model, load_exportable
from tasprune.latency import measure_latency, measure_onnx_latency
from tasprune.pipeline import (
    load_model_checkpoint,
    load_run_data,
    load_supernet_state,
    stage_done,
    with_recipe_seed,
)
from tasprune.search import search as run_search
from tasprune.shape import Shape
from tasprune.utils import atomic_write_text, pick_device, read_json_object

logger = logging.getLogger(__name__)

__all__ = [
    "METHODS",
    "TARGETS",
    "Protocol",
    "load_protocol",
    "main",
    "machine_info",
    "run_protocol",
]

Method = Literal["tas_kd", "tas_nokd", "uniform_kd", "random_kd", "l1_kd"]
METHODS: dict[str, str] = {
    "tas_kd": "TAS shape + KD",
    "tas_nokd": "TAS shape, CE only",
    "uniform_kd": "uniform width factor + KD",
    "random_kd": "random shape of the TAS space + KD",
    "l1_kd": "L1-norm pruned teacher (its weights as init) + KD",
}
TARGETS: tuple[str, ...] = (
    "TAS+KD within 0.5 points of the teacher at <= the budget's FLOPs (stated for fmnist-r56)",
    "TAS+KD above uniform+KD at the same FLOPs",
    "TAS+KD above L1+KD at the same FLOPs",
    "TAS+KD latency ratio within 1.15x of its FLOPs ratio at batch 64 on CPU (eager)",
)
TOP1_MARGIN = 0.5  # points of top-1 the TAS student may lose against the teacher
LATENCY_SLACK = 1.15  # allowed (latency ratio) / (FLOPs ratio) at the largest batch
# --quick: a smoke run of the protocol's code paths, minutes on a CPU (its results mean nothing).
QUICK_OVERRIDES: dict[str, Any] = {
    "data": {"train_subset": 600, "test_subset": 300},
    "teacher": {"train": {"epochs": 1, "eval_every": 1}},
    "search": {"epochs": 1, "valid_batches": 2},
    "distill": {"train": {"epochs": 1, "eval_every": 1}},
}


# --------------------------------------------------------------------------- protocol


class Protocol(BaseModel):
    """One benchmark protocol (validated; unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")  # names the output files
    description: str = ""
    recipe: str | dict[str, Any]  # path to a recipe YAML (e.g. configs/x.yaml) or inline
    overrides: dict[str, Any] = {}  # deep-merged into the recipe
    methods: list[Method] = Field(min_length=1)
    seeds: list[int] = Field(min_length=2)  # >= 2: the std over seeds is reported
    latency_batches: list[int] = Field(default=[1, 64], min_length=1)
    latency_repeats: int = Field(default=20, ge=1)  # timed calls per network, batch and round
    latency_rounds: int = Field(default=3, ge=1)  # interleaved rounds; the median is kept
    latency_threads: int | None = Field(default=None, ge=1)  # None: torch's default
    estimate: str = ""  # the author's wall-time estimate, copied into the results

    @field_validator("methods")
    @classmethod
    def _unique_methods(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("methods must not repeat")
        return v

    @field_validator("seeds")
    @classmethod
    def _good_seeds(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v) or any(s < 0 for s in v):
            raise ValueError("seeds must be distinct non-negative integers")
        return v

    @field_validator("latency_batches")
    @classmethod
    def _good_batches(cls, v: list[int]) -> list[int]:
        if any(b < 1 for b in v) or len(set(v)) != len(v):
            raise ValueError("latency batches must be distinct positive integers")
        return sorted(v)


def _find_recipe(ref: str, protocol_file: Path | None) -> Path:
    """A recipe path as given, else relative to the protocol file's folder or its ancestors."""
    p = Path(ref).expanduser()
    if p.is_absolute() or p.is_file() or protocol_file is None:
        return p
    for base in [protocol_file.parent, *protocol_file.resolve().parents]:
        if (base / ref).is_file():
            return base / ref
    return p


def load_protocol(
    path: str | Path, *, seeds: int | None = None, quick: bool = False
) -> tuple[Protocol, Recipe]:
    """The validated protocol and its resolved recipe.

    ``seeds`` keeps the first N seeds of the protocol (extended by the next integers when N is
    larger); ``quick`` shrinks data and epochs for a smoke run and appends ``-quick`` to the name
    (so a quick run never overwrites a real one).
    """
    file = Path(path)
    if not file.is_file():
        raise ConfigError(
            f"protocol {file} does not exist. Fix: pass a protocol YAML, e.g. "
            "bench/protocols/fmnist-r20.yaml"
        )
    proto: Protocol = validate_model(Protocol, read_yaml(file), str(file))
    if isinstance(proto.recipe, str):
        base = read_yaml(_find_recipe(proto.recipe, file))
    else:
        base = dict(proto.recipe)
    data = deep_merge(base, proto.overrides)
    update: dict[str, Any] = {}
    if quick:
        data = deep_merge(data, QUICK_OVERRIDES)
        update.update(
            name=f"{proto.name}-quick",
            latency_repeats=min(proto.latency_repeats, 3),
            latency_rounds=1,
        )
    if seeds is not None:
        if seeds < 2:
            raise ConfigError(f"--seeds {seeds}: at least 2 seeds are needed for a std. Fix: 2+")
        chosen = list(proto.seeds[:seeds])
        nxt = max(proto.seeds) + 1
        while len(chosen) < seeds:
            chosen.append(nxt)
            nxt += 1
        update["seeds"] = chosen
    proto = proto.model_copy(update=update)
    recipe = load_recipe(None, data)
    if recipe.distill.init == "supernet" and "uniform_kd" in proto.methods:
        raise ConfigError(
            f"{file}: distill.init = supernet cannot initialise uniform_kd (its widths are not "
            "candidates of the search space). Fix: use distill.init teacher or scratch"
        )
    return proto, recipe


# --------------------------------------------------------------------------- small helpers


def machine_info(threads: int | None = None) -> dict[str, Any]:
    """CPU model, core and thread counts, load and library versions of this machine."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions: dict[str, str | None] = {"torch": torch.__version__}
    for mod in ("onnxruntime", "torch_pruning"):
        try:
            versions[mod] = str(__import__(mod).__version__)
        except ImportError:
            versions[mod] = None
    try:
        load: list[float] | None = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "latency_threads": threads if threads is not None else torch.get_num_threads(),
        "load_average": load,
        "python": platform.python_version(),
        "platform": platform.platform(),
        **{f"{k}_version": v for k, v in versions.items()},
    }


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _recipe_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Recipe keys whose values differ; keys only one side has (a field added to the recipe
    schema since) and ``device`` (where it runs) do not count."""
    a, b = _flat(old), _flat(new)
    return sorted(k for k in set(a) & set(b) if a[k] != b[k] and k != "device")


def _shape_key(shape: dict[str, Any]) -> str:
    return json.dumps(shape, sort_keys=True)


def _mean(xs: Sequence[float]) -> float | None:
    return float(statistics.fmean(xs)) if xs else None


def _std(xs: Sequence[float]) -> float | None:
    return float(statistics.stdev(xs)) if len(xs) >= 2 else None


# --------------------------------------------------------------------------- the run


class _Bench:
    """State of one protocol run: folders, data, teacher, timings."""

    def __init__(self, proto: Protocol, recipe: Recipe, root: Path, progress: bool) -> None:
        self.proto = proto
        self.recipe = recipe
        self.root = root
        self.progress = progress
        self.device = pick_device(recipe.device)
        stored = read_json_object(root / "timings.json") or {}
        self.timings: dict[str, float] = dict(stored.get("seconds", {}))
        # Seconds spent in steps that were interrupted (added when the step finishes).
        self.partial: dict[str, float] = dict(stored.get("interrupted_s", {}))
        self.current: tuple[str, float] | None = None
        self.ran: list[str] = []
        self._data: tuple[ArrayDataset, ArrayDataset] | None = None
        self._teacher: nn.Module | None = None
        self._l1_cache: tuple[dict[str, Any], Shape] | None = None

    # ---------------------------------------------------------------- bookkeeping
    def _start(self, key: str) -> float:
        t0 = time.perf_counter()
        self.current = (key, t0)
        return t0

    def _save_timings(self) -> None:
        data = {"seconds": self.timings, "interrupted_s": self.partial}
        _write_json(self.root / "timings.json", data)

    def _timed(self, key: str, seconds: float) -> float:
        """Record a finished step (plus what interrupted attempts at it spent); the total."""
        total = round(seconds + self.partial.pop(key, 0.0), 1)
        self.timings[key] = total
        self.ran.append(key)
        self.current = None
        self._save_timings()
        return total

    def interrupted(self) -> None:
        """Keep the seconds the unfinished step spent, for its total when it finishes."""
        if self.current is not None:
            key, t0 = self.current
            self.partial[key] = round(self.partial.get(key, 0.0) + time.perf_counter() - t0, 1)
            self.current = None
            self._save_timings()

    def prepare(self) -> None:
        """Create the folder; refuse one that holds a run of a different recipe."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / "protocol.yaml"
        mine = self.recipe.model_dump(mode="json")
        if path.is_file():
            try:
                old = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError:
                old = {}
            stored = old.get("recipe") if isinstance(old, dict) else None
            diff = _recipe_diff(stored, mine) if isinstance(stored, dict) else []
            if diff:
                raise ConfigError(
                    f"{self.root} holds a benchmark of a different recipe (differs in "
                    f"{', '.join(diff[:4])}). Fix: use another --out-root, or delete that folder "
                    "to start over"
                )
        dump = {"protocol": self.proto.model_dump(mode="json"), "recipe": mine}
        atomic_write_text(path, yaml.safe_dump(dump, sort_keys=False))

    @property
    def data(self) -> tuple[ArrayDataset, ArrayDataset]:
        if self._data is None:
            self._data = load_run_data(self.recipe)
        return self._data

    @property
    def input_size(self) -> tuple[int, int, int]:
        train = self.data[0]
        return (train.in_channels, *train.image_size)

    @property
    def teacher(self) -> nn.Module:
        if self._teacher is None:
            self._teacher, _ = load_model_checkpoint(self.root / "teacher" / "model.pt")
        return self._teacher

    # ---------------------------------------------------------------- stages
    def stage_teacher(self) -> None:
        """The pipeline's own teacher stage (training, or import of teacher.checkpoint)."""
        if stage_done(self.root, "teacher"):
            return
        from tasprune.pipeline import _Run

        logger.info("teacher: training %s once for every method and seed", self.recipe.model)
        t0 = self._start("teacher")
        ctx = _Run(self.recipe, self.root, self.progress)
        ctx.__dict__["data"] = self.data
        ctx.stage_teacher()
        self._timed("teacher", time.perf_counter() - t0)

    def stage_search(self, seed: int) -> None:
        folder = self.root / f"seed-{seed}" / "search"
        if (folder / "search_done.json").is_file():
            return
        r = self.recipe
        cfg = with_recipe_seed(r.search, r).model_copy(update={"seed": seed})
        logger.info("search (seed %d): %d epochs", seed, cfg.epochs)
        t0 = self._start(f"search/seed-{seed}")
        run_search(
            r.model,
            self.data[0],
            cfg,
            folder,
            teacher_state=self.teacher.state_dict() if cfg.warm_start else None,
            device=self.device,
            progress=self.progress,
            crop_padding=r.data.crop_padding,
            flip=r.data.flip,
        )
        self._timed(f"search/seed-{seed}", time.perf_counter() - t0)

    def _l1(self) -> tuple[dict[str, Any], Shape]:
        """The L1-pruned teacher (state, shape); deterministic, so computed once per run."""
        if self._l1_cache is None:
            r = self.recipe
            train = self.data[0]
            module, shape = l1_prune(
                self.teacher,
                r.model,
                r.search.flops_ratio,
                self.input_size,
                train.num_classes,
                r.search.tolerance,
            )
            self._l1_cache = (module.state_dict(), shape)
        return self._l1_cache

    def method_shape(self, method: str, seed: int) -> Shape:
        r = self.recipe
        classes = self.data[0].num_classes
        ratio, tol = r.search.flops_ratio, r.search.tolerance
        if method in ("tas_kd", "tas_nokd"):
            return Shape.load(self.root / f"seed-{seed}" / "search" / "shape.json")[0]
        if method == "uniform_kd":
            return uniform_shape(r.model, ratio, self.input_size, classes, tol)
        if method == "random_kd":
            return random_shape(
                r.model, ratio, self.input_size, classes, tol, seed, space=r.search.space()
            )
        if method == "l1_kd":
            return self._l1()[1]
        raise ConfigError(f"unknown method {method!r}. Fix: use one of {', '.join(METHODS)}")

    def stage_method(self, method: str, seed: int) -> None:
        folder = self.root / f"seed-{seed}" / method
        if (folder / "result.json").is_file():
            return
        r = self.recipe
        train, test = self.data
        shape = self.method_shape(method, seed)
        folder.mkdir(parents=True, exist_ok=True)
        shape.save(folder / "shape.json", model=r.model, method=method, seed=seed)
        tcfg = with_recipe_seed(r.distill.train, r).model_copy(update={"seed": seed})
        cfg = r.distill.model_copy(update={"train": tcfg, "kd": method != "tas_nokd"})
        meta = {"recipe": r.model_dump(mode="json"), "method": method, "seed": seed}
        logger.info("%s (seed %d): training %d epochs", method, seed, tcfg.epochs)
        key = f"train/{method}/seed-{seed}"
        t0 = self._start(key)
        if method == "l1_kd":
            metrics = self._train_l1(shape, cfg, folder, meta)
        else:
            supernet = None
            if cfg.init == "supernet":
                supernet = load_supernet_state(
                    self.root / f"seed-{seed}" / "search" / "supernet.pt"
                )
            needs_teacher = cfg.kd or cfg.init == "teacher" or cfg.feature_loss != "none"
            metrics = distill(
                r.model,
                shape,
                self.teacher if needs_teacher else None,
                train,
                test,
                cfg,
                folder,
                supernet_state=supernet,
                space=r.search.space(),
                device=self.device,
                meta=meta,
                progress=self.progress,
                crop_padding=r.data.crop_padding,
                flip=r.data.flip,
            )
        seconds = self._timed(key, time.perf_counter() - t0)
        flops, params = model_cost(r.model, shape, self.input_size, train.num_classes)
        full, _ = model_cost(r.model, None, self.input_size, train.num_classes)
        result = {
            "method": method,
            "seed": seed,
            "top1": metrics.get("top1"),
            "top5": metrics.get("top5"),
            "epochs": tcfg.epochs,
            "flops": flops,
            "params": params,
            "flops_ratio": flops / full,
            "init": "l1-pruned teacher" if method == "l1_kd" else cfg.init,
            "kd": cfg.kd,
            "shape": shape.to_dict(),
            "wall_s": round(seconds, 1),
        }
        _write_json(folder / "result.json", result)

    def _train_l1(
        self, shape: Shape, cfg: DistillConfig, folder: Path, meta: dict[str, Any]
    ) -> dict[str, Any]:
        """`distill`'s training with the L1-pruned teacher's weights as the student's init."""
        r = self.recipe
        train, test = self.data
        tcfg = cfg.train
        state, _ = self._l1()
        student = _load_model_state(r.model, shape, state, train.num_classes, train.in_channels)
        loss: LossFn = (
            kd_loss_fn(self.teacher.to(self.device), cfg.alpha, cfg.temperature)
            if cfg.kd
            else cross_entropy_loss(tcfg.label_smoothing)
        )
        flops, params = model_cost(r.model, shape, self.input_size, train.num_classes)
        full_meta = model_meta(r.model, shape, train, "student", flops=flops, params=params)
        full_meta.update(meta)
        return fit(
            student,
            DeviceLoader(
                train,
                tcfg.batch_size,
                train=True,
                device=self.device,
                crop_padding=r.data.crop_padding,
                flip=r.data.flip,
                seed=tcfg.seed,
            ),
            DeviceLoader(test, tcfg.batch_size, train=False, device=self.device),
            tcfg,
            folder,
            loss_fn=loss,
            device=self.device,
            meta=full_meta,
            progress=self.progress,
        )

    # ---------------------------------------------------------------- latency
    def stage_measure(self) -> dict[str, Any]:
        """Latency of every distinct network (teacher + student shapes), eager and ONNX."""
        p = self.proto
        nets: dict[str, tuple[str, Path]] = {}  # shape key -> (label, model.pt)
        teacher_file = self.root / "teacher" / "model.pt"
        _, tmeta = load_model_checkpoint(teacher_file)
        nets[_shape_key(tmeta["shape"])] = ("teacher", teacher_file)
        for seed in p.seeds:
            for method in p.methods:
                res = read_json_object(self.root / f"seed-{seed}" / method / "result.json") or {}
                key = _shape_key(res["shape"])
                if key not in nets:
                    nets[key] = (f"{method}-seed{seed}", self.root / f"seed-{seed}" / method)
        folder = self.root / "measure"
        cached = read_json_object(folder / "latency.json")
        settings = {
            "batches": p.latency_batches,
            "repeats": p.latency_repeats,
            "rounds": p.latency_rounds,
            "threads": p.latency_threads,
        }
        if (
            cached is not None
            and cached.get("settings") == settings
            and set(cached.get("networks", {})) == set(nets)
        ):
            logger.info("latency: reusing %s", folder / "latency.json")
            return cached
        logger.info("latency: %d distinct networks, %d rounds", len(nets), p.latency_rounds)
        t0 = self._start("measure")
        models: dict[str, tuple[nn.Module, Path | None]] = {}
        notes: list[str] = []
        for key, (label, source) in nets.items():
            model, _, model_file = load_exportable(source)
            onnx: Path | None = folder / f"{label}.onnx"
            try:
                export_model(model_file, "onnx", onnx, atol=_onnx_atol(model, self.input_size))
            except TaspruneError as err:
                notes.append(f"ONNX latency of {label} skipped: {err}")
                onnx = None
            models[key] = (model.cpu().eval(), onnx)
        eager: dict[str, dict[int, list[float]]] = {
            k: {b: [] for b in p.latency_batches} for k in nets
        }
        ort: dict[str, dict[int, list[float]]] = {
            k: {b: [] for b in p.latency_batches} for k in nets
        }
        warm = min(3, p.latency_repeats)
        for rnd in range(p.latency_rounds):
            for key, (model, onnx) in models.items():
                for b in p.latency_batches:
                    e = measure_latency(
                        model,
                        self.input_size,
                        b,
                        repeats=p.latency_repeats,
                        warmup=warm,
                        threads=p.latency_threads,
                    )
                    eager[key][b].append(e["median_ms"])
                    if onnx is not None:
                        o = measure_onnx_latency(
                            onnx,
                            self.input_size,
                            b,
                            p.latency_repeats,
                            warm,
                            threads=p.latency_threads,
                        )
                        ort[key][b].append(o["median_ms"])
            logger.info("latency: round %d of %d done", rnd + 1, p.latency_rounds)
        networks = {
            key: {
                "label": nets[key][0],
                "eager_ms": {str(b): statistics.median(v) for b, v in eager[key].items() if v},
                "onnx_ms": {str(b): statistics.median(v) for b, v in ort[key].items() if v},
                "eager_rounds_ms": {str(b): v for b, v in eager[key].items()},
                "onnx_rounds_ms": {str(b): v for b, v in ort[key].items()},
            }
            for key in nets
        }
        seconds = self._timed("measure", time.perf_counter() - t0)
        out = {
            "settings": settings,
            "networks": networks,
            "notes": notes,
            "machine": machine_info(p.latency_threads),
            "wall_s": round(seconds, 1),
        }
        _write_json(folder / "latency.json", out)
        return out


def _onnx_atol(model: nn.Module, input_size: tuple[int, int, int]) -> float:
    """Export check tolerance: 1e-4 relative to the logits' scale on a random batch.

    Deep nets with large logits differ from ONNX Runtime by more than an absolute 1e-4 through
    float rounding alone; only the timing matters here, not bit-exactness.
    """
    x = torch.randn(8, *input_size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        scale = float(model.eval()(x).abs().max())
    return 1e-4 * max(1.0, scale)


def _load_model_state(
    model: str, shape: Shape, state: dict[str, Any], num_classes: int, in_channels: int
) -> nn.Module:
    """``create_model(model, shape)`` holding ``state`` (strict)."""
    from tasprune.models import create_model

    net = create_model(model, shape, num_classes=num_classes, in_channels=in_channels)
    net.load_state_dict(state, strict=True)
    return net


# --------------------------------------------------------------------------- results


def _latency_of(measure: dict[str, Any], shape: dict[str, Any], kind: str) -> dict[str, float]:
    node = measure["networks"].get(_shape_key(shape)) or {}
    return {k: float(v) for k, v in (node.get(f"{kind}_ms") or {}).items()}


def _aggregate(
    bench: _Bench, measure: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(teacher row, per-method rows) from the stored results and latencies."""
    p, r = bench.proto, bench.recipe
    _, tmeta = load_model_checkpoint(bench.root / "teacher" / "model.pt")
    tfinal = read_json_object(bench.root / "teacher" / "final.json") or {}
    tmetrics = tfinal.get("metrics") or {}
    size = tuple(int(x) for x in tmeta["input_size"])
    tflops, tparams = model_cost(r.model, None, (size[0], size[1], size[2]), tmeta["num_classes"])
    teacher: dict[str, Any] = {
        "top1": tmetrics.get("top1"),
        "mflops": tflops / 1e6,
        "params_m": tparams / 1e6,
        "latency_ms": {
            "eager": _latency_of(measure, tmeta["shape"], "eager"),
            "onnx": _latency_of(measure, tmeta["shape"], "onnx"),
        },
        "note": "trained once (teacher/) and reused as the KD teacher of every method and seed "
        "and as the network the L1 baseline prunes",
    }
    rows: dict[str, dict[str, Any]] = {}
    for method in p.methods:
        runs = {
            s: read_json_object(bench.root / f"seed-{s}" / method / "result.json") for s in p.seeds
        }
        done = {s: v for s, v in runs.items() if v is not None}
        top1 = [float(v["top1"]) for v in done.values() if v.get("top1") is not None]
        ratios: dict[str, dict[str, list[float]]] = {"eager": {}, "onnx": {}}
        lats: dict[str, dict[str, list[float]]] = {"eager": {}, "onnx": {}}
        per_flops: dict[str, dict[str, list[float]]] = {"eager": {}, "onnx": {}}
        for v in done.values():
            for kind in ("eager", "onnx"):
                mine = _latency_of(measure, v["shape"], kind)
                ref = teacher["latency_ms"][kind]
                for b, ms in mine.items():
                    lats[kind].setdefault(b, []).append(ms)
                    if ref.get(b):
                        ratio = ms / ref[b]
                        ratios[kind].setdefault(b, []).append(ratio)
                        per_flops[kind].setdefault(b, []).append(ratio / v["flops_ratio"])
        rows[method] = {
            "description": METHODS[method],
            "seeds_done": sorted(done),
            "top1_mean": _mean(top1),
            "top1_std": _std(top1),
            "top1_per_seed": {str(s): v.get("top1") for s, v in done.items()},
            "mflops_mean": _mean([v["flops"] / 1e6 for v in done.values()]),
            "flops_ratio_mean": _mean([v["flops_ratio"] for v in done.values()]),
            "flops_ratio_per_seed": {str(s): v["flops_ratio"] for s, v in done.items()},
            "params_m_mean": _mean([v["params"] / 1e6 for v in done.values()]),
            "latency_ms": {k: {b: _mean(x) for b, x in d.items()} for k, d in lats.items()},
            "latency_ratio": {k: {b: _mean(x) for b, x in d.items()} for k, d in ratios.items()},
            "latency_over_flops_ratio": {
                k: {b: _mean(x) for b, x in d.items()} for k, d in per_flops.items()
            },
            "shapes": {str(s): v["shape"] for s, v in done.items()},
            "train_wall_s": {str(s): v.get("wall_s") for s, v in done.items()},
        }
    return teacher, rows


def _target(name: str, status: str, detail: str) -> dict[str, str]:
    return {"target": name, "status": status, "detail": detail}


def _evaluate_targets(
    teacher: dict[str, Any],
    rows: dict[str, dict[str, Any]],
    band: tuple[float, float],
    big_batch: int,
) -> list[dict[str, str]]:
    """PASS/MISS of every target, with the numbers (n/a when a method was not run)."""
    out: list[dict[str, str]] = []
    ratio = band[1]
    tas = rows.get("tas_kd")

    def outside(row: dict[str, Any]) -> list[str]:
        """Seeds whose network is outside the FLOPs band (then not 'the same FLOPs')."""
        return [
            s
            for s, r in row["flops_ratio_per_seed"].items()
            if not band[0] - 1e-9 <= r <= band[1] + 1e-9
        ]

    t_top1 = teacher.get("top1")
    if tas is None or tas["top1_mean"] is None or t_top1 is None:
        out.append(_target(TARGETS[0], "n/a", "tas_kd or the teacher's top-1 is missing"))
    else:
        gap = t_top1 - tas["top1_mean"]
        ok = gap <= TOP1_MARGIN and tas["flops_ratio_mean"] <= ratio + 1e-9
        out.append(
            _target(
                TARGETS[0],
                "PASS" if ok else "MISS",
                f"teacher {t_top1:.2f}%, TAS+KD {tas['top1_mean']:.2f}% (gap {gap:+.2f} points, "
                f"allowed {TOP1_MARGIN}); FLOPs ratio {tas['flops_ratio_mean']:.3f} "
                f"(budget {ratio})",
            )
        )
    for idx, other in ((1, "uniform_kd"), (2, "l1_kd")):
        base = rows.get(other)
        if tas is None or base is None or tas["top1_mean"] is None or base["top1_mean"] is None:
            out.append(_target(TARGETS[idx], "n/a", f"tas_kd or {other} was not run"))
            continue
        margin = tas["top1_mean"] - base["top1_mean"]
        noise = math.hypot(tas["top1_std"] or 0.0, base["top1_std"] or 0.0)
        off = [f"{m} seed {s}" for m, row in (("tas_kd", tas), (other, base)) for s in outside(row)]
        warn = (
            f"; WARNING outside the band [{band[0]:.3f}, {band[1]:.3f}]: {', '.join(off)}"
            if off
            else ""
        )
        out.append(
            _target(
                TARGETS[idx],
                "PASS" if margin > 0 else "MISS",
                f"TAS+KD {tas['top1_mean']:.2f}% vs {other} {base['top1_mean']:.2f}% "
                f"(margin {margin:+.2f} points; seed std combined {noise:.2f}); FLOPs ratios "
                f"{tas['flops_ratio_mean']:.3f} vs {base['flops_ratio_mean']:.3f}{warn}",
            )
        )
    b = str(big_batch)
    value = tas["latency_over_flops_ratio"]["eager"].get(b) if tas else None
    if tas is None or value is None:
        out.append(_target(TARGETS[3], "n/a", f"no eager latency at batch {b} for tas_kd"))
    else:
        onnx = tas["latency_over_flops_ratio"]["onnx"].get(b)
        onnx_txt = f"; ONNX Runtime: {onnx:.3f}" if onnx is not None else ""
        out.append(
            _target(
                TARGETS[3],
                "PASS" if value <= LATENCY_SLACK else "MISS",
                f"latency ratio {tas['latency_ratio']['eager'][b]:.3f} / FLOPs ratio "
                f"{tas['flops_ratio_mean']:.3f} = {value:.3f} (allowed {LATENCY_SLACK}){onnx_txt}",
            )
        )
    return out


def _fmt(v: Any, spec: str = ".2f") -> str:
    return format(v, spec) if isinstance(v, int | float) else "-"


def format_markdown(result: dict[str, Any]) -> str:
    """The results as a markdown page: tables, targets, machine and wall times."""
    p = result["protocol"]
    batches = [str(b) for b in p["latency_batches"]]
    teacher = result["teacher"]
    rows = result["methods"]
    lines = [
        f"# Benchmark `{p['name']}`",
        "",
        p.get("description") or "",
        "",
        f"Model `{result['recipe']['model']}` on `{result['recipe']['data']['name']}`, FLOPs "
        f"budget {result['budget']['flops_ratio']} (band [{result['budget']['band'][0]:.3f}, "
        f"{result['budget']['band'][1]:.3f}] x unpruned), seeds {p['seeds']}. "
        f"One teacher, {teacher['note']}. Every student has the same distill schedule "
        f"({result['recipe']['distill']['train']['epochs']} epochs, init "
        f"`{result['recipe']['distill']['init']}` except l1_kd).",
        "",
        "## Accuracy and cost",
        "",
        "| method | top-1 % (mean ± std) | per seed | MFLOPs | FLOPs ratio | params (M) |",
        "|---|---|---|---|---|---|",
        f"| teacher (unpruned) | {_fmt(teacher['top1'])} | - | {_fmt(teacher['mflops'])} | "
        f"1.000 | {_fmt(teacher['params_m'], '.3f')} |",
    ]
    for m, row in rows.items():
        per = ", ".join(_fmt(v) for v in row["top1_per_seed"].values())
        lines.append(
            f"| {m} | {_fmt(row['top1_mean'])} ± {_fmt(row['top1_std'])} | {per} | "
            f"{_fmt(row['mflops_mean'])} | {_fmt(row['flops_ratio_mean'], '.3f')} | "
            f"{_fmt(row['params_m_mean'], '.3f')} |"
        )
    lat_head = " | ".join(f"CPU b{b} ms | ORT b{b} ms" for b in batches)
    ratio_head = " | ".join(f"lat ratio b{b} (CPU/ORT) | lat/FLOPs b{b} (CPU/ORT)" for b in batches)
    lines += [
        "",
        "## Latency (median ms per batch; mean over seeds of each seed's network)",
        "",
        f"| method | {lat_head} | {ratio_head} |",
        "|---|" + "---|" * (4 * len(batches)),
    ]

    def lat_cells(lat: dict[str, dict[str, Any]]) -> str:
        return " | ".join(
            f"{_fmt(lat['eager'].get(b), '.3f')} | {_fmt(lat['onnx'].get(b), '.3f')}"
            for b in batches
        )

    blank_ratio = " | ".join("1.000 / 1.000 | 1.000 / 1.000" for _ in batches)
    lines.append(f"| teacher | {lat_cells(teacher['latency_ms'])} | {blank_ratio} |")
    for m, row in rows.items():
        rat = " | ".join(
            f"{_fmt(row['latency_ratio']['eager'].get(b), '.3f')} / "
            f"{_fmt(row['latency_ratio']['onnx'].get(b), '.3f')} | "
            f"{_fmt(row['latency_over_flops_ratio']['eager'].get(b), '.3f')} / "
            f"{_fmt(row['latency_over_flops_ratio']['onnx'].get(b), '.3f')}"
            for b in batches
        )
        lines.append(f"| {m} | {lat_cells(row['latency_ms'])} | {rat} |")
    lines += ["", "## Targets", "", "| target | status | numbers |", "|---|---|---|"]
    for t in result["targets"]:
        lines.append(f"| {t['target']} | **{t['status']}** | {t['detail']} |")
    mach = result["machine"]
    wall = result["wall_s"]
    lines += [
        "",
        "## Machine and wall time",
        "",
        f"- CPU: {mach['cpu_model']} ({mach['cpu_count']} logical cores), torch "
        f"{mach['torch_version']} (intra-op threads: {mach['torch_threads']}; latency: "
        f"{mach['latency_threads']}); onnxruntime {mach['onnxruntime_version']}; load "
        f"average at start {result['load_average_start']}, at end {mach['load_average']}",
        f"- Command: `{result['command']}`",
        "- Stage wall times (s, the invocation that finished each step): "
        + ", ".join(f"{k} {v:.0f}" for k, v in wall["stages"].items()),
        f"- Sum of stages: {wall['stages_total']:.0f} s ({wall['stages_total'] / 60:.1f} min); "
        f"this invocation: {wall['invocation']:.0f} s",
        f"- Author's estimate: {p.get('estimate') or '-'}",
    ]
    for note in result.get("notes", []):
        lines.append(f"- Note: {note}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- entry points


def run_protocol(
    protocol_path: str | Path,
    out_root: str | Path = "runs/bench",
    *,
    seeds: int | None = None,
    quick: bool = False,
    results_dir: str | Path = "bench/results",
    progress: bool = True,
    command: str | None = None,
) -> dict[str, Any]:
    """Run (or resume) a benchmark protocol; write and return its results.

    Trains/loads the one teacher, each seed's search and each (method, seed) student under
    ``out_root/<name>/``, measures latencies, and writes ``results_dir/<name>.json`` and
    ``.md`` (``<name>`` gets ``-quick`` with ``quick``). See the module docstring.
    """
    t_start = time.perf_counter()
    load_start = machine_info()["load_average"]
    proto, recipe = load_protocol(protocol_path, seeds=seeds, quick=quick)
    bench = _Bench(proto, recipe, Path(out_root) / proto.name, progress)
    bench.prepare()
    logger.info(
        "benchmark %s: methods %s, seeds %s, into %s",
        proto.name,
        ", ".join(proto.methods),
        proto.seeds,
        bench.root,
    )
    needs_search = any(m.startswith("tas_") for m in proto.methods) or (
        recipe.distill.init == "supernet"
    )
    try:
        bench.stage_teacher()
        for seed in proto.seeds:
            if needs_search:
                bench.stage_search(seed)
            for method in proto.methods:
                bench.stage_method(method, seed)
        measure = bench.stage_measure()
    except BaseException:
        bench.interrupted()
        raise
    teacher, rows = _aggregate(bench, measure)
    band = [recipe.search.flops_ratio - recipe.search.tolerance, recipe.search.flops_ratio]
    targets = _evaluate_targets(teacher, rows, (band[0], band[1]), max(proto.latency_batches))
    stages = dict(bench.timings)
    result: dict[str, Any] = {
        "protocol": proto.model_dump(mode="json"),
        "protocol_file": str(protocol_path),
        "recipe": recipe.model_dump(mode="json"),
        "budget": {"flops_ratio": recipe.search.flops_ratio, "band": band},
        "teacher": teacher,
        "methods": rows,
        "targets": targets,
        "machine": machine_info(proto.latency_threads),
        "load_average_start": load_start,
        "command": command or f"run_protocol({str(protocol_path)!r}, out_root={str(out_root)!r})",
        "run_folder": str(bench.root),
        "ran_this_invocation": bench.ran,
        "notes": list(measure.get("notes", [])),
        "wall_s": {
            "stages": stages,
            "stages_total": round(sum(stages.values()), 1),
            "invocation": round(time.perf_counter() - t_start, 1),
        },
    }
    out_dir = Path(results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json(out_dir / f"{proto.name}.json", result)
    atomic_write_text(out_dir / f"{proto.name}.md", format_markdown(result))
    logger.info("wrote %s and %s", out_dir / f"{proto.name}.json", out_dir / f"{proto.name}.md")
    return result


def main(argv: Sequence[str] | None = None, prog: str = "python -m tasprune.benchmark") -> int:
    """``python -m tasprune.benchmark PROTOCOL [--seeds N] [--quick]``; errors as one line."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run a benchmark protocol: TAS vs baselines at the same FLOPs, "
        "with CPU latency.",
    )
    parser.add_argument("protocol", help="protocol YAML, e.g. bench/protocols/fmnist-r20.yaml")
    parser.add_argument("--seeds", type=int, default=None, help="use the first N seeds (N >= 2)")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: tiny data, 1 epoch per stage"
    )
    parser.add_argument("--out-root", default="runs/bench", help="folder of the run folders")
    parser.add_argument("--results-dir", default="bench/results", help="where JSON/MD go")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads for training"
    )
    args = parser.parse_args(args_list)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    command = f"{prog} " + shlex.join(args_list)
    try:
        if args.threads is not None:
            if args.threads < 1:
                raise ConfigError(f"--threads {args.threads} is not positive. Fix: use 1 or more")
            torch.set_num_threads(args.threads)
        result = run_protocol(
            args.protocol,
            args.out_root,
            seeds=args.seeds,
            quick=args.quick,
            results_dir=args.results_dir,
            progress=not args.no_progress,
            command=command,
        )
    except TaspruneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    print(format_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
