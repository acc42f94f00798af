"""Commands that run stages or use their outputs: ``train``, ``search``, ``distill``, ``run``,
``sweep``, ``report``, ``export``, ``bench``; each its function, its own flags and its recipe
flags."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from tasprune.cli.flags import Command, Flag, Inputs, RecipeInputs
from tasprune.config import Recipe, dump_recipe, load_recipe
from tasprune.errors import ConfigError
from tasprune.int8 import CALIBRATION_IMAGES
from tasprune.lock import run_lock
from tasprune.pipeline import STAGES

# --------------------------------------------------------------------------- recipe flags

_COMMON = (Flag("device"), Flag("seed"), Flag("deterministic"), Flag("log"))
_DATA = (
    Flag("data.name", name="data"),
    Flag("data.root", name="data-root"),
    Flag("data.train_subset"),
    Flag("data.test_subset"),
    # Augment (data.py) documents its fields in comments; these helps stand in for them.
    Flag(
        "data.augment.crop_padding",
        help="random-crop padding in pixels when training (unset: fits the data)",
    ),
    Flag(
        "data.augment.flip",
        help="random horizontal flip when training (unset: on for mirror-invariant data)",
    ),
)


def _schedule(key: str, lr: bool = True) -> tuple[Flag, ...]:
    """--epochs, --batch-size (and --lr) of the stage settings at recipe key ``key``."""
    names = ("epochs", "batch_size", "lr") if lr else ("epochs", "batch_size")
    return tuple(Flag(f"{key}.{name}") for name in names)


# --------------------------------------------------------------------------- helpers


def say(line: str) -> None:
    """Print a command's result line (once: rank 0 under torchrun)."""
    from tasprune import distributed

    if distributed.is_main():
        print(line)


def _write_config(out: Path, recipe: Recipe, name: str = "config.yaml") -> None:
    from tasprune import distributed
    from tasprune.utils import atomic_write_text

    if not distributed.is_main():  # under torchrun rank 0 writes
        return
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / name, dump_recipe(recipe))


def _device(recipe: Recipe) -> Any:
    """This process's device: the recipe's, or under torchrun this rank's."""
    from tasprune import distributed

    return distributed.init_from_env(recipe.device).device


@contextlib.contextmanager
def _stage(recipe: Recipe, out: Path) -> Iterator[None]:
    """A one-stage command (train/search/distill) runs as ``tasprune run`` runs its stages:
    under torchrun every rank joins the process group and trains its shard, rank 0 alone
    holds the folder's lock and writes."""
    from tasprune import distributed

    distributed.init_from_env(recipe.device)
    distributed.configure_rank_logging()
    with run_lock(out) if distributed.is_main() else contextlib.nullcontext():
        yield


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


# --------------------------------------------------------------------------- stages


class StageInputs(RecipeInputs):
    out: Path = Field(
        description="output folder (resumes there; the resolved recipe goes to config.yaml)"
    )


def cmd_train(a: StageInputs, recipe: Recipe) -> int:
    """Train the recipe's unpruned model into ``out`` (settings: the recipe's teacher.train)."""
    from tasprune.pipeline import load_run_data
    from tasprune.stages import StageContext, train_teacher

    with _stage(recipe, a.out):
        data = load_run_data(recipe)  # before writing: bad data writes nothing
        if recipe.teacher.weights is not None:  # weights that do not fit: refused before writing
            from tasprune.models.traced import from_weights

            train = data[0]
            from_weights(recipe.model, recipe.teacher.weights, train.num_classes, train.in_channels)
        _write_config(a.out, recipe)
        ctx = StageContext(recipe, data, _device(recipe), not a.quiet)
        _, metrics = train_teacher(ctx, a.out)
    say(f"{a.out}/model.pt: test top1 {metrics['top1']:.2f}% top5 {metrics['top5']:.2f}%")
    return 0


TRAIN = Command(
    "train",
    cmd_train,
    "train an unpruned network",
    StageInputs,
    (Flag("model"), Flag("teacher.weights"), *_schedule("teacher.train"), *_DATA, *_COMMON),
)


class SearchInputs(StageInputs):
    teacher: Path | None = Field(default=None, description="run folder or model.pt to warm-start")


def cmd_search(a: SearchInputs, recipe: Recipe) -> int:
    """Search a shape for the recipe's model under ``search.flops_ratio`` into ``out``."""
    from tasprune.pipeline import load_run_data
    from tasprune.search.loop import check_budget
    from tasprune.stages import StageContext, check_model_fits_data, search_shape

    progress = not a.quiet
    with _stage(recipe, a.out):
        ctx = StageContext(recipe, load_run_data(recipe), _device(recipe), progress)
        classes = ctx.data[0].num_classes
        net = None
        if a.teacher:
            net, meta, path = _teacher_from(a.teacher, recipe.model)
            check_model_fits_data(meta, path, ctx.data[0])
        # before writing
        check_budget(recipe.model, recipe.search, ctx.input_size, classes, progress=progress)
        _write_config(a.out, recipe)
        result = search_shape(ctx, a.out, ctx.ordered(net) if net is not None else None)
    lat = result.latency
    lat_text = (
        f", predicted {lat['runtime']} latency {lat['predicted_ms']:.2f} ms "
        f"(ratio {lat['predicted_ratio']:.3f})"
        if lat
        else ""
    )
    say(
        f"{a.out}/shape.json: {result.flops / 1e6:.2f} MFLOPs (ratio {result.flops_ratio:.3f}), "
        f"{result.params / 1e6:.3f} M params{lat_text}"
    )
    return 0


SEARCH = Command(
    "search",
    cmd_search,
    "search a pruned shape under a FLOPs budget",
    SearchInputs,
    (
        Flag("model"),
        Flag("search.flops_ratio"),
        Flag("search.latency_ratio"),
        Flag("search.latency_runtime"),
        Flag("search.latency_batch"),
        Flag("search.latency_threads"),
        *_schedule("search", lr=False),
        Flag("search.arch_lr"),
        *_DATA,
        *_COMMON,
    ),
)


class DistillInputs(StageInputs):
    shape: Path = Field(description="shape.json from a search")
    teacher: Path = Field(description="run folder or model.pt")


def cmd_distill(a: DistillInputs, recipe: Recipe) -> int:
    """Train the pruned network of ``shape`` with KD from ``teacher`` into ``out``."""
    from tasprune.models import get_model_spec
    from tasprune.models.legacy import upgrade_shape
    from tasprune.pipeline import load_run_data, load_supernet_state
    from tasprune.shape import Shape
    from tasprune.stages import StageContext, check_model_fits_data, train_student

    with _stage(recipe, a.out):
        sh, info = Shape.load(a.shape)
        model = str(info.get("model") or recipe.model)
        sh = upgrade_shape(model, sh)
        sh.validate_against(get_model_spec(model).full_shape(), model)  # before any loading
        net, meta, teacher_file = _teacher_from(a.teacher, model)
        if "name" not in recipe.data.model_fields_set and meta.get("dataset"):
            recipe = recipe.model_copy(
                update={"data": recipe.data.model_copy(update={"name": meta["dataset"]})}
            )
        recipe = recipe.model_copy(update={"model": model})
        data = load_run_data(recipe)
        check_model_fits_data(meta, teacher_file, data[0])
        supernet = None
        if recipe.distill.init == "supernet":
            supernet = load_supernet_state(a.shape.parent / "supernet.pt")
        _write_config(a.out, recipe)
        ctx = StageContext(recipe, data, _device(recipe), not a.quiet)
        metrics = train_student(ctx, a.out, sh, ctx.ordered(net), supernet_state=supernet)
    say(
        f"{a.out}/model.pt: test top1 {metrics['top1']:.2f}% top5 {metrics['top5']:.2f}%, "
        f"{metrics['flops'] / 1e6:.2f} MFLOPs"
    )
    return 0


DISTILL = Command(
    "distill",
    cmd_distill,
    "train a pruned shape with knowledge distillation",
    DistillInputs,
    (*_schedule("distill.train"), Flag("distill.init"), *_DATA, *_COMMON),
)


class PositionalRecipeInputs(RecipeInputs):
    """The recipe as the positional argument (``tasprune run RECIPE``, ``sweep RECIPE``)."""

    config: str = Field(
        description="a shipped recipe's name (e.g. fmnist-r20-quick) or a recipe YAML file",
        json_schema_extra={"positional": True, "metavar": "recipe"},
    )


class RunInputs(PositionalRecipeInputs):
    out: Path = Field(description="run folder (resumes there)")
    from_stage: str | None = Field(
        default=None,
        description="rerun this stage and the later ones (old outputs are moved aside)",
        json_schema_extra={"choices": list(STAGES)},
    )


def cmd_run(a: RunInputs, recipe: Recipe) -> int:
    """Run teacher -> search -> distill -> report into ``out`` (resumes; skips finished stages)."""
    from tasprune import distributed
    from tasprune.pipeline import run

    result = run(recipe, a.out, from_stage=a.from_stage, progress=not a.quiet)  # takes the lock
    if distributed.is_main():
        print(result["table"])
    return 0


# The recipe flags of the commands that take a whole recipe (run, sweep): where and how it runs.
_WHOLE_RECIPE = (Flag("device"), Flag("deterministic"), Flag("log"))
RUN = Command("run", cmd_run, "the whole pipeline from a recipe", RunInputs, _WHOLE_RECIPE)


class SweepInputs(PositionalRecipeInputs):
    out: Path = Field(description="sweep folder (resumes there)")
    ratios: tuple[float, ...] = Field(
        description="the budgets: ratios of the unpruned network's FLOPs (or latency), each in "
        "(0, 1]; one run folder each"
    )
    metric: Literal["flops", "latency"] = Field(
        default="flops", description="what the ratios budget (search.flops_ratio or latency_ratio)"
    )
    no_uniform: bool = Field(
        default=False, description="skip the uniform-scaling baseline at each budget"
    )


def cmd_sweep(a: SweepInputs, recipe: Recipe) -> int:
    """Prune at every ratio (one shared teacher, one search and student each) and write the
    trade-off table and plot (``out/sweep.json``, ``sweep.md``, ``sweep.png``); resumes."""
    from tasprune.sweep import sweep

    sweep(recipe, a.ratios, a.out, metric=a.metric, uniform=not a.no_uniform, progress=not a.quiet)
    say(f"{a.out}/sweep.md, {a.out}/sweep.png")
    return 0


SWEEP = Command(
    "sweep",
    cmd_sweep,
    "the accuracy/cost trade-off: one pruned network per budget",
    SweepInputs,
    _WHOLE_RECIPE,
)

# --------------------------------------------------------------------------- outputs


class ReportInputs(Inputs):
    run_dir: Path = Field(
        description="a `tasprune run` --out folder", json_schema_extra={"positional": True}
    )


def cmd_report(a: ReportInputs) -> int:
    """Write report.json / report.md / plots for a finished run folder."""
    from tasprune.report import write_report  # matplotlib: imported only when needed

    run_dir = a.run_dir
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
            "int8": rc.int8,
        }
    with run_lock(run_dir):
        write_report(run_dir, device="cpu", **kwargs)
    print(f"{run_dir}/report.md")
    return 0


REPORT = Command(
    "report", cmd_report, "write report.json/report.md/plots of a run folder", ReportInputs
)


class ExportInputs(Inputs):
    source: Path = Field(
        description="a run folder (its pruned network) or a model.pt",
        json_schema_extra={"positional": True},
    )
    format: Literal["onnx", "torchscript", "safetensors"] = Field(
        default="onnx", description="file format"
    )
    out: Path | None = Field(
        default=None, description="file or folder (default: DIR/export/pruned.EXT)"
    )
    pad_channels: int = Field(
        default=8,
        description="onnx: zero-pad every channel group to a multiple of N (same outputs, "
        "faster in ONNX Runtime); 0 = as pruned",
    )
    int8: bool = Field(
        default=False,
        description="onnx: also write the int8 model (PATH.int8.onnx, ONNX Runtime's static "
        "QDQ quantisation calibrated on the checkpoint's training images) and print its path",
    )
    calibration_images: int = Field(
        default=CALIBRATION_IMAGES, ge=1, description="--int8: training images to calibrate on"
    )
    data_root: Path | None = Field(
        default=None,
        description="--int8: folder holding the checkpoint's dataset (unset: its recipe's "
        "data.root, else the dataset's usual places)",
    )


def cmd_export(a: ExportInputs) -> int:
    """Export the pruned network of a run folder (or a model.pt) to ONNX/TorchScript/safetensors."""
    from tasprune.export import export_model

    if a.pad_channels < 0:
        raise ConfigError(f"--pad-channels {a.pad_channels} is negative. Fix: 0 (off), 8 or 16")
    path = export_model(
        a.source,
        a.format,
        a.out,
        pad_channels=a.pad_channels,
        int8=a.int8,
        calibration_images=a.calibration_images,
        data_root=a.data_root,
    )
    print(path)
    return 0


EXPORT = Command(
    "export",
    cmd_export,
    "export a trained network to ONNX, TorchScript or safetensors",
    ExportInputs,
)


class BenchInputs(Inputs):
    args: list[str] = Field(
        default_factory=list,
        description="PROTOCOL and its options (see tasprune bench -h)",
        json_schema_extra={"positional": True},
    )


def cmd_bench(a: BenchInputs) -> int:
    """Run a benchmark protocol (``tasprune bench PROTOCOL``, see `tasprune.bench`)."""
    return bench(a.args)


def bench(argv: Sequence[str]) -> int:
    """``tasprune bench ARGS``: the benchmark parses its own flags (`tasprune bench -h`)."""
    from tasprune.bench import main as bench_main  # Torch-Pruning, ONNX: only when needed

    code = bench_main(list(argv), prog="tasprune bench")
    return int(code) if isinstance(code, int) else 0


BENCH = Command("bench", cmd_bench, "run a benchmark protocol (tasprune.bench)", BenchInputs)
