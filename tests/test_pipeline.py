"""The whole pipeline into a run folder: stages, skipping, resuming, rerunning, loading."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import TensorDataset
from torch.utils.flop_counter import FlopCounterMode

import tasprune
import tasprune.distill as distill_mod
import tasprune.pipeline as pipeline
import tasprune.stages as stages
from tasprune.checkpoint import load_checkpoint
from tasprune.config import Recipe, load_recipe
from tasprune.cost import model_cost
from tasprune.errors import CheckpointError, ConfigError, TaspruneError
from tasprune.shape import Shape

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
META_KEYS = {"model", "shape", "num_classes", "in_channels", "input_size", "dataset", "role"}


def tiny_recipe(**over: Any) -> Recipe:
    base: dict[str, Any] = {
        "name": "tiny",
        "model": "cifar_resnet20",
        "device": "cpu",
        "data": {"name": "fashion-mnist", "train_subset": 160, "test_subset": 64},
        "teacher": {"train": {"epochs": 1, "batch_size": 64}},
        "search": {"epochs": 1, "batch_size": 64, "valid_batches": 1},
        "distill": {"init": "teacher", "train": {"epochs": 1, "batch_size": 64}},
        "report": {"latency_batches": [1], "latency_repeats": 1, "int8": False},
    }
    return load_recipe(None, {**base, **over})


def _has_report() -> bool:
    try:
        import tasprune.report as report

        return hasattr(report, "write_report")
    except ImportError:
        return False


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def done_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("run") / "r"
    result = pipeline.run(tiny_recipe(), out, progress=False)
    return out, result


@pytest.fixture
def run_copy(done_run: tuple[Path, dict[str, Any]], tmp_path: Path) -> Path:
    dest = tmp_path / "r"
    shutil.copytree(done_run[0], dest)
    return dest


def _no_training(monkeypatch: pytest.MonkeyPatch, *, distill: bool = True) -> None:
    def boom(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a finished stage trained again")

    monkeypatch.setattr(stages, "fit", boom)
    monkeypatch.setattr(stages, "run_search", boom)
    if distill:
        monkeypatch.setattr(stages, "distill", boom)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_recipes_are_valid(path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.search.budgets() and all(0 < b.ratio <= 1 for b in recipe.search.budgets())
    assert CONFIGS, "configs/ holds no recipes"


def test_run_writes_every_stage(done_run: tuple[Path, dict[str, Any]]) -> None:
    out, result = done_run
    assert (out / "recipe.yaml").is_file()
    for f in ("model.pt", "final.json", "history.jsonl", "checkpoint.pt"):
        assert (out / "teacher" / f).is_file(), f
        assert (out / "student" / f).is_file(), f
    for f in ("shape.json", "supernet.pt", "search_done.json", "history.jsonl"):
        assert (out / "search" / f).is_file(), f
    assert result["status"]["teacher"] == result["status"]["search"] == "ran"
    assert result["status"]["distill"] == "ran"
    if _has_report():
        assert (out / "report.json").is_file() and (out / "report.md").is_file()
        assert result["status"]["report"] == "ran"
        pruned_row = result["table"].splitlines()[-1].split()
        assert pruned_row[0] == "pruned" and pruned_row[-1] != "-"  # latency from report.json
    for role, folder in (("teacher", "teacher"), ("student", "student")):
        meta = load_checkpoint(out / folder / "model.pt")["meta"]
        assert set(meta) >= META_KEYS and meta["role"] == role
        assert meta["input_size"] == [1, 28, 28] and meta["dataset"] == "fashion-mnist"
        assert meta["recipe"]["name"] == "tiny"
    assert "pruned" in result["table"] and "teacher" in result["table"]


def test_loaded_model_has_the_searched_flops(done_run: tuple[Path, dict[str, Any]]) -> None:
    out, _ = done_run
    model = tasprune.load(out)
    assert not model.training
    info = json.loads((out / "search" / "shape.json").read_text())
    shape = Shape.from_dict(info)
    assert model_cost("cifar_resnet20", shape, (1, 28, 28), 10) == (info["flops"], info["params"])
    assert sum(p.numel() for p in model.parameters()) == info["params"]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 1, 28, 28))
    assert counter.get_total_flops() // 2 == info["flops"]  # torch counts 2 per MAC
    assert (
        tasprune.load(out / "student" / "model.pt").state_dict().keys() == model.state_dict().keys()
    )


def test_rerun_skips_every_stage(
    done_run: tuple[Path, dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    out, first = done_run
    before = _mtimes(out)
    _no_training(monkeypatch)
    with caplog.at_level(logging.INFO, logger="tasprune"):
        result = pipeline.run(tiny_recipe(), out, progress=False)
    assert result["status"]["teacher"] == result["status"]["search"] == "skipped"
    assert result["status"]["distill"] == "skipped"
    assert result["distill"]["top1"] == first["distill"]["top1"]
    after = _mtimes(out)
    changed = {k for k in before if before[k] != after.get(k)} - {"recipe.yaml"}
    assert not changed
    assert sum("skipped" in r.getMessage() for r in caplog.records) >= 3


def test_missing_marker_reruns_only_that_stage(
    run_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (run_copy / "student" / "final.json").unlink()
    _no_training(monkeypatch, distill=False)
    result = pipeline.run(tiny_recipe(), run_copy, progress=False)
    assert result["status"]["teacher"] == result["status"]["search"] == "skipped"
    assert result["status"]["distill"] == "ran"
    assert (run_copy / "student" / "final.json").is_file()


def test_from_stage_moves_old_outputs_aside(run_copy: Path) -> None:
    teacher_before = _mtimes(run_copy / "teacher")
    old_shape = (run_copy / "search" / "shape.json").read_text()
    result = pipeline.run(tiny_recipe(), run_copy, from_stage="search", progress=False)
    assert result["status"] == {**result["status"], "teacher": "skipped", "search": "ran"}
    assert result["status"]["distill"] == "ran"
    aside = list(run_copy.glob(".old-search-*"))
    assert len(aside) == 1
    assert (aside[0] / "search" / "shape.json").read_text() == old_shape
    assert (aside[0] / "student" / "model.pt").is_file()
    assert (run_copy / "search" / "search_done.json").is_file()
    assert (run_copy / "student" / "final.json").is_file()
    assert _mtimes(run_copy / "teacher") == teacher_before


def test_different_recipe_is_refused(run_copy: Path) -> None:
    changed = tiny_recipe(seed=7)
    with pytest.raises(ConfigError, match="different recipe.*seed"):
        pipeline.run(changed, run_copy, progress=False)


def test_interrupted_stage_resumes(
    run_copy: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The student stops after epoch 0 of 2 (Ctrl-C); the rerun continues from epoch 1."""
    recipe = tiny_recipe(distill={"init": "teacher", "train": {"epochs": 2, "batch_size": 64}})
    real_fit = distill_mod.fit

    def interrupted_fit(*args: Any, **kwargs: Any) -> Any:
        def stop(epoch: int, row: dict[str, Any]) -> None:
            raise KeyboardInterrupt

        return real_fit(*args, **kwargs, on_epoch_end=stop)

    monkeypatch.setattr(distill_mod, "fit", interrupted_fit)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(recipe, run_copy, from_stage="distill", progress=False)
    assert not (run_copy / "student" / "final.json").exists()
    assert load_checkpoint(run_copy / "student" / "checkpoint.pt")["epoch"] == 0

    monkeypatch.setattr(distill_mod, "fit", real_fit)
    with caplog.at_level(logging.INFO, logger="tasprune"):
        result = pipeline.run(recipe, run_copy, progress=False)
    assert result["status"]["distill"] == "ran"
    assert any("resuming" in r.getMessage() for r in caplog.records)
    rows = [json.loads(line) for line in (run_copy / "student" / "history.jsonl").open()]
    assert [r["epoch"] for r in rows] == [0, 1]


def test_teacher_checkpoint_is_imported(
    done_run: tuple[Path, dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, _ = done_run
    out = tmp_path / "imported"
    out.mkdir()
    # Later stages are copied in finished, so only the teacher import runs here.
    for later in ("search", "student", "report.json", "report.md", "plots"):
        if (src / later).is_dir():
            shutil.copytree(src / later, out / later)
        elif (src / later).is_file():
            shutil.copy2(src / later, out / later)
    recipe = tiny_recipe(teacher={"checkpoint": str(src), "train": {"epochs": 1}})
    monkeypatch.setattr(stages, "fit", None)  # the teacher must not be trained
    result = pipeline.run(recipe, out, progress=False)
    assert result["status"]["teacher"] == "ran" and result["status"]["search"] == "skipped"
    final = json.loads((out / "teacher" / "final.json").read_text())
    assert final["epochs"] == 0 and final["source"].endswith("teacher/model.pt")
    assert result["teacher"]["top1"] == pytest.approx(
        json.loads((src / "teacher" / "final.json").read_text())["metrics"]["top1"]
    )

    wrong = tiny_recipe(model="cifar_resnet32", teacher={"checkpoint": str(src)})
    with pytest.raises(CheckpointError, match="does not fit this recipe"):
        pipeline.run(wrong, tmp_path / "wrong", progress=False)


def test_a_network_without_depth_choices_runs_to_its_report(tmp_path: Path) -> None:
    """Every stage and the report, plots included, on a user's network of plain convs (width
    choices, no depth choice): the run used to die in the report's depth plot at the end."""
    out = tmp_path / "plain"
    result = pipeline.run(tiny_recipe(model="py:user_nets:plain_net"), out, progress=False)
    report = json.loads((out / "report.json").read_text())
    assert result["report"]["model"] == report["model"] == "py:user_nets:plain_net"
    assert report["teacher"]["shape"]["depths"] == {}
    assert {"widths", "search_trajectory", "training"} <= set(report["plots"])
    assert "depths" not in report["plots"]
    assert all((out / rel).is_file() for rel in report["plots"].values())


def test_api_accepts_torch_datasets(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x = torch.rand(96, 1, 12, 12)
    ds = TensorDataset(x, torch.arange(96) % 3)
    arr = tasprune.as_array_dataset(ds)
    assert arr.images.dtype == torch.uint8 and arr.num_classes == 3
    assert torch.equal(arr.images, (x * 255).round().to(torch.uint8))
    assert arr.mean[0] == pytest.approx(float(arr.images.float().mean() / 255), rel=1e-4)
    cfg = tasprune.TrainConfig(epochs=1, batch_size=32)
    metrics = tasprune.train("cifar_resnet20", ds, ds, cfg, tmp_path / "t", device="cpu")
    assert 0 <= metrics["top1"] <= 100
    model = tasprune.load(tmp_path / "t")
    assert model(torch.zeros(2, 1, 12, 12)).shape == (2, 3)
    with pytest.raises(TaspruneError, match=r"\[0, 1\]"):
        tasprune.as_array_dataset(TensorDataset(x * 3, torch.zeros(96, dtype=torch.long)))


def test_search_is_reexported_and_subpackage_still_works() -> None:
    from tasprune.search import SearchConfig
    from tasprune.search.loop import search

    assert callable(tasprune.search) and tasprune.search.SearchConfig is SearchConfig
    assert tasprune.search.search is search


def test_cli_run_resumes_a_finished_folder(
    run_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tasprune.cli import main
    from tasprune.config import dump_recipe

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(dump_recipe(tiny_recipe()))
    assert main(["run", str(recipe), "--out", str(run_copy), "-q"]) == 0
    assert "pruned" in capsys.readouterr().out
    code = main(["run", str(recipe), "--out", str(run_copy), "--set", "seed=3", "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "different recipe" in err[0]


def test_cli_export_prints_the_written_file(
    run_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tasprune.cli import main
    from tasprune.export import load_safetensors

    assert main(["export", str(run_copy), "--format", "safetensors", "-q"]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path == run_copy / "export" / "pruned.safetensors" and path.is_file()
    reloaded = load_safetensors(path)
    assert reloaded.state_dict().keys() == tasprune.load(run_copy).state_dict().keys()
