"""The `tasprune` command line: one-line errors, JSON output, and tiny end-to-end runs."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from pydantic import BaseModel

import tasprune
import tasprune.cost
from tasprune.cli import COMMANDS, build_parser, main
from tasprune.cli.flags import INPUTS, RECIPE, Inputs, field_at, given
from tasprune.config import Recipe
from tasprune.cost import model_cost
from tasprune.shape import Shape

SRC = str(Path(__file__).resolve().parents[1] / "src")
TINY = ["--data", "fashion-mnist", "--train-subset", "160", "--test-subset", "64"]
TINY += ["--device", "cpu", "--batch-size", "64", "-q"]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("TASPRUNE_DEBUG", None)
    code = "from tasprune.cli import main; raise SystemExit(main())"
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_flops_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["flops", "--model", "cifar_resnet20", "--json"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["flops"] == 40813184 and isinstance(obj["params"], int)
    assert obj["model"] == "cifar_resnet20" and obj["input_size"] == [3, 32, 32]


def test_flops_of_a_shape_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    full = tasprune.get_model_spec("cifar_resnet20").full_shape()
    shape = full.replace(depths={"layer1.0": 1})
    shape.save(tmp_path / "s.json", model="cifar_resnet20", input_size=[1, 28, 28])
    assert main(["flops", "--shape", str(tmp_path / "s.json"), "--json"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert (obj["flops"], obj["params"]) == model_cost("cifar_resnet20", shape, (1, 28, 28))


def test_space_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["space", "--model", "cifar_resnet20", "--json"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["widths"]["stem.conv"] == [4, 6, 8, 9, 11, 12, 14, 16]
    assert obj["depths"]["layer1.0"] == [1, 2, 3]
    assert 0 < obj["min_flops"] < obj["max_flops"] == 40813184


def test_space_shows_which_convs_share_a_tied_choice(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["space", "--model", "cifar_resnet20", "--json"]) == 0
    tied = json.loads(capsys.readouterr().out)
    assert main(["space", "--model", "cifar_resnet20", "--per-block", "--json"]) == 0
    per_block = json.loads(capsys.readouterr().out)
    assert tied["tie_residual"] and not per_block["tie_residual"]
    # Every conv belongs to exactly one choice in either space.
    for obj in (tied, per_block):
        members = [m for c in obj["width_choices"].values() for m in c["members"]]
        assert sorted(members) == sorted(obj["widths"])
    stem = next(c for c in tied["width_choices"].values() if "stem.conv" in c["members"])
    assert "layer1.2.conv2.conv" in stem["members"]
    assert "layer1.0.conv1.conv" not in stem["members"]
    assert len(per_block["width_choices"]) == len(per_block["widths"])
    assert len(tied["width_choices"]) < len(per_block["width_choices"])
    assert main(["space", "--model", "cifar_resnet20"]) == 0
    text = capsys.readouterr().out
    assert "one choice for 4 convs: stem.conv, layer1.0.conv2.conv" in text


def test_unknown_model_is_one_line_via_entry_point() -> None:
    proc = _cli("flops", "--model", "resnet9000")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert "cifar_resnet20" in lines[0] and "Traceback" not in proc.stderr


def test_unknown_config_key_names_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: cifar_resnet20\nsearch:\n  flops_ratoi: 0.5\n")
    code = main(["train", "--config", str(bad), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("error:") and "search.flops_ratoi" in err[0]
    assert main(["run", str(bad), "--out", str(tmp_path / "o")]) == 2


def test_debug_shows_the_traceback() -> None:
    with pytest.raises(tasprune.errors.ConfigError):
        main(["flops", "--model", "nope", "--debug"])


def test_ctrl_c_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(*args: object, **kwargs: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(tasprune.cost, "model_cost", interrupted)
    assert main(["flops", "--model", "cifar_resnet20"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted; rerun the same command to resume"


@pytest.mark.parametrize(
    "command", ["train", "flops", "space", "search", "distill", "run", "sweep", "report", "export"]
)
def test_help_of_every_command(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage: tasprune " + command in out and "--quiet" in out


@pytest.mark.slow
def test_train_search_distill_end_to_end(tmp_path: Path) -> None:
    t, s, d = tmp_path / "teacher", tmp_path / "search", tmp_path / "student"
    assert (
        main(["train", "--model", "cifar_resnet20", "--epochs", "1", *TINY, "--out", str(t)]) == 0
    )
    assert (t / "model.pt").is_file() and (t / "config.yaml").is_file()
    assert tasprune.load_recipe(t / "config.yaml").teacher.train.epochs == 1
    args = ["--flops-ratio", "0.5", "--epochs", "1", "--set", "search.valid_batches=1"]
    assert (
        main(
            [
                "search",
                "--model",
                "cifar_resnet20",
                *args,
                "--teacher",
                str(t),
                *TINY,
                "--out",
                str(s),
            ]
        )
        == 0
    )
    info = json.loads((s / "shape.json").read_text())
    assert info["input_size"] == [1, 28, 28]
    assert (
        main(
            [
                "distill",
                "--shape",
                str(s / "shape.json"),
                "--teacher",
                str(t),
                "--epochs",
                "1",
                *TINY,
                "--out",
                str(d),
            ]
        )
        == 0
    )
    model = tasprune.load(d)
    assert sum(p.numel() for p in model.parameters()) == info["params"]
    assert Shape.from_dict(
        json.loads((d / "final.json").read_text())["meta"]["shape"]
    ) == Shape.from_dict(info)


def test_bench_forwards_its_arguments(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import tasprune.bench

    seen: list[tuple[list[str], str]] = []

    def fake(argv: list[str], prog: str = "") -> int:
        seen.append((list(argv), prog))
        return 0

    monkeypatch.setattr(tasprune.bench, "main", fake)
    assert main(["bench", "proto", "--quick", "-h"]) == 0
    assert seen == [(["proto", "--quick", "-h"], "tasprune bench")]


# --------------------------------------------------------------------------- generated flags


def _commands() -> dict[str, argparse.ArgumentParser]:
    """Each command's generated parser."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _flag_actions(p: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in p._actions if not isinstance(a, argparse._HelpAction)]


def _schema(tag: str, name: str) -> type[BaseModel]:
    return Recipe if tag == RECIPE else COMMANDS[name].inputs


def _sample(action: argparse.Action) -> list[str]:
    """Command-line words giving ``action`` a valid value."""
    if isinstance(action, argparse._StoreConstAction):
        return []
    if action.choices:
        word = str(next(iter(action.choices)))
    elif action.metavar == "{on,off}":
        word = "off"
    elif action.type is int:
        word = "12"
    elif action.type is float:
        word = "0.5"
    else:
        word = "a=1" if action.metavar == "KEY=VALUE" else "x"
    return [word] * (action.nargs if isinstance(action.nargs, int) else 1)


def _required(p: argparse.ArgumentParser, but: argparse.Action | None = None) -> list[str]:
    """Words giving every required flag and positional of ``p`` (but ``but``) a value."""
    words: list[str] = []
    for a in _flag_actions(p):
        if a is not but and (a.required or not a.option_strings) and a.nargs != argparse.REMAINDER:
            words += [*a.option_strings[-1:], *_sample(a)]
    return words


def _leaves(d: dict[str, object], prefix: str = "") -> set[str]:
    out: set[str] = set()
    for k, v in d.items():
        out |= _leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k}
    return out


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_flag_sets_exactly_one_field(name: str) -> None:
    """A flag's dest names one field of the recipe or of the command's inputs, nothing is
    stored for a flag not given (so the field's default applies), and giving the flag sets
    that field's key and no other."""
    p = _commands()[name]
    required = _given_keys(p, _required(p))
    for action in _flag_actions(p):
        tag, _, key = action.dest.partition(":")
        assert tag in (RECIPE, INPUTS), action.dest
        ref = field_at(_schema(tag, name), key)  # raises when the key names no field
        assert action.help and (ref.info.description or "") in action.help
        if action.option_strings and not action.required:
            assert action.default is argparse.SUPPRESS, action.dest
        if not action.option_strings:  # a positional: always given
            continue
        words = [*_required(p, action), *action.option_strings[-1:], *_sample(action)]
        assert _given_keys(p, words) == required | {action.dest}


def _given_keys(p: argparse.ArgumentParser, words: list[str]) -> set[str]:
    """``TAG:key`` of every field the words give a value."""
    ns = p.parse_args(words)
    return {f"{t}:{k}" for t in (RECIPE, INPUTS) for k in _leaves(given(ns, t))}


def _at(obj: object, key: str) -> object:
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("name", list(COMMANDS))
def test_flag_defaults_are_the_configs(name: str) -> None:
    """The default a recipe flag's help quotes is the built-in recipe's, and a command given
    only its required flags gets the built-in recipe."""
    p = _commands()[name]
    defaults = Recipe()
    for action in _flag_actions(p):
        tag, _, key = action.dest.partition(":")
        value = _at(defaults, key) if tag == RECIPE else None
        assert action.help is not None
        if tag == RECIPE and value is not None and not action.required:
            if isinstance(action, argparse._StoreConstAction):
                assert action.const is not value and f"{key}: " in action.help
            else:
                assert f"[{key}; default {value}]" in action.help, action.help
    ns = p.parse_args(_required(p))
    flags = given(ns, RECIPE)
    assert set(flags) <= {"model"}  # space and latency-table require --model
    assert Inputs().assemble(flags) == Recipe(**flags)


def test_flags_that_are_renamed_or_command_specific_map_to_one_key() -> None:
    def flags(*argv: str) -> dict[str, object]:
        return given(build_parser().parse_args(list(argv)), RECIPE)

    stage = ["--out", "o"]
    assert flags("train", *stage, "--data", "cifar10", "--data-root", "/d", "--flip", "off") == {
        "data": {"name": "cifar10", "root": "/d", "augment": {"flip": False}}
    }
    assert flags("train", *stage, "--epochs", "3") == {"teacher": {"train": {"epochs": 3}}}
    assert flags("search", *stage, "--epochs", "3") == {"search": {"epochs": 3}}
    assert flags("distill", *stage, "--shape", "s", "--teacher", "t", "--epochs", "3") == {
        "distill": {"train": {"epochs": 3}}
    }
    assert flags("space", "--model", "m", "--per-block") == {
        "model": "m",
        "search": {"tie_residual": False},
    }
    table = flags("latency-table", "--model", "m", "--backend", "eager", "--batch", "2")
    assert table == {"model": "m", "search": {"latency_runtime": "eager", "latency_batch": 2}}
    # --deterministic sets the one recipe key; the recipe switches every stage's on.
    det = flags("run", "r.yaml", *stage, "--deterministic")
    assert det == {"deterministic": True}
    recipe = Inputs().assemble(det)
    assert recipe.teacher.train.deterministic and recipe.search.deterministic
    assert recipe.distill.train.deterministic


def test_a_bad_flag_value_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:  # argparse: the type
        main(["flops", "--model", "cifar_resnet20", "--num-classes", "ten"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "--num-classes" in err[0]
    # pydantic: the field's constraint, named by its flag
    code = main(["latency-table", "--model", "cifar_resnet20", "--num-classes", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: --num-classes 0")
    assert "Fix:" in err[0]


def test_version_is_the_package_metadata(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"tasprune {metadata.version('tasprune')}"
