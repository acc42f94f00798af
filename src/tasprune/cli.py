"""``tasprune`` command line: thin sub-commands over the library's plain functions.

Precedence of settings: built-in defaults < ``--config`` YAML < ``--set key=value`` < flags.
The resolved recipe is written into the output folder. Every failure ends the command with one
``error: ...`` line on stderr (a traceback only with ``--debug`` or ``TASPRUNE_DEBUG=1``): exit
code 2 for a :class:`TaspruneError`, a bad flag or an OS error (disk full, permissions), 1 for an
unexpected exception (a bug: rerun with --debug and report it); Ctrl-C exits 130 and the same
command resumes. ``run``/``train``/``search``/``distill``/``report`` hold their output folder's
lock (:mod:`tasprune.lock`) for their whole life.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from tasprune.config import Recipe, deep_merge, dump_recipe, load_recipe, parse_overrides
from tasprune.errors import ConfigError, TaspruneError
from tasprune.lock import run_lock

logger = logging.getLogger(__name__)

STAGE_NAMES = ("teacher", "search", "distill", "report")


# --------------------------------------------------------------------------- helpers


def _recipe(config: Path | None, sets: Sequence[str], flags: dict[str, Any]) -> Recipe:
    """defaults < YAML < --set < flags (flags given as a nested dict, None values dropped)."""
    extra = deep_merge(parse_overrides(sets), _drop_none(flags))
    return load_recipe(config, extra)


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            inner = _drop_none(v)
            if inner:
                out[k] = inner
        elif v is not None:
            out[k] = v
    return out


def _write_config(out: Path, recipe: Recipe, name: str = "config.yaml") -> None:
    from tasprune import distributed
    from tasprune.utils import atomic_write_text

    if not distributed.is_main():  # under torchrun rank 0 writes
        return
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / name, dump_recipe(recipe))


def _emit(obj: dict[str, Any], as_json: bool, text: str) -> None:
    print(json.dumps(obj) if as_json else text)


def _input_size(model: str, given: Sequence[int] | None) -> tuple[int, int, int]:
    from tasprune.models import get_model_spec

    spec = get_model_spec(model)
    if given is None:
        return spec.default_input
    c, h, w = (int(v) for v in given)
    if min(c, h, w) < 1:
        raise ConfigError(f"--input-size {c} {h} {w} must be positive. Fix: e.g. 3 32 32")
    return c, h, w


# --------------------------------------------------------------------------- commands


def cmd_flops(
    model: str | None,
    shape: Path | None = None,
    input_size: Sequence[int] | None = None,
    num_classes: int | None = None,
    as_json: bool = False,
) -> int:
    """Exact FLOPs (multiply-accumulates) and parameters of a model, optionally pruned."""
    from tasprune.cost import model_cost
    from tasprune.shape import Shape

    info: dict[str, Any] = {}
    sh: Shape | None = None
    if shape is not None:
        sh, info = Shape.load(shape)
    name = model or info.get("model")
    if not name:
        raise ConfigError("flops needs a model. Fix: pass --model NAME (see `tasprune space`)")
    if input_size is None and isinstance(info.get("input_size"), list):
        input_size = info["input_size"]
    size = _input_size(name, input_size)
    classes = num_classes or int(info.get("num_classes", 10))
    flops, params = model_cost(name, sh, size, classes)
    full_flops, full_params = model_cost(name, None, size, classes)
    obj = {
        "model": name,
        "input_size": list(size),
        "num_classes": classes,
        "flops": flops,
        "params": params,
        "flops_ratio": flops / full_flops,
        "params_ratio": params / full_params,
    }
    text = (
        f"{name} @ {'x'.join(map(str, size))}, {classes} classes: {flops / 1e6:.2f} MFLOPs (MACs), "
        f"{params / 1e6:.3f} M params"
    )
    if sh is not None:
        text += f" ({100 * obj['flops_ratio']:.1f}% FLOPs, {100 * obj['params_ratio']:.1f}% params)"
    _emit(obj, as_json, text)
    return 0


def cmd_space(
    model: str,
    input_size: Sequence[int] | None = None,
    as_json: bool = False,
    tie_residual: bool = True,
) -> int:
    """Width candidates per searched choice (a tied choice lists the convs that share it),
    depth candidates per stage, and the reachable FLOPs range."""
    from tasprune.cost import model_cost
    from tasprune.models.traced import is_traced, traced
    from tasprune.search import SearchConfig, SuperNet
    from tasprune.search.space import smallest_shape

    size = _input_size(model, input_size)
    space = replace(SearchConfig().space(), tie_residual=tie_residual)
    net = SuperNet(model, in_channels=size[0], input_size=size[1:], options=space)
    smallest = model_cost(model, smallest_shape(model, space), size)[0]
    largest = net.full_flops
    widths = {n: net.width_of[n].candidates for n in net.full_shape.widths}
    choices = {
        c.name: {"candidates": c.candidates, "members": list(c.members)}
        for c in net.width_choices.values()
    }
    depths = {s: c.candidates for s, c in net.depth_of.items()}
    fixed: dict[str, str] = {}
    if is_traced(model):  # widths the traced graph leaves unsearched, and why
        fixed = {n: str(g.fixed) for n, g in traced(model).groups.items() if g.fixed}
    obj = {
        "model": model,
        "fixed_widths": fixed,
        "input_size": list(size),
        "tie_residual": tie_residual,
        "widths": widths,
        "width_choices": choices,
        "depths": depths,
        "min_flops": smallest,
        "max_flops": largest,
        "min_flops_ratio": smallest / largest,
    }
    lines = [f"{model} @ {'x'.join(map(str, size))}"]
    for c in net.width_choices.values():
        tied = f"  (one choice for {len(c.members)} convs: {', '.join(c.members)})"
        lines.append(f"  width {c.name}: {c.candidates}" + (tied if len(c.members) > 1 else ""))
    lines += [f"  depth {s}: {c}" for s, c in depths.items()]
    lines += [f"  fixed {n}: {why}" for n, why in fixed.items()]
    lines.append(
        f"  FLOPs: {smallest / 1e6:.2f} .. {largest / 1e6:.2f} M "
        f"(smallest ratio {smallest / largest:.3f})"
    )
    _emit(obj, as_json, "\n".join(lines))
    return 0


def distributed_main() -> bool:
    from tasprune import distributed

    return distributed.is_main()


def _say(line: str) -> None:
    """Print a command's result line (once: rank 0 under torchrun)."""
    if distributed_main():
        print(line)


def _device(recipe: Recipe) -> Any:
    """This process's device: the recipe's, or under torchrun this rank's."""
    from tasprune import distributed

    return distributed.init_from_env(recipe.device).device


def _stage_command(recipe: Recipe, out: Path, command: Callable[[], int]) -> int:
    """Run a one-stage command (train/search/distill) as ``tasprune run`` runs its stages:
    under torchrun every rank joins the process group and trains its shard, rank 0 alone
    holds the folder's lock and writes."""
    from tasprune import distributed

    distributed.init_from_env(recipe.device)
    distributed.configure_rank_logging()
    with run_lock(out) if distributed.is_main() else contextlib.nullcontext():
        return command()


def cmd_train(recipe: Recipe, out: Path, progress: bool = True) -> int:
    """Train the recipe's unpruned model into ``out`` (settings: the recipe's teacher.train)."""
    from tasprune.pipeline import load_run_data
    from tasprune.stages import StageContext, train_teacher

    data = load_run_data(recipe)  # before writing: bad data writes nothing
    if recipe.teacher.weights is not None:  # weights that do not fit: refused before writing
        from tasprune.models.traced import from_weights

        train = data[0]
        from_weights(recipe.model, recipe.teacher.weights, train.num_classes, train.in_channels)
    _write_config(out, recipe)
    _, metrics = train_teacher(StageContext(recipe, data, _device(recipe), progress), out)
    _say(f"{out}/model.pt: test top1 {metrics['top1']:.2f}% top5 {metrics['top5']:.2f}%")
    return 0


def _teacher_from(path: Path, model: str | None) -> tuple[Any, dict[str, Any], Path]:
    """(network, meta, model.pt) of a --teacher, refused when it is another model."""
    from tasprune.checkpoint import load_model_checkpoint, resolve_model_file

    file = resolve_model_file(path, prefer=("teacher",))
    net, meta = load_model_checkpoint(file)
    if model is not None and meta.get("model") != model:
        raise ConfigError(
            f"teacher {path} is a {meta.get('model')}, not {model}. Fix: pass a matching --teacher"
        )
    return net, meta, file


def _latency_args(p: argparse.ArgumentParser) -> None:
    s = _D.search
    p.add_argument(
        "--latency-ratio",
        type=float,
        default=None,
        help="target predicted latency / unpruned latency (a measured per-layer table)",
    )
    p.add_argument(
        "--latency-runtime",
        choices=("eager", "onnxruntime"),
        default=None,
        help=f"runtime the latency is measured in (default {s.latency_runtime})",
    )
    p.add_argument(
        "--latency-batch", type=int, default=None, help=f"its batch (default {s.latency_batch})"
    )
    p.add_argument(
        "--latency-threads",
        type=int,
        default=None,
        help=f"its intra-op threads (default {s.latency_threads})",
    )


def cmd_latency_table(
    model: str,
    backend: str,
    batch: int,
    threads: int,
    input_size: Sequence[int] | None,
    num_classes: int,
    out: Path | None,
    progress: bool = True,
) -> int:
    """Build (or complete) the latency table of ``model``'s search space and say where it is."""
    from tasprune.config import SearchConfig, validate_model
    from tasprune.search import SuperNet
    from tasprune.search.latency import build_table

    size = _input_size(model, input_size)
    cfg = validate_model(
        SearchConfig,
        {
            "latency_ratio": 0.5,
            "latency_runtime": backend,
            "latency_batch": batch,
            "latency_threads": threads,
        },
        "latency-table",
    )
    net = SuperNet.for_input(model, size, num_classes, cfg.space())
    if out is not None and out.exists() and not out.is_file():
        raise ConfigError(f"--out {out} is not a file. Fix: name a .json file")
    if out is not None:  # a named file: extended when it holds this machine's table
        cfg = cfg.model_copy(update={"latency_table": str(out) if out.is_file() else None})
    table, (scale, rest), path = build_table(net, cfg, progress=progress)
    if out is not None and path != out:
        if out.is_file():
            raise ConfigError(
                f"--out {out} holds a latency table of another machine, runtime, thread count "
                "or batch (see the log); it is left as it is. Fix: name a new file"
            )
        table.save(out)
        path = out
    _say(
        f"{path}: {len(table.entries)} layer latencies ({backend}, {threads} threads, batch "
        f"{batch}); {model} predicted as {scale:.3f} x its layers {rest:+.3f} ms"
    )
    return 0


def cmd_search(recipe: Recipe, out: Path, teacher: Path | None, progress: bool = True) -> int:
    """Search a shape for the recipe's model under ``search.flops_ratio`` into ``out``."""
    from tasprune.pipeline import load_run_data
    from tasprune.search.loop import check_budget
    from tasprune.stages import StageContext, check_model_fits_data, search_shape

    data = load_run_data(recipe)
    train_data = data[0]
    net = None
    if teacher:
        net, meta, path = _teacher_from(teacher, recipe.model)
        check_model_fits_data(meta, path, train_data)
    size = (train_data.in_channels, *train_data.image_size)
    check_budget(  # before writing
        recipe.model, recipe.search, size, train_data.num_classes, progress=progress
    )
    _write_config(out, recipe)
    ctx = StageContext(recipe, data, _device(recipe), progress)
    result = search_shape(ctx, out, ctx.ordered(net) if net is not None else None)
    lat = result.latency
    lat_text = (
        f", predicted {lat['runtime']} latency {lat['predicted_ms']:.2f} ms "
        f"(ratio {lat['predicted_ratio']:.3f})"
        if lat
        else ""
    )
    _say(
        f"{out}/shape.json: {result.flops / 1e6:.2f} MFLOPs (ratio {result.flops_ratio:.3f}), "
        f"{result.params / 1e6:.3f} M params{lat_text}"
    )
    return 0


def cmd_distill(
    recipe: Recipe, out: Path, shape: Path, teacher: Path, progress: bool = True
) -> int:
    """Train the pruned network of ``shape`` with KD from ``teacher`` into ``out``."""
    from tasprune.models import get_model_spec
    from tasprune.pipeline import load_run_data, load_supernet_state
    from tasprune.shape import Shape
    from tasprune.stages import StageContext, check_model_fits_data, train_student

    sh, info = Shape.load(shape)
    model = str(info.get("model") or recipe.model)
    sh.validate_against(get_model_spec(model).full_shape(), model)  # before any loading
    net, meta, teacher_file = _teacher_from(teacher, model)
    if "name" not in recipe.data.model_fields_set and meta.get("dataset"):
        recipe = recipe.model_copy(
            update={"data": recipe.data.model_copy(update={"name": meta["dataset"]})}
        )
    recipe = recipe.model_copy(update={"model": model})
    data = load_run_data(recipe)
    check_model_fits_data(meta, teacher_file, data[0])
    supernet = None
    if recipe.distill.init == "supernet":
        supernet = load_supernet_state(shape.parent / "supernet.pt")
    _write_config(out, recipe)
    ctx = StageContext(recipe, data, _device(recipe), progress)
    metrics = train_student(ctx, out, sh, ctx.ordered(net), supernet_state=supernet)
    _say(
        f"{out}/model.pt: test top1 {metrics['top1']:.2f}% top5 {metrics['top5']:.2f}%, "
        f"{metrics['flops'] / 1e6:.2f} MFLOPs"
    )
    return 0


def cmd_run(recipe: Recipe, out: Path, from_stage: str | None = None, progress: bool = True) -> int:
    """Run teacher -> search -> distill -> report into ``out`` (resumes; skips finished stages)."""
    from tasprune import distributed
    from tasprune.pipeline import run

    result = run(recipe, out, from_stage=from_stage, progress=progress)
    if distributed.is_main():
        print(result["table"])
    return 0


def cmd_report(run_dir: Path) -> int:
    """Write report.json / report.md / plots for a finished run folder."""
    from tasprune.report import write_report  # matplotlib: imported only when needed

    if not run_dir.is_dir():
        raise ConfigError(f"run folder {run_dir} does not exist. Fix: pass a `tasprune run` --out")
    kwargs: dict[str, Any] = {}
    if (run_dir / "recipe.yaml").is_file():
        stored = load_recipe(run_dir / "recipe.yaml")
        rc = stored.report
        kwargs = {
            "latency_batches": tuple(rc.latency_batches),
            "repeats": rc.latency_repeats,
            "tensorboard": stored.log == "tensorboard",
        }
    with run_lock(run_dir):
        write_report(run_dir, device="cpu", **kwargs)
    print(f"{run_dir}/report.md")
    return 0


def cmd_export(
    source: Path, fmt: str = "onnx", out: Path | None = None, pad_channels: int = 8
) -> int:
    """Export the pruned network of a run folder (or a model.pt) to ONNX/TorchScript/safetensors."""
    from tasprune.export import export_model

    if pad_channels < 0:
        raise ConfigError(f"--pad-channels {pad_channels} is negative. Fix: 0 (off), 8 or 16")
    path = export_model(source, fmt, out, pad_channels=pad_channels)  # type: ignore[arg-type]
    print(path)
    return 0


def cmd_bench(argv: Sequence[str]) -> int:
    """Run a benchmark protocol (``tasprune bench PROTOCOL``, see `tasprune.bench`)."""
    from tasprune.bench import main as bench_main  # Torch-Pruning, ONNX: only when needed

    code = bench_main(list(argv), prog="tasprune bench")
    return int(code) if isinstance(code, int) else 0


# --------------------------------------------------------------------------- argparse


class _Parser(argparse.ArgumentParser):
    """argparse with the package's error style: one ``error:`` line, exit code 2."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        self.exit(2, f"error: {self.prog}: {message}. Fix: see `{self.prog} --help`\n")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Shows a flag's default unless it is None/False/[] (those defer to the recipe)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default not in (None, False, [], argparse.SUPPRESS) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


_D = Recipe()  # built-in defaults, quoted in --help


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    p.add_argument("--debug", action="store_true", help="show tracebacks (or TASPRUNE_DEBUG=1)")


def _deterministic_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--deterministic",
        action="store_true",
        help="deterministic kernels and seeding in every stage (same seed + same machine = "
        "bit-identical results, also across a kill and resume); sets recipe.deterministic",
    )


def _deterministic_flags(on: bool) -> dict[str, Any]:
    """Recipe overrides of --deterministic: the recipe's and every stage config's flag."""
    if not on:
        return {}
    return {
        "deterministic": True,
        "teacher": {"train": {"deterministic": True}},
        "search": {"deterministic": True},
        "distill": {"train": {"deterministic": True}},
    }


def _set_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key, e.g. --set search.arch_lr=0.05 (repeatable)",
    )
    p.add_argument(
        "--device", default=None, help=f"auto | cpu | cuda | cuda:N (default {_D.device})"
    )


_MODEL_HELP = "registered model, or torchvision:NAME / timm:NAME (any CNN of those libraries)"


def _recipe_args(p: argparse.ArgumentParser, data: bool = True) -> None:
    p.add_argument("--config", type=Path, default=None, help="recipe YAML (see configs/)")
    _set_device_args(p)
    if data:
        p.add_argument(
            "--data",
            default=None,
            help=f"fashion-mnist | cifar10 | cifar100 | imagefolder | imagenet (default {_D.data.name})",
        )
        p.add_argument(
            "--data-root",
            default=None,
            help="folder holding the dataset files (default: the dataset's usual places)",
        )
        p.add_argument(
            "--train-subset",
            type=int,
            default=None,
            help="use a stratified subset of N training images (default: all)",
        )
        p.add_argument(
            "--test-subset",
            type=int,
            default=None,
            help="use a stratified subset of N test images (default: all)",
        )
        p.add_argument(
            "--crop-padding",
            type=int,
            default=None,
            help="random-crop padding in pixels when training (default: fits the data)",
        )
        p.add_argument(
            "--flip",
            choices=("on", "off"),
            default=None,
            help="random horizontal flip when training (default: on for mirror-invariant data)",
        )
    p.add_argument("--seed", type=int, default=None, help=f"random seed (default {_D.seed})")
    _deterministic_arg(p)
    _log_arg(p)


def _schedule_args(p: argparse.ArgumentParser, key: str, cfg: Any, lr: bool = True) -> None:
    """--epochs, --batch-size (and --lr) of the stage config ``cfg`` at recipe key ``key``."""
    p.add_argument("--epochs", type=int, default=None, help=f"{key}.epochs (default {cfg.epochs})")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=f"images per step (default {cfg.batch_size})",
    )
    if lr:
        p.add_argument(
            "--lr", type=float, default=None, help=f"peak learning rate (default {cfg.lr})"
        )


def _out_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        help="output folder (resumes there; the resolved recipe goes to config.yaml)",
    )


def _size_args(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument(
        "--input-size",
        type=int,
        nargs=3,
        metavar=("C", "H", "W"),
        default=None,
        help=f"input size (default: {default})",
    )
    p.add_argument("--json", dest="as_json", action="store_true", help="print one JSON object")


def _log_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--log",
        choices=("jsonl", "tensorboard"),
        default=None,
        help="tensorboard: also write every epoch's metrics for `tensorboard --logdir OUT`",
    )


def _data_flags(a: argparse.Namespace) -> dict[str, Any]:
    return {
        "device": a.device,
        "seed": a.seed,
        "data": {
            "name": getattr(a, "data", None),
            "root": getattr(a, "data_root", None),
            "train_subset": getattr(a, "train_subset", None),
            "test_subset": getattr(a, "test_subset", None),
            "augment": {
                "crop_padding": getattr(a, "crop_padding", None),
                "flip": {"on": True, "off": False}.get(getattr(a, "flip", None) or ""),
            },
        },
        "log": a.log,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tasprune",
        description="Network pruning via Transformable Architecture Search (TAS).",
        formatter_class=_Formatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, fn: Callable[..., int], help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=fn.__doc__, formatter_class=_Formatter)
        _common(p)
        return p

    p = add("train", cmd_train, "train an unpruned network")
    p.add_argument("--model", default=None, help=f"{_MODEL_HELP} (default {_D.model})")
    p.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="state dict of the torchvision:/timm: model's original architecture to start "
        "from (adapted to the data, then fine-tuned)",
    )
    _schedule_args(p, "teacher.train", _D.teacher.train)
    _out_arg(p)
    _recipe_args(p)

    p = add("flops", cmd_flops, "exact FLOPs and params of a (pruned) model")
    p.add_argument("--model", default=None, help="registered model (default: shape's model)")
    p.add_argument("--shape", type=Path, default=None, help="shape.json of a pruned network")
    _size_args(p, "the shape's, else the model's 3 32 32")
    p.add_argument(
        "--num-classes", type=int, default=None, help="classes (default: the shape's, else 10)"
    )

    p = add("space", cmd_space, "the search space of a model")
    p.add_argument("--model", required=True, help="registered model")
    p.add_argument(
        "--per-block",
        dest="tie_residual",
        action="store_false",
        help="one width choice per conv (search.tie_residual: false) instead of one per "
        "residual stream",
    )
    _size_args(p, "the model's")

    p = add("search", cmd_search, "search a pruned shape under a FLOPs budget")
    p.add_argument("--model", default=None, help=f"{_MODEL_HELP} (default {_D.model})")
    p.add_argument(
        "--flops-ratio",
        type=float,
        default=None,
        help=f"target FLOPs / unpruned FLOPs (default {_D.search.flops_ratio}; with "
        "--latency-ratio only when given)",
    )
    _latency_args(p)
    _schedule_args(p, "search", _D.search, lr=False)
    p.add_argument(
        "--arch-lr",
        type=float,
        default=None,
        help=f"architecture Adam lr (default {_D.search.arch_lr})",
    )
    p.add_argument(
        "--teacher", type=Path, default=None, help="run folder or model.pt to warm-start"
    )
    _out_arg(p)
    _recipe_args(p)

    p = add(
        "latency-table",
        cmd_latency_table,
        "measure the per-layer latency table of a model's search space",
    )
    p.add_argument("--model", required=True, help=_MODEL_HELP)
    p.add_argument(
        "--backend",
        choices=("eager", "onnxruntime"),
        default=_D.search.latency_runtime,
        help=f"runtime to measure (default {_D.search.latency_runtime})",
    )
    p.add_argument(
        "--batch",
        type=int,
        default=_D.search.latency_batch,
        help="batch size (default %(default)s)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=_D.search.latency_threads,
        help="intra-op threads (default %(default)s)",
    )
    _size_args(p, "the model's")
    p.add_argument("--num-classes", type=int, default=10, help="classes (default 10)")
    p.add_argument(
        "--out", type=Path, default=None, help="table file (default: the cache's file for the key)"
    )

    p = add("distill", cmd_distill, "train a pruned shape with knowledge distillation")
    p.add_argument("--shape", type=Path, required=True, help="shape.json from a search")
    p.add_argument("--teacher", type=Path, required=True, help="run folder or model.pt")
    _schedule_args(p, "distill.train", _D.distill.train)
    p.add_argument(
        "--init",
        choices=("scratch", "supernet", "teacher"),
        default=None,
        help=f"student initialisation (default {_D.distill.init})",
    )
    _out_arg(p)
    _recipe_args(p)

    p = add("run", cmd_run, "the whole pipeline from a recipe")
    p.add_argument("recipe", type=Path, help="recipe YAML (see configs/)")
    p.add_argument("--out", type=Path, required=True, help="run folder (resumes there)")
    p.add_argument(
        "--from-stage",
        choices=STAGE_NAMES,
        default=None,
        help="rerun this stage and the later ones (old outputs are moved aside)",
    )
    _set_device_args(p)
    _deterministic_arg(p)
    _log_arg(p)

    p = add("report", cmd_report, "write report.json/report.md/plots of a run folder")
    p.add_argument("run_dir", type=Path, help="a `tasprune run` --out folder")

    p = add("export", cmd_export, "export a trained network to ONNX, TorchScript or safetensors")
    p.add_argument("source", type=Path, help="a run folder (its pruned network) or a model.pt")
    p.add_argument(
        "--format",
        dest="fmt",
        choices=("onnx", "torchscript", "safetensors"),
        default="onnx",
        help="file format",
    )
    p.add_argument(
        "--out", type=Path, default=None, help="file or folder (default: DIR/export/pruned.EXT)"
    )
    p.add_argument(
        "--pad-channels",
        type=int,
        default=8,
        help="onnx: zero-pad every channel group to a multiple of N (same outputs, faster in "
        "ONNX Runtime); 0 = as pruned",
    )

    p = add("bench", cmd_bench, "run a benchmark protocol (tasprune.bench)")
    p.add_argument(
        "args", nargs=argparse.REMAINDER, help="PROTOCOL and its options (see tasprune bench -h)"
    )
    return parser


def _dispatch(a: argparse.Namespace) -> int:
    progress = not a.quiet
    if a.command == "flops":
        return cmd_flops(a.model, a.shape, a.input_size, a.num_classes, a.as_json)
    if a.command == "space":
        return cmd_space(a.model, a.input_size, a.as_json, a.tie_residual)
    if a.command == "report":
        return cmd_report(a.run_dir)
    if a.command == "export":
        return cmd_export(a.source, a.fmt, a.out, a.pad_channels)
    if a.command == "bench":
        return cmd_bench(a.args)
    if a.command == "latency-table":
        return cmd_latency_table(
            a.model, a.backend, a.batch, a.threads, a.input_size, a.num_classes, a.out, progress
        )
    det = _deterministic_flags(a.deterministic)
    if a.command == "run":
        recipe = _recipe(a.recipe, a.sets, deep_merge({"device": a.device, "log": a.log}, det))
        return cmd_run(recipe, a.out, a.from_stage, progress)  # pipeline.run takes the lock
    flags = _data_flags(a)
    if a.command == "train":
        flags.update(model=a.model)
        flags["teacher"] = {
            "weights": str(a.weights) if a.weights is not None else None,
            "train": {"epochs": a.epochs, "batch_size": a.batch_size, "lr": a.lr},
        }
        recipe = _recipe(a.config, a.sets, deep_merge(flags, det))
        return _stage_command(recipe, a.out, lambda: cmd_train(recipe, a.out, progress))
    if a.command == "search":
        flags.update(model=a.model)
        flags["search"] = {
            "flops_ratio": a.flops_ratio,
            "latency_ratio": a.latency_ratio,
            "latency_runtime": a.latency_runtime,
            "latency_batch": a.latency_batch,
            "latency_threads": a.latency_threads,
            "epochs": a.epochs,
            "batch_size": a.batch_size,
            "arch_lr": a.arch_lr,
        }
        recipe = _recipe(a.config, a.sets, deep_merge(flags, det))
        return _stage_command(recipe, a.out, lambda: cmd_search(recipe, a.out, a.teacher, progress))
    if a.command == "distill":
        flags["distill"] = {
            "init": a.init,
            "train": {"epochs": a.epochs, "batch_size": a.batch_size, "lr": a.lr},
        }
        recipe = _recipe(a.config, a.sets, deep_merge(flags, det))
        return _stage_command(
            recipe, a.out, lambda: cmd_distill(recipe, a.out, a.shape, a.teacher, progress)
        )
    raise ConfigError(f"unknown command {a.command!r}. Fix: see tasprune --help")


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at emit time (it may be replaced, e.g. by tests)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _setup_logging(quiet: bool) -> None:
    log = logging.getLogger("tasprune")
    for h in [h for h in log.handlers if getattr(h, "_tasprune_cli", False)]:
        log.removeHandler(h)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(message)s", "%H:%M:%S"))
    handler._tasprune_cli = True  # type: ignore[attr-defined]
    log.addHandler(handler)
    log.setLevel(logging.WARNING if quiet else logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tasprune`` console script; returns the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("TASPRUNE_DEBUG", "") not in ("", "0")
    if args_list[:1] == ["bench"]:
        # The benchmark parses its own flags, so `tasprune bench -h` shows them.
        _setup_logging(quiet=False)
        return _guarded(lambda: cmd_bench(args_list[1:]), debug)
    args = build_parser().parse_args(args_list)
    _setup_logging(args.quiet)
    return _guarded(lambda: _dispatch(args), debug or args.debug)


def _guarded(command: Callable[[], int], debug: bool) -> int:
    """Run ``command``; every failure becomes one ``error:`` line (a traceback with debug)."""
    try:
        return command()
    except TaspruneError as err:
        if debug:
            raise
        print(
            f"error: {str(err).splitlines()[0] if str(err) else type(err).__name__}",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except OSError as err:  # a write outside the atomic helpers: disk full, permissions, ...
        if debug:
            raise
        print(f"error: {_os_error_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # a bug: still one line, the traceback behind --debug
        if debug:
            raise
        first = str(err).splitlines()[0] if str(err) else ""
        print(
            f"error: unexpected {type(err).__name__}: {first[:300]}. "
            "Fix: rerun with --debug and report the traceback",
            file=sys.stderr,
        )
        return 1


def _os_error_line(err: OSError) -> str:
    """One line for an OSError that reached the top: what failed, where, and a fix."""
    where = f" ({err.filename})" if err.filename else ""
    reason = err.strerror or str(err) or type(err).__name__
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free disk space or use another --out, then rerun the same command to resume"
    elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "check the permissions of that path or use another --out"
    else:
        fix = "check that path, then rerun the same command"
    return f"{reason}{where}. Fix: {fix}"


if __name__ == "__main__":
    raise SystemExit(main())
