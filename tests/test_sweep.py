"""`tasprune sweep`: one shared teacher, one run folder per budget, the trade-off table and plot,
resuming, and the refusals (bad ratios, another sweep's folder) that write nothing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import tasprune.stages as stages
from conftest import TINY_RUN, needs_fashion_mnist
from tasprune.cli import main
from tasprune.config import Recipe, deep_merge, load_recipe
from tasprune.errors import ConfigError
from tasprune.pipeline import stage_done
from tasprune.sweep import sweep

pytestmark = [needs_fashion_mnist, pytest.mark.usefixtures("one_thread")]

RATIOS = [0.5, 0.3]  # given unsorted: the sweep sorts them
TINY = TINY_RUN


def _sets(node: dict[str, Any], prefix: str = "") -> list[str]:
    """TINY as the command line's ``--set KEY=VALUE`` flags."""
    out: list[str] = []
    for key, value in node.items():
        if isinstance(value, dict):
            out += _sets(value, f"{prefix}{key}.")
        else:
            out += ["--set", f"{prefix}{key}={json.dumps(value)}"]
    return out


TINY_SETS = [*_sets(TINY), "-q"]


def tiny() -> Recipe:
    return load_recipe("fmnist-r20-quick", TINY)


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def done(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("sweep") / "s"
    return out, sweep(tiny(), RATIOS, out, progress=False)


def test_every_budget_is_a_finished_run(done: tuple[Path, dict[str, Any]]) -> None:
    out, summary = done
    for name in ("ratio-0.30", "ratio-0.50"):
        assert all(stage_done(out / name, s) for s in ("teacher", "search", "distill", "report"))
        assert (out / name.replace("ratio", "uniform") / "report.json").is_file()
    assert json.loads((out / "sweep.json").read_text()) == summary
    assert summary["ratios"] == [0.3, 0.5] and summary["metric"] == "flops"
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "sweep.md").read_text()
    assert table.count("| tas |") == 2 and table.count("| uniform |") == 2
    assert "| teacher |" in table


def test_points_lie_in_their_budget_bands(done: tuple[Path, dict[str, Any]]) -> None:
    _, summary = done
    tol = summary["tolerance"]
    points = summary["points"]
    assert [p["method"] for p in points].count("teacher") == 1
    for p in points:
        assert isinstance(p["top1"], float) and p["eager_ms"] > 0 and p["onnx_ms"] > 0
        if p["method"] == "teacher":
            assert p["flops_ratio"] == 1.0
            continue
        r = p["target_ratio"]
        assert r - tol - 1e-9 <= p["flops_ratio"] <= r + 1e-9, p
        assert p["in_band"] is True
        assert p["int8_ms"] is None  # report.int8: false


def test_the_teacher_is_trained_once(done: tuple[Path, dict[str, Any]]) -> None:
    out, _ = done
    shared = out / "teacher" / "model.pt"
    rows = (out / "teacher" / "history.jsonl").read_text().splitlines()
    assert len(rows) == 1  # one epoch, trained once
    for name in ("ratio-0.30", "ratio-0.50", "uniform-0.30", "uniform-0.50"):
        teacher = out / name / "teacher"
        assert (teacher / "model.pt").read_bytes() == shared.read_bytes()
        assert not (teacher / "checkpoint.pt").exists()  # never trained in that folder
        assert (teacher / "history.jsonl").read_text().splitlines() == rows


def test_a_rerun_is_a_no_op(done: tuple[Path, dict[str, Any]], monkeypatch: Any) -> None:
    out, summary = done

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a finished sweep trained again")

    for name in ("fit", "run_search", "distill"):
        monkeypatch.setattr(stages, name, boom)
    before = (out / "sweep.json").stat().st_mtime_ns, (out / "sweep.png").read_bytes()
    assert sweep(tiny(), RATIOS, out, progress=False) == summary
    assert ((out / "sweep.json").stat().st_mtime_ns, (out / "sweep.png").read_bytes()) == before


def test_another_sweep_in_the_folder_is_refused(done: tuple[Path, dict[str, Any]]) -> None:
    out, _ = done
    before = _mtimes(out)
    with pytest.raises(ConfigError, match=r"different sweep \(differs in ratios\).*Fix:"):
        sweep(tiny(), [0.3, 0.4], out, progress=False)
    with pytest.raises(ConfigError, match="differs in search.epochs"):
        longer = deep_merge(TINY, {"search": {"epochs": 2}})
        sweep(load_recipe("fmnist-r20-quick", longer), RATIOS, out, progress=False)
    with pytest.raises(ConfigError, match="holds no sweep.*Fix:"):  # a run folder
        sweep(tiny(), RATIOS, out / "ratio-0.30", progress=False)
    assert _mtimes(out) == before


def test_the_command_resumes_the_same_sweep(
    done: tuple[Path, dict[str, Any]], monkeypatch: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    out, summary = done
    monkeypatch.setattr(stages, "fit", None)  # nothing trains: calling it would fail
    argv = ["sweep", "fmnist-r20-quick", "--ratios", "0.3", "0.5", "--out", str(out)]
    assert main([*argv, *TINY_SETS]) == 0
    assert capsys.readouterr().out.strip() == f"{out}/sweep.md, {out}/sweep.png"
    assert json.loads((out / "sweep.json").read_text()) == summary
    with pytest.raises(SystemExit) as exc:
        main(["sweep", "--help"])
    assert exc.value.code == 0 and "--no-uniform" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("ratios", "sets", "message"),
    [
        (["0.3", "1.5"], [], "ratio 1.5 is outside (0, 1]. Fix:"),
        (["0.3", "0.30"], [], "ratio 0.30 is given twice. Fix:"),
        (["0.04"], [], "not above the budget band's width search.tolerance (0.05). Fix:"),
        (["0.02"], ["--set", "search.tolerance=0.01"], "smallest shape of cifar_resnet20"),
    ],
)
def test_bad_ratios_are_one_line_and_write_nothing(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    ratios: list[str],
    sets: list[str],
    message: str,
) -> None:
    out = tmp_path / "s"
    argv = ["sweep", "fmnist-r20-quick", "--ratios", *ratios, "--out", str(out)]
    assert main([*argv, *TINY_SETS, *sets]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err and "Fix:" in err
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.slow
def test_a_latency_sweep(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Latency budgets: the predicted latency ratio in the band, no FLOPs constraint beside
    it, and the uniform baseline at the TAS student's FLOPs."""
    monkeypatch.setenv("TASPRUNE_CACHE", str(tmp_path / "cache"))  # the latency table
    summary = sweep(tiny(), [0.6], tmp_path / "s", metric="latency", progress=False)
    _, tas, uni = summary["points"]
    tol = summary["tolerance"]
    assert 0.6 - tol - 1e-9 <= tas["predicted_latency_ratio"] <= 0.6 + 1e-9
    assert tas["in_band"] is True and uni["in_band"] is None
    assert tas["flops_ratio"] - tol - 1e-9 <= uni["flops_ratio"] <= tas["flops_ratio"] + 1e-9
    stored = load_recipe(tmp_path / "s" / "ratio-0.60" / "recipe.yaml").search
    assert (stored.latency_ratio, stored.flops_ratio) == (0.6, None)


def test_the_warm_epochs_run_once(tmp_path: Path) -> None:
    """With search.warm_epochs the first budget's search runs them and every other budget's
    search continues from its warm checkpoint: their history holds the same warm row (its
    wall time included, so it was copied, not rerun) and their own searched epochs after it."""
    recipe = load_recipe(
        "fmnist-r20-quick", deep_merge(TINY, {"search": {"epochs": 2, "warm_epochs": 1}})
    )
    sweep(recipe, RATIOS, tmp_path / "s", uniform=False, progress=False)
    rows = {
        r: [
            json.loads(line)
            for line in (tmp_path / "s" / f"ratio-{r}" / "search" / "history.jsonl")
            .read_text()
            .splitlines()
        ]
        for r in ("0.30", "0.50")
    }
    assert rows["0.30"][0] == rows["0.50"][0] and rows["0.30"][0]["warm"]
    assert [len(r) for r in rows.values()] == [2, 2]
    assert not rows["0.30"][1]["warm"] and not rows["0.50"][1]["warm"]
    for r in RATIOS:  # each kept shape in its own budget's band
        kept = json.loads((tmp_path / "s" / f"ratio-{r:.2f}" / "search" / "shape.json").read_text())
        assert r - 0.05 <= kept["flops_ratio"] <= r
