"""Benchmark protocols: loading, a tiny protocol end to end, resuming, the one-line CLI errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

import tasprune.bench as bench
from tasprune.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
PROTOCOLS = sorted((ROOT / "bench" / "protocols").glob("*.yaml"))
METHOD_KEYS = {
    "top1_mean",
    "top1_std",
    "top1_per_seed",
    "mflops_mean",
    "flops_ratio_mean",
    "params_m_mean",
    "latency_ms",
    "latency_ratio",
    "latency_over_flops_ratio",
    "shapes",
}


def tiny_protocol(**over: Any) -> dict[str, Any]:
    proto: dict[str, Any] = {
        "name": "tiny",
        "recipe": {
            "model": "cifar_resnet20",
            "device": "cpu",
            "data": {"name": "fashion-mnist", "train_subset": 192, "test_subset": 64},
            "teacher": {"train": {"epochs": 1, "batch_size": 64}},
            "search": {"epochs": 1, "batch_size": 64, "valid_batches": 1},
            "distill": {"init": "teacher", "train": {"epochs": 1, "batch_size": 64}},
        },
        "methods": ["tas_kd", "l1_kd"],
        "seeds": [0, 1],
        "latency_batches": [1, 2],
        "latency_repeats": 1,
        "latency_rounds": 1,
        "latency_threads": 1,
    }
    proto.update(over)
    return proto


def _write(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("path", PROTOCOLS, ids=[p.stem for p in PROTOCOLS])
def test_shipped_protocols_load(path: Path) -> None:
    proto, recipe = bench.load_protocol(path)
    assert proto.name == path.stem
    assert len(proto.seeds) >= 2
    assert proto.latency_batches == [1, 64]
    if proto.name == "fmnist-vit":  # the transformer protocol: uniform and L1 baselines
        assert set(proto.methods) == {"tas_kd", "uniform_kd", "l1_kd"}
    else:
        assert set(proto.methods) == set(bench.METHODS)
    if proto.name == "cifar10-r56-paper":
        assert recipe.model == "cifar_resnet56" and recipe.data.name == "cifar10"
        assert abs(recipe.search.flops_ratio - 0.47) < 0.005
        epochs = (recipe.teacher.train.epochs, recipe.search.epochs, recipe.distill.train.epochs)
        assert epochs == (300, 600, 300)
    elif proto.name.endswith("-f30"):  # the harder budget
        assert recipe.search.flops_ratio == 0.3
    else:
        assert recipe.search.flops_ratio == 0.5
    quick, qrecipe = bench.load_protocol(path, quick=True, seeds=3)
    assert quick.name == f"{path.stem}-quick" and len(quick.seeds) == 3
    assert qrecipe.distill.train.epochs == 1


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"seeds": [0]}, "seeds"),
        ({"methods": ["tas_kd", "magic"]}, "methods"),
        ({"colour": "red"}, "unknown key"),
    ],
)
def test_bad_protocols_are_one_line_errors(
    tmp_path: Path, over: dict[str, Any], match: str
) -> None:
    path = _write(tmp_path / "p.yaml", tiny_protocol(**over))
    with pytest.raises(ConfigError, match=match):
        bench.load_protocol(path)


def test_cli_error_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tasprune.cli import main  # errors are printed by the tasprune CLI, once

    assert main(["bench", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("bench")
    path = _write(tmp / "tiny.yaml", tiny_protocol())
    result = bench.run_protocol(
        path, tmp / "runs", results_dir=tmp / "results", progress=False, command="test"
    )
    return tmp, result


def test_tiny_protocol_end_to_end(tiny_run: tuple[Path, dict[str, Any]]) -> None:
    tmp, result = tiny_run
    run = tmp / "runs" / "tiny"
    assert (run / "teacher" / "final.json").is_file()
    for seed in (0, 1):
        assert (run / f"seed-{seed}" / "search" / "search_done.json").is_file()
        for method in ("tas_kd", "l1_kd"):
            assert (run / f"seed-{seed}" / method / "result.json").is_file()
    stored = json.loads((tmp / "results" / "tiny.json").read_text())
    assert stored == json.loads(json.dumps(result))
    for key in ("protocol", "recipe", "teacher", "methods", "targets", "machine", "wall_s"):
        assert key in stored
    assert stored["command"] == "test"
    assert {"cpu_model", "torch_threads", "torch_version"} <= set(stored["machine"])
    assert "reused" in stored["teacher"]["note"]
    assert set(stored["methods"]) == {"tas_kd", "l1_kd"}
    for row in stored["methods"].values():
        assert set(row) >= METHOD_KEYS
        assert row["seeds_done"] == [0, 1] and row["top1_std"] is not None
        assert set(row["latency_ms"]["eager"]) == {"1", "2"}
        assert set(row["latency_ratio"]["onnx"]) == {"1", "2"}
    l1 = stored["methods"]["l1_kd"]
    assert 0.45 <= l1["flops_ratio_mean"] <= 0.5
    assert len(stored["targets"]) == len(bench.TARGETS)
    assert {t["status"] for t in stored["targets"]} <= {"PASS", "MISS", "n/a"}
    stages = stored["wall_s"]["stages"]
    for key in ("teacher", "search/seed-0", "train/tas_kd/seed-1", "train/l1_kd/seed-0"):
        assert key in stages
    # every seed's search: its last epoch's entropy in [0, 1] and the kept shape's source, which
    # is the TAS students' shape (same FLOPs ratio)
    searches = stored["searches"]
    assert set(searches) == {"0", "1"}
    for seed, srow in searches.items():
        assert srow["epochs"] == stored["recipe"]["search"]["epochs"]
        assert 0.0 <= srow["entropy_mean"] <= srow["entropy_max"] <= 1.0
        assert srow["source"] in ("last", "best", "projected")
        assert srow["flops_ratio"] == pytest.approx(
            stored["methods"]["tas_kd"]["flops_ratio_per_seed"][seed]
        )
    shapes = list(stored["methods"]["tas_kd"]["shapes"].values())
    assert stored["search_agreement"] == pytest.approx(bench.shape_agreement(shapes))
    md = (tmp / "results" / "tiny.md").read_text()
    assert "| tas_kd |" in md and "## Targets" in md and "lat/FLOPs b2" in md
    assert "## Searches" in md and "Seed agreement" in md


def test_shape_agreement_counts_equal_widths_and_depths() -> None:
    a = {"widths": {"c1": 8, "c2": 16}, "depths": {"s1": 2}}
    b = {"widths": {"c1": 8, "c2": 12}, "depths": {"s1": 1}}
    assert bench.shape_agreement([a, a]) == 1.0
    assert bench.shape_agreement([a, b]) == pytest.approx(1 / 3)
    assert bench.shape_agreement([a, a, b]) == pytest.approx((1 + 1 / 3 + 1 / 3) / 3)
    assert bench.shape_agreement([a]) is None


def test_rerun_resumes_without_training(
    tiny_run: tuple[Path, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    tmp, first = tiny_run

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a finished step ran again")

    import tasprune.bench.runner as runner
    import tasprune.stages as stages

    for name in ("l1_prune", "measure"):
        monkeypatch.setattr(runner, name, boom)
    for name in ("fit", "distill", "run_search"):
        monkeypatch.setattr(stages, name, boom)
    again = bench.run_protocol(
        tmp / "tiny.yaml", tmp / "runs", results_dir=tmp / "results2", progress=False
    )
    assert again["ran_this_invocation"] == []
    for method in ("tas_kd", "l1_kd"):
        assert (
            again["methods"][method]["top1_per_seed"] == first["methods"][method]["top1_per_seed"]
        )
    assert (tmp / "results2" / "tiny.md").is_file()


def test_changed_recipe_in_the_same_folder_is_refused(
    tiny_run: tuple[Path, dict[str, Any]],
) -> None:
    tmp, _ = tiny_run
    proto = tiny_protocol()
    proto["recipe"]["distill"]["train"]["epochs"] = 2
    path = _write(tmp / "changed.yaml", proto)
    with pytest.raises(ConfigError, match="different recipe"):
        bench.run_protocol(path, tmp / "runs", results_dir=tmp / "results3", progress=False)


def test_targets_need_a_margin_above_the_seed_noise() -> None:
    from tasprune.bench.results import evaluate_targets
    from tasprune.budget import Budget

    def row(mean: float, std: float) -> dict[str, object]:
        return {
            "top1_mean": mean,
            "top1_std": std,
            "flops_ratio_mean": 0.48,
            "flops_ratio_per_seed": {"0": 0.48, "1": 0.48},
            "latency_ratio": {"eager": {"64": 0.6}},
            "latency_over_flops_ratio": {"eager": {"64": 1.25}, "onnx": {}},
        }

    rows = {
        "tas_kd": row(91.0, 0.2),
        "tas_nokd": row(91.1, 0.2),
        "uniform_kd": row(90.5, 0.2),  # +0.5 > hypot(0.2, 0.2) = 0.28: a win
        "random_kd": row(90.8, 0.2),  # +0.2: inside the noise
        "l1_kd": row(91.5, 0.1),  # below
    }
    got = evaluate_targets({"top1": 91.3}, rows, Budget(0.5, 0.05, "flops"), 64)
    assert [t["status"] for t in got] == ["PASS", "PASS", "MISS", "MISS", "MISS", "MISS"]
    assert [t["target"] for t in got] == list(bench.TARGETS)
    del rows["tas_nokd"]
    assert (
        evaluate_targets({"top1": 91.3}, rows, Budget(0.5, 0.05, "flops"), 64)[4]["status"] == "n/a"
    )


def test_a_protocol_folder_in_use_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    """A second `tasprune bench` on the same protocol folder stops at once, naming the
    holder, instead of resuming the first one's checkpoints."""
    import subprocess
    import sys

    from tasprune.errors import RunInUseError

    folder = tmp_path / "runs" / "tiny"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         f"from tasprune.lock import run_lock\nimport sys, time\n"
         f"with run_lock({str(folder)!r}):\n    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        path = _write(tmp_path / "p.yaml", tiny_protocol())
        with pytest.raises(RunInUseError):
            bench.run_protocol(path, tmp_path / "runs", results_dir=tmp_path / "r", progress=False)
        assert not (folder / "protocol.yaml").exists() and not (tmp_path / "r").exists()
    finally:
        holder.kill()
        holder.wait()
