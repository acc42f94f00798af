"""The protocol runner: the teacher, the searches, the students and the latency of every
distinct network, resumably, then the results and targets (`tasprune.bench.results`)."""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from tasprune.baselines import l1_prune, random_shape, uniform_shape
from tasprune.bench.protocol import (
    METHODS,
    Protocol,
    load_protocol,
)
from tasprune.bench.render import format_markdown
from tasprune.bench.results import aggregate, evaluate_targets, searches, shape_key
from tasprune.checkpoint import load_model_checkpoint
from tasprune.config import Recipe, recipe_diff
from tasprune.cost import model_cost
from tasprune.data import ArrayDataset
from tasprune.errors import ConfigError, TaspruneError
from tasprune.export import export_model, load_exportable
from tasprune.latency import measure
from tasprune.lock import run_lock
from tasprune.pipeline import (
    load_run_data,
    load_supernet_state,
    stage_done,
)
from tasprune.shape import Shape
from tasprune.stages import (
    StageContext,
    finished_teacher,
    search_shape,
    teacher_stage,
    train_student,
)
from tasprune.utils import atomic_write_text, pick_device, read_json_object

logger = logging.getLogger(__name__)

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
            diff = recipe_diff(stored, mine) if isinstance(stored, dict) else []
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
    def ctx(self) -> StageContext:
        return StageContext(self.recipe, self.data, self.device, self.progress)

    @property
    def input_size(self) -> tuple[int, int, int]:
        return self.ctx.input_size

    @property
    def teacher(self) -> nn.Module:
        if self._teacher is None:  # every method starts from the same teacher
            self._teacher = finished_teacher(self.ctx, self.root / "teacher")
        return self._teacher

    # ---------------------------------------------------------------- stages
    def stage_teacher(self) -> None:
        """The pipeline's own teacher stage (training, or import of teacher.checkpoint)."""
        if stage_done(self.root, "teacher"):
            return
        logger.info("teacher: training %s once for every method and seed", self.recipe.model)
        t0 = self._start("teacher")
        self._teacher, _ = teacher_stage(self.ctx, self.root / "teacher")
        self._timed("teacher", time.perf_counter() - t0)

    def stage_search(self, seed: int) -> None:
        folder = self.root / f"seed-{seed}" / "search"
        if (folder / "search_done.json").is_file():
            return
        r = self.recipe
        cfg = r.search.model_copy(update={"seed": seed})
        logger.info("search (seed %d): %d epochs", seed, cfg.epochs)
        t0 = self._start(f"search/seed-{seed}")
        search_shape(self.ctx, folder, self.teacher, cfg)
        self._timed(f"search/seed-{seed}", time.perf_counter() - t0)

    def _l1(self) -> tuple[dict[str, Any], Shape]:
        """The L1-pruned teacher (state, shape); deterministic, so computed once per run."""
        if self._l1_cache is None:
            r = self.recipe
            train = self.data[0]
            module, shape = l1_prune(
                self.teacher,
                r.model,
                r.search.flops_budget.ratio,
                self.input_size,
                train.num_classes,
                r.search.tolerance,
            )
            self._l1_cache = (module.state_dict(), shape)
        return self._l1_cache

    def method_shape(self, method: str, seed: int) -> Shape:
        r = self.recipe
        classes = self.data[0].num_classes
        ratio, tol = r.search.flops_budget.ratio, r.search.tolerance
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
        tcfg = r.distill.train.model_copy(update={"seed": seed})
        cfg = r.distill.model_copy(update={"train": tcfg, "kd": method != "tas_nokd"})
        meta = {"method": method, "seed": seed}
        logger.info("%s (seed %d): training %d epochs", method, seed, tcfg.epochs)
        key = f"train/{method}/seed-{seed}"
        t0 = self._start(key)
        init = self._l1()[0] if method == "l1_kd" else None  # the L1-pruned teacher's weights
        supernet = None
        if cfg.init == "supernet" and init is None:
            supernet = load_supernet_state(self.root / f"seed-{seed}" / "search" / "supernet.pt")
        teacher = self.teacher if cfg.needs_teacher else None
        metrics = train_student(
            self.ctx,
            folder,
            shape,
            teacher,
            cfg=cfg,
            supernet_state=supernet,
            init_state=init,
            meta=meta,
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

    # ---------------------------------------------------------------- latency
    def stage_measure(self) -> dict[str, Any]:
        """Latency of every distinct network (teacher + student shapes), eager and ONNX."""
        p = self.proto
        nets: dict[str, tuple[str, Path]] = {}  # shape key -> (label, model.pt)
        teacher_file = self.root / "teacher" / "model.pt"
        _, tmeta = load_model_checkpoint(teacher_file)
        nets[shape_key(tmeta["shape"])] = ("teacher", teacher_file)
        for seed in p.seeds:
            for method in p.methods:
                res = read_json_object(self.root / f"seed-{seed}" / method / "result.json") or {}
                key = shape_key(res["shape"])
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
        for rnd in range(p.latency_rounds):
            for key, (model, onnx) in models.items():
                for b in p.latency_batches:
                    e = measure(model, self.input_size, p.latency("eager", b))
                    eager[key][b].append(e["median_ms"])
                    if onnx is not None:
                        how = p.latency("onnxruntime", b)
                        o = measure(model, self.input_size, how, onnx_file=onnx)
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


# --------------------------------------------------------------------------- results


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
    needs_search = any(m.startswith("tas_") for m in proto.methods) or (
        recipe.distill.init == "supernet"
    )
    # One process per protocol folder: a second one would resume the first's checkpoints.
    with run_lock(bench.root):
        bench.prepare()
        logger.info(
            "benchmark %s: methods %s, seeds %s, into %s",
            proto.name,
            ", ".join(proto.methods),
            proto.seeds,
            bench.root,
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
    teacher, rows = aggregate(proto, recipe, bench.root, measure)
    targets = evaluate_targets(teacher, rows, recipe.search.budget, max(proto.latency_batches))
    search_rows, agreement = searches(proto, bench.root)
    stages = dict(bench.timings)
    result: dict[str, Any] = {
        "protocol": proto.model_dump(mode="json"),
        "protocol_file": str(protocol_path),
        "recipe": recipe.model_dump(mode="json"),
        "budget": {
            "flops_ratio": recipe.search.flops_ratio,
            "band": list(recipe.search.budget.band),
        },
        "teacher": teacher,
        "methods": rows,
        "searches": search_rows,
        "search_agreement": agreement,
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
