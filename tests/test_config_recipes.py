"""Shipped recipes: addressable by name from any folder, a path still working as before."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import tasprune
import tasprune.api
import tasprune.pipeline
from tasprune.cli import main
from tasprune.config import Recipe, load_recipe, recipe_names
from tasprune.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_every_shipped_recipe_loads_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # outside the clone: no configs/ here
    names = recipe_names()
    assert "fmnist-r20-quick" in names and len(names) >= 10
    for name in names:
        assert isinstance(load_recipe(name), Recipe)


def test_a_path_still_works_and_is_the_same_recipe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    by_path = load_recipe("configs/fmnist-r20-quick.yaml", ["seed=3"])
    assert by_path == load_recipe("fmnist-r20-quick", ["seed=3"])
    assert by_path.seed == 3
    assert load_recipe(ROOT / "configs" / "fmnist-r20-quick.yaml") == load_recipe(
        "fmnist-r20-quick"
    )


def test_unknown_recipe_name_lists_the_known_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ConfigError) as info:
        load_recipe("fmnist-r99")
    assert "unknown recipe 'fmnist-r99'" in str(info.value)
    assert all(name in str(info.value) for name in recipe_names())
    code = main(["run", "fmnist-r99", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: unknown recipe")
    assert "fmnist-r20-quick" in err[0] and "Fix:" in err[0]
    assert not (tmp_path / "o").exists()


def test_a_missing_path_is_not_taken_for_a_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(tmp_path / "fmnist-r20-quick.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe("configs/fmnist-r20-quick")


def test_cli_and_api_run_a_recipe_by_name_from_another_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[Recipe, Path]] = []

    def fake_run(recipe: Recipe, out: Path, **kwargs: Any) -> dict[str, Any]:
        seen.append((recipe, Path(out)))
        return {"table": ""}

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tasprune.pipeline, "run", fake_run)
    monkeypatch.setattr(tasprune.api, "_run", fake_run)
    assert main(["run", "fmnist-r20-quick", "--out", "cli", "-q"]) == 0
    tasprune.run("fmnist-r20-quick", "api", search__epochs=2)
    (cli, cli_out), (api, api_out) = seen
    assert cli == load_recipe("fmnist-r20-quick") and cli_out == Path("cli")
    assert api.search.epochs == 2 and api.name == cli.name and api_out == Path("api")


def test_entry_point_finds_a_recipe_by_name_outside_the_clone(tmp_path: Path) -> None:
    """A fresh process in an empty folder: the name resolves (the run then stops, one line,
    at the overridden model that does not exist, before anything is trained)."""
    env = {k: v for k, v in os.environ.items() if k != "TASPRUNE_DEBUG"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    args = ["run", "fmnist-r20-quick", "--out", "o", "--set", "model=resnet9000", "-q"]
    proc = subprocess.run(
        [sys.executable, "-m", "tasprune", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "unknown model 'resnet9000'" in lines[0]
