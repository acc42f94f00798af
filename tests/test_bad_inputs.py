"""Catalogue of wrong inputs: each ends the command with one ``error:`` line naming the problem.

Every case asserts: a non-zero exit; exactly one non-empty stderr line, starting with
``error:`` and containing a keyword of that problem; no traceback; and nothing already in the
output folder changed (a file there keeps its bytes and mtime; most cases create nothing).
Most cases call ``main()`` in-process (seconds); a few go through ``python -m tasprune`` to
cover the real entry point (argparse errors, interpreter exit).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

import tasprune.engine as engine
import tasprune.utils as utils
from tasprune.checkpoint import load_checkpoint, save_checkpoint
from tasprune.cli import main
from tasprune.config import load_recipe
from tasprune.models import create_model, get_model_spec
from tasprune.pipeline import load_run_data

pytestmark = pytest.mark.usefixtures("one_thread")

SRC = str(Path(__file__).resolve().parents[1] / "src")
BASE_RECIPE = """\
name: bad-inputs
model: cifar_resnet20
device: cpu
data: {name: fashion-mnist, train_subset: 64, test_subset: 32}
teacher: {train: {epochs: 1, batch_size: 32}}
search: {epochs: 1, batch_size: 16, valid_batches: 1}
distill: {init: teacher, train: {epochs: 1, batch_size: 32}}
report: {latency_batches: [1], latency_repeats: 1, int8: false}
"""


# --------------------------------------------------------------------------- inputs


def _save_model(
    path: Path, model: str, shape: Any = None, classes: int = 10, chans: int = 1
) -> Path:
    """A model.pt as tasprune writes it (weights untrained: only its meta matters here)."""
    net = create_model(model, shape, num_classes=classes, in_channels=chans)
    spec_shape = shape or get_model_spec(model).full_shape()
    meta = {
        "model": model,
        "shape": spec_shape.to_dict(),
        "num_classes": classes,
        "in_channels": chans,
        "input_size": [chans, 28, 28],
        "dataset": "fashion-mnist",
        "role": "teacher",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, {"model": net.state_dict(), "meta": meta})
    return path


def _fake_cifar(root: Path, classes: int, *, label_shift: int = 0, truncate: bool = False) -> Path:
    """A CIFAR-10/100 python-pickle layout with 20 random images per file."""
    if classes == 10:
        folder, key = root / "cifar-10-batches-py", b"labels"
        names = [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]
    else:
        folder, key = root / "cifar-100-python", b"fine_labels"
        names = ["train", "test"]
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in names:
        data = rng.integers(0, 256, (20, 3072), dtype=np.uint8)
        raw = pickle.dumps({b"data": data, key: [i % classes + label_shift for i in range(20)]}, 2)
        (folder / name).write_bytes(raw[: len(raw) // 2] if truncate else raw)
    return root


def _idx(path: Path, magic: int, dims: tuple[int, ...], payload: bytes) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)
    path.write_bytes(header + payload)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inputs")
    full = get_model_spec("cifar_resnet20").full_shape()
    p: dict[str, Path] = {"root": root}
    p["recipe"] = root / "recipe.yaml"
    p["recipe"].write_text(BASE_RECIPE)
    p["teacher"] = _save_model(root / "teacher" / "model.pt", "cifar_resnet20")
    p["r32"] = _save_model(root / "r32" / "model.pt", "cifar_resnet32")
    pruned = full.replace(depths={"layer1.0": 1})
    p["pruned"] = _save_model(root / "pruned" / "model.pt", "cifar_resnet20", pruned)
    bad = root / "corrupt" / "model.pt"
    bad.parent.mkdir()
    shutil.copy2(p["teacher"], bad)
    shutil.copy2(p["teacher"].with_name("model.pt.sha256"), bad.with_name("model.pt.sha256"))
    data = bytearray(bad.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)  # bit rot in the middle
    bad.write_bytes(bytes(data))
    p["corrupt_teacher"] = bad

    shapes = root / "shapes"
    shapes.mkdir()
    first_conv = next(iter(full.widths))
    variants = {
        "unknown_conv": {"widths": {**full.widths, "conv_nope": 4}, "depths": full.depths},
        "width_zero": full.replace(widths={first_conv: 0}).to_dict(),
        "width_too_big": full.replace(widths={first_conv: full.widths[first_conv] + 1}).to_dict(),
    }
    for name, obj in variants.items():
        (shapes / f"{name}.json").write_text(json.dumps(obj))
        p[f"shape_{name}"] = shapes / f"{name}.json"
    full.save(shapes / "ok.json", model="cifar_resnet20")
    p["shape_ok"] = shapes / "ok.json"
    p["shape_not_json"] = shapes / "not_json.json"
    p["shape_not_json"].write_text("widths: {stem: 16}\n")

    p["cifar10"] = _fake_cifar(root / "c10", 10)
    p["cifar100"] = _fake_cifar(root / "c100", 100)
    p["cifar_truncated"] = _fake_cifar(root / "c10t", 10, truncate=True)
    p["cifar_mislabelled"] = _fake_cifar(root / "c10m", 10, label_shift=5)
    raw = root / "fm" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    _idx(raw / "train-images-idx3-ubyte", 2051, (100, 28, 28), bytes(50 * 28 * 28))
    _idx(raw / "train-labels-idx1-ubyte", 2049, (100,), bytes(100))
    p["fashion_truncated"] = root / "fm"
    p["empty_dir"] = root / "empty"
    p["empty_dir"].mkdir()
    p["a_file"] = root / "a_file"
    p["a_file"].write_text("a file where a folder should be\n")
    return p


# --------------------------------------------------------------------------- cases


@dataclass
class Case:
    """``args(inputs, out)`` -> argv; ``keyword`` must appear in the one error line."""

    id: str
    args: Callable[[dict[str, Path], Path], list[str]]
    keyword: str
    proc: bool = False  # through `python -m tasprune` instead of main()
    patch: Callable[[pytest.MonkeyPatch], None] | None = None
    creates: bool = False  # may add files to the out folder (never change existing ones)
    check: Callable[[dict[str, Path], Path], None] | None = None
    needs_permissions: bool = False  # root writes through chmod 0o500: skipped as root


def run_(*sets: str, device: str | None = None) -> Callable[[dict[str, Path], Path], list[str]]:
    def args(p: dict[str, Path], out: Path) -> list[str]:
        argv = ["run", str(p["recipe"]), "--out", str(out), "-q"]
        for s in sets:
            argv += ["--set", s.format(**{k: str(v) for k, v in p.items()})]
        return argv + (["--device", device] if device else [])

    return args


def recipe_text(text: str) -> Callable[[dict[str, Path], Path], list[str]]:
    def args(p: dict[str, Path], out: Path) -> list[str]:
        path = out.parent / "given.yaml"
        path.write_text(text)
        return ["run", str(path), "--out", str(out), "-q"]

    return args


def distill_(
    shape: str, teacher: str = "teacher", *extra: str
) -> Callable[[dict[str, Path], Path], list[str]]:
    def args(p: dict[str, Path], out: Path) -> list[str]:
        argv = ["distill", "--shape", str(p[shape]), "--teacher", str(p[teacher])]
        argv += ["--train-subset", "64", "--test-subset", "32", "--device", "cpu"]
        argv += [e.format(**{k: str(v) for k, v in p.items()}) for e in extra]
        return [*argv, "--out", str(out), "-q"]

    return args


def _full_disk(mp: pytest.MonkeyPatch) -> None:
    """The disk fills when the first checkpoint is written (fsync of its temp file fails)."""
    real = os.fsync

    def fsync(fd: int) -> None:
        target = os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else ""
        if "checkpoint" in target:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    mp.setattr(utils.os, "fsync", fsync)


def _check_full_disk(p: dict[str, Path], out: Path) -> None:
    assert not list(out.rglob("*.tmp")), "a failed write left its temp file"
    assert not (out / "teacher" / "checkpoint.pt").exists()
    assert (out / "recipe.yaml").is_file()  # what was written before the disk filled is intact


def _nan_at_epoch_1(mp: pytest.MonkeyPatch) -> None:
    """The teacher's loss turns NaN at epoch 1 step 0."""
    real = engine.cross_entropy_loss
    recipe = load_recipe(None, yaml.safe_load(BASE_RECIPE))
    steps_per_epoch = len(load_run_data(recipe)[0]) // recipe.teacher.train.batch_size

    def factory(label_smoothing: float = 0.0) -> engine.LossFn:
        inner, calls = real(label_smoothing), [0]

        def loss_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Any:
            loss, logits = inner(model, x, y)
            calls[0] += 1
            bad = calls[0] > steps_per_epoch
            return (loss * float("nan"), logits) if bad else (loss, logits)

        return loss_fn

    mp.setattr(engine, "cross_entropy_loss", factory)


def _check_nan(p: dict[str, Path], out: Path) -> None:
    ckpt = load_checkpoint(out / "teacher" / "checkpoint.pt")  # resumable: epoch 0 is kept
    assert ckpt["epoch"] == 0
    assert not (out / "teacher" / "final.json").exists()


def _check_no_training(p: dict[str, Path], out: Path) -> None:
    assert not (out / "teacher").exists()


CASES = [
    Case("malformed_yaml", recipe_text("model: [cifar_resnet20\n"), "not valid YAML", proc=True),
    Case("unknown_key", run_("modle=cifar_resnet20"), "unknown key 'modle'"),
    Case(
        "unknown_nested_key",
        recipe_text("search:\n  flops_ratoi: 0.5\n"),
        "unknown key 'search.flops_ratoi'",
    ),
    Case(
        "wrong_type", recipe_text("teacher:\n  train:\n    epochs: ten\n"), "teacher.train.epochs"
    ),
    Case("flops_ratio_zero", run_("search.flops_ratio=0"), "search.flops_ratio"),
    Case("flops_ratio_above_one", run_("search.flops_ratio=1.5"), "search.flops_ratio"),
    Case("negative_epochs", run_("distill.train.epochs=-3"), "distill.train.epochs"),
    Case("tau_min_above_tau_max", run_("search.tau_min=6", "search.tau_max=5"), "tau_min"),
    Case(
        "tolerance_not_below_target",
        run_("search.flops_ratio=0.1", "search.tolerance=0.2"),
        "tolerance",
    ),
    Case(
        "infeasible_budget",
        run_("search.flops_ratio=0.01", "search.tolerance=0.005"),
        "smallest shape",
        check=_check_no_training,
    ),
    Case(
        "batch_larger_than_search_half",
        run_("search.batch_size=48"),
        "search.batch_size = 48 is larger than",
        check=_check_no_training,
    ),
    Case("unknown_model", run_("model=resnet9000"), "unknown model 'resnet9000'"),
    Case("unknown_device", run_(device="quantum"), "device 'quantum'"),
    Case(
        "missing_data_folder",
        run_("data.name=cifar10", "data.root=/nonexistent/data"),
        "data root /nonexistent/data does not exist",
    ),
    Case(
        "data_root_without_the_data",
        run_("data.name=cifar10", "data.root={empty_dir}"),
        "cifar10 not found",
    ),
    Case("truncated_idx_file", run_("data.root={fashion_truncated}"), "truncated idx file"),
    Case(
        "truncated_cifar_pickle",
        run_("data.name=cifar10", "data.root={cifar_truncated}"),
        "truncated CIFAR batch",
        proc=True,
    ),
    Case(
        "labels_out_of_range",
        run_("data.name=cifar10", "data.root={cifar_mislabelled}"),
        "labels outside 0-9",
    ),
    Case(
        "teacher_channels_do_not_fit_data",
        run_("data.name=cifar10", "data.root={cifar10}", "teacher.checkpoint={teacher}"),
        "1 input channels (data: 3)",
    ),
    Case(
        "teacher_classes_do_not_fit_data",
        run_("data.name=cifar100", "data.root={cifar100}", "teacher.checkpoint={teacher}"),
        "10 classes (data: 100)",
    ),
    Case(
        "distill_teacher_channels_do_not_fit",
        distill_("shape_ok", "teacher", "--data", "cifar10", "--data-root", "{cifar10}"),
        "input channels",
    ),
    Case(
        "teacher_of_another_model",
        run_("teacher.checkpoint={r32}"),
        "model 'cifar_resnet32' (recipe: 'cifar_resnet20')",
    ),
    Case("teacher_is_pruned", run_("teacher.checkpoint={pruned}"), "is a pruned cifar_resnet20"),
    Case(
        "corrupted_teacher_checkpoint",
        distill_("shape_ok", "corrupt_teacher"),
        "checksum mismatch",
    ),
    Case("shape_unknown_conv", distill_("shape_unknown_conv"), "unknown widths ['conv_nope']"),
    Case("shape_width_zero", distill_("shape_width_zero"), "is outside 1..16 channels"),
    Case("shape_width_above_unpruned", distill_("shape_width_too_big"), "outside 1..16 channels"),
    Case("shape_not_json", distill_("shape_not_json"), "is not valid JSON"),
    Case(
        "output_folder_not_writable",
        lambda p, out: ["run", str(p["recipe"]), "--out", str(p["a_file"] / "sub"), "-q"],
        "cannot use output folder",
    ),
    Case(
        "output_parent_read_only",
        lambda p, out: ["run", str(p["recipe"]), "--out", str(out.parent / "ro" / "sub"), "-q"],
        "Permission denied",
        needs_permissions=True,
    ),
    Case(
        "disk_full",
        run_(),
        "No space left on device",
        patch=_full_disk,
        creates=True,
        check=_check_full_disk,
    ),
    Case(
        "nan_loss",
        run_("teacher.train.epochs=2"),
        "stage teacher: loss became nan at epoch 1 step 0",
        patch=_nan_at_epoch_1,
        creates=True,
        check=_check_nan,
    ),
    Case(
        "unknown_from_stage",
        lambda p, out: ["run", str(p["recipe"]), "--out", str(out), "--from-stage", "bogus"],
        "invalid choice: 'bogus'",
        proc=True,
    ),
    Case(
        "recipe_missing",
        lambda p, out: ["run", "/nonexistent/recipe.yaml", "--out", str(out)],
        "does not exist",
        proc=True,
    ),
    Case("report_of_empty_folder", lambda p, out: ["report", str(out)], "has no teacher/model.pt"),
    Case(
        "export_without_model",
        lambda p, out: ["export", str(out), "--format", "onnx"],
        "holds no model.pt",
        proc=True,
    ),
    Case(
        "export_unknown_format",
        lambda p, out: ["export", str(out), "--format", "pickle"],
        "invalid choice: 'pickle'",
    ),
]


def _snapshot(root: Path) -> dict[str, tuple[str, int]]:
    return {
        str(f.relative_to(root)): (hashlib.sha256(f.read_bytes()).hexdigest(), f.stat().st_mtime_ns)
        for f in root.rglob("*")
        if f.is_file()
    }


def _invoke(argv: list[str], proc: bool, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    if proc:
        env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
        env.pop("TASPRUNE_DEBUG", None)
        env.update(TASPRUNE_NO_PROGRESS="1", OMP_NUM_THREADS="1")
        done = subprocess.run(
            [sys.executable, "-m", "tasprune", *argv],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        return done.returncode, done.stderr
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse refusing a flag exits (after its one line)
        code = exc.code if isinstance(exc.code, int) else 1
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line(
    case: Case,
    inputs: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if case.needs_permissions:
        if os.geteuid() == 0:
            pytest.skip("root ignores chmod 0o500 (the file-in-the-way case covers this)")
        (tmp_path / "ro").mkdir(mode=0o500)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("output of an earlier command\n")
    watched = {"out": out, "inputs": inputs["root"]}
    before = {k: _snapshot(v) for k, v in watched.items()}
    argv = case.args(inputs, out)
    if case.patch is not None:
        case.patch(monkeypatch)
    code, err = _invoke(argv, case.proc, capsys)
    monkeypatch.undo()

    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0, err
    assert len(lines) == 1, f"expected one stderr line, got:\n{err}"
    assert lines[0].startswith("error:") and "Traceback" not in err
    assert "unexpected" not in lines[0], lines[0]  # a bug, not a handled error
    assert case.keyword in lines[0], lines[0]
    after = {k: _snapshot(v) for k, v in watched.items()}
    for name, files in before.items():
        changed = {f for f in files if after[name].get(f) != files[f]}
        assert not changed, f"{name}: earlier files changed: {changed}"
    if not case.creates:
        assert set(after["out"]) == set(before["out"]), "a refused command wrote files"
    if case.check is not None:
        case.check(inputs, out)


def test_catalogue_is_large_enough() -> None:
    assert len(CASES) >= 25 and len({c.id for c in CASES}) == len(CASES)


def test_errors_carry_problem_and_fix_as_fields() -> None:
    from tasprune.datasets import load_dataset
    from tasprune.errors import ConfigError, DataError

    err = ConfigError("recipe x.yaml does not exist. Fix: pass a YAML file (see configs/)")
    assert (err.problem, err.fix) == (
        "recipe x.yaml does not exist",
        "pass a YAML file (see configs/)",
    )
    assert str(err) == "recipe x.yaml does not exist. Fix: pass a YAML file (see configs/)"
    two = DataError("data root /x does not exist", "leave --data-root out")
    assert str(two) == "data root /x does not exist. Fix: leave --data-root out"
    assert ConfigError("no fix given").fix is None
    with pytest.raises(DataError) as info:  # the CLI's error line is str(err), unchanged
        load_dataset("fashion-mnist", "train", "/nonexistent/dir")
    assert info.value.fix is not None and "data root" in info.value.problem
