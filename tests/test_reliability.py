"""Reliability: runs killed at any moment lose nothing, one writer per folder, safe loading,
determinism.

The crash test SIGKILLs a real ``python -m tasprune run`` at moments spread over every stage
(found by polling the run folder), reruns the same command each time, and checks that the
result is bit-identical to an uninterrupted run of the same recipe.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import tasprune
import tasprune.stages as stages_mod  # `tasprune train` trains through stages.fit
from tasprune.checkpoint import load_checkpoint, prev_path
from tasprune.cli import main
from tasprune.errors import CheckpointError, RunInUseError
from tasprune.lock import LOCK_NAME, lock_holder, run_lock

pytestmark = pytest.mark.usefixtures("one_thread")

SRC = str(Path(__file__).resolve().parents[1] / "src")
STAGE_MARKERS = (
    ("teacher", "teacher/final.json"),
    ("search", "search/search_done.json"),
    ("distill", "student/final.json"),
    ("report", "report.json"),
)
# A tiny recipe: every stage runs 2 epochs on 128 Fashion-MNIST images (seconds each on CPU).
TINY_RECIPE = """\
name: crash
model: cifar_resnet20
device: cpu
seed: 0
data: {name: fashion-mnist, train_subset: 128, test_subset: 32}
teacher: {train: {epochs: 2, batch_size: 32}}
search: {epochs: 2, batch_size: 32, valid_batches: 1}
distill: {init: teacher, train: {epochs: 2, batch_size: 32}}
report: {latency_batches: [1], latency_repeats: 1, int8: false}
"""


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("TASPRUNE_DEBUG", None)
    env["TASPRUNE_NO_PROGRESS"] = "1"
    # One intra-op thread: the machine's cores are shared, and every process of a comparison
    # must use the same thread count for bit-identical float reductions.
    env["OMP_NUM_THREADS"] = "1"
    return env


def _tasprune(*args: str) -> list[str]:
    return [sys.executable, "-m", "tasprune", *args]


def _start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    fh = log.open("ab")
    return subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, env=_env())


def _rows(path: Path) -> int:
    try:
        return sum(1 for line in path.read_text().splitlines() if line.strip())
    except OSError:
        return 0


def _stage_in_progress(out: Path) -> str | None:
    for stage, marker in STAGE_MARKERS:
        if not (out / marker).is_file():
            return stage
    return None


def _metrics(out: Path) -> dict[str, Any]:
    """Everything that must be bit-identical between two deterministic runs."""
    report = json.loads((out / "report.json").read_text())
    keep = ("top1", "top5", "flops", "params", "shape")
    return {
        "shape": json.loads((out / "search" / "shape.json").read_text()),
        "teacher_final": json.loads((out / "teacher" / "final.json").read_text())["metrics"],
        "student_final": json.loads((out / "student" / "final.json").read_text())["metrics"],
        "report": {role: {k: report[role][k] for k in keep} for role in ("teacher", "pruned")},
    }


def _assert_same_weights(a: Path, b: Path) -> None:
    sa, sb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{a} and {b} differ in {k}"


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "tiny.yaml"
    path.write_text(TINY_RECIPE)
    return path


@pytest.fixture(scope="module")
def reference_run(recipe_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted deterministic run of the tiny recipe, in a real process."""
    out = tmp_path_factory.mktemp("ref") / "run"
    proc = subprocess.run(
        _tasprune("run", str(recipe_file), "--out", str(out), "--deterministic", "-q"),
        capture_output=True,
        text=True,
        env=_env(),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    return out


# --------------------------------------------------------------------------- crash safety


@dataclass
class KillPoint:
    """SIGKILL the run once ``ready(out)`` holds (plus ``delay`` seconds)."""

    name: str
    ready: Callable[[Path], bool]
    delay: float = 0.0


KILL_POINTS = [
    KillPoint("teacher starting", lambda o: (o / "recipe.yaml").is_file(), 0.3),
    KillPoint("teacher epoch 0 logged", lambda o: _rows(o / "teacher/history.jsonl") >= 1),
    KillPoint("teacher epoch 1 logged", lambda o: _rows(o / "teacher/history.jsonl") >= 2),
    KillPoint("search starting", lambda o: (o / "search").is_dir(), 0.2),
    KillPoint("search epoch 0 logged", lambda o: _rows(o / "search/history.jsonl") >= 1),
    KillPoint("search epoch 1 logged", lambda o: _rows(o / "search/history.jsonl") >= 2),
    KillPoint("distill starting", lambda o: (o / "student").is_dir(), 0.2),
    KillPoint("distill epoch 0 logged", lambda o: _rows(o / "student/history.jsonl") >= 1),
    KillPoint("distill epoch 1 logged", lambda o: _rows(o / "student/history.jsonl") >= 2),
    KillPoint("report starting", lambda o: (o / "student/final.json").is_file()),
    KillPoint("report plotting", lambda o: (o / "plots").is_dir() or (o / "report.md").exists()),
]


@pytest.mark.slow
def test_killed_run_resumes_bit_identical(
    recipe_file: Path, reference_run: Path, tmp_path: Path
) -> None:
    """>= 10 SIGKILLs over all four stages; each time the same command is rerun; the final
    result equals the uninterrupted run's (shape, accuracies, weights)."""
    out = tmp_path / "run"
    log = tmp_path / "runs.log"
    cmd = _tasprune("run", str(recipe_file), "--out", str(out), "--deterministic", "-q")
    killed: list[tuple[str, str]] = []  # (kill point, stage in progress)
    for point in KILL_POINTS:
        proc = _start(cmd, log)
        deadline = time.monotonic() + 300
        while proc.poll() is None and not point.ready(out) and time.monotonic() < deadline:
            time.sleep(0.02)
        if proc.poll() is None and point.delay:
            time.sleep(point.delay)
        if proc.poll() is None:
            stage = _stage_in_progress(out)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
            killed.append((point.name, str(stage)))
        else:
            assert proc.returncode == 0, log.read_text()[-3000:]
            break
    final = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert final.returncode == 0, final.stderr + log.read_text()[-3000:]

    stages = {stage for _, stage in killed}
    assert len(killed) >= 10, killed
    assert stages >= {"teacher", "search", "distill", "report"}, killed

    assert _metrics(out) == _metrics(reference_run)
    for sub in ("teacher/model.pt", "student/model.pt", "search/supernet.pt"):
        _assert_same_weights(out / sub, reference_run / sub)
    for sub in ("teacher", "search", "student"):
        epochs = [json.loads(r)["epoch"] for r in (out / sub / "history.jsonl").open()]
        assert epochs == [0, 1], f"{sub}/history.jsonl: {epochs}"
    assert not list(out.rglob("*.tmp")), "temp files of killed writers were left behind"
    assert not (out / LOCK_NAME).exists()


def test_deterministic_runs_are_bit_identical(
    recipe_file: Path, reference_run: Path, tmp_path: Path
) -> None:
    """A second uninterrupted process gives the same bytes: shape.json, every weight."""
    out = tmp_path / "again"
    args = ["run", str(recipe_file), "--out", str(out), "--deterministic", "-q"]
    proc = subprocess.run(_tasprune(*args), capture_output=True, text=True, env=_env())
    assert proc.returncode == 0, proc.stderr
    assert (out / "search/shape.json").read_bytes() == (
        reference_run / "search/shape.json"
    ).read_bytes()
    _assert_same_weights(out / "student/model.pt", reference_run / "student/model.pt")
    _assert_same_weights(out / "teacher/model.pt", reference_run / "teacher/model.pt")
    assert _metrics(out) == _metrics(reference_run)


# --------------------------------------------------------------------------- corrupt checkpoint


def test_truncated_checkpoint_falls_back_to_the_previous_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A run stopped after epoch 1 of 3 whose newest checkpoint is then truncated: the rerun
    warns, resumes from the previous good checkpoint (epoch 0) and finishes."""
    out = tmp_path / "t"
    args = ["train", "--model", "cifar_resnet20", "--epochs", "3", "--data", "fashion-mnist"]
    args += ["--train-subset", "64", "--test-subset", "32", "--batch-size", "32"]
    args += ["--device", "cpu", "--out", str(out)]
    real_fit = stages_mod.fit

    def stop_after_epoch_1(*a: Any, **kw: Any) -> Any:
        def stop(epoch: int, row: dict[str, Any]) -> None:
            if epoch == 1:
                raise KeyboardInterrupt

        return real_fit(*a, **kw, on_epoch_end=stop)

    monkeypatch.setattr(stages_mod, "fit", stop_after_epoch_1)
    assert main(args) == 130
    ckpt = out / "checkpoint.pt"
    assert load_checkpoint(ckpt)["epoch"] == 1 and prev_path(ckpt).is_file()
    first_row = (out / "history.jsonl").read_text().splitlines()[0]
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])  # torn mid-write, by a full disk or a crash

    monkeypatch.setattr(stages_mod, "fit", real_fit)
    with caplog.at_level(logging.INFO, logger="tasprune"):
        assert main(args) == 0
    messages = [r.getMessage() for r in caplog.records]
    assert any(
        r.levelno == logging.WARNING and "falling back" in r.getMessage() for r in caplog.records
    )
    assert any("epoch 0 of 3 done" in m for m in messages), messages
    rows = (out / "history.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == [0, 1, 2]
    assert rows[0] == first_row  # epoch 0 was kept (resumed), not trained again
    assert json.loads((out / "final.json").read_text())["epochs"] == 3


# --------------------------------------------------------------------------- one writer


HOLDER = """
import sys, time
from tasprune.lock import run_lock
with run_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file()
    }


def test_second_writer_is_refused_and_a_stale_lock_does_not_block(
    recipe_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "busy"
    out.mkdir()
    (out / "recipe.yaml").write_text(TINY_RECIPE)  # earlier output that must stay untouched
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True, env=_env()
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        before = _snapshot(out)
        t0 = time.monotonic()
        proc = subprocess.run(
            _tasprune("run", str(recipe_file), "--out", str(out), "-q"),
            capture_output=True,
            text=True,
            env=_env(),
            timeout=120,
        )
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        assert lines[0].startswith(f"error: run folder {out} is in use by pid {holder.pid}")
        assert "Fix: wait for it to finish or use another --out" in lines[0]
        assert time.monotonic() - t0 < 60  # refused at once, not after waiting
        assert _snapshot(out) == before  # wrote nothing
        with pytest.raises(RunInUseError, match=f"pid {holder.pid}"), run_lock(out):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    # The killed holder left its lock file behind; the kernel dropped its flock.
    assert (out / LOCK_NAME).is_file() and lock_holder(out)["pid"] == holder.pid  # type: ignore[index]
    with run_lock(out):
        assert lock_holder(out)["pid"] == os.getpid()  # type: ignore[index]
    assert not (out / LOCK_NAME).exists()
    before.pop(LOCK_NAME)
    assert _snapshot(out) == before  # the stale lock file is gone, the rest untouched


def test_lock_is_reentrant_in_one_process(tmp_path: Path) -> None:
    with run_lock(tmp_path / "x"), run_lock(tmp_path / "x"):
        assert (tmp_path / "x" / LOCK_NAME).is_file()
    assert not (tmp_path / "x").exists()  # created by the lock, empty: removed again


# --------------------------------------------------------------------------- safe loading


class _Malicious:
    """Unpickling this object would create ``marker`` (a stand-in for any code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (builtins.open, (self.marker, "w"))


def _plant(path: Path, marker: Path) -> None:
    torch.save({"model": _Malicious(marker), "meta": {"model": "cifar_resnet20"}}, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    (path.parent / (path.name + ".sha256")).write_text(f"{digest}  {path.name}\n")


def test_malicious_checkpoint_is_never_executed(
    reference_run: Path, recipe_file: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(reference_run, run_dir)
    marker = tmp_path / "PWNED"
    for sub in ("teacher", "student"):
        for f in (run_dir / sub).glob("model*.pt*"):
            f.unlink()
        _plant(run_dir / sub / "model.pt", marker)
    (run_dir / "report.json").unlink()  # the report stage must load both networks again

    for args in (
        ["run", str(recipe_file), "--out", str(run_dir), "--deterministic", "-q"],
        ["report", str(run_dir), "-q"],
        ["export", str(run_dir), "--format", "safetensors"],
    ):
        proc = subprocess.run(_tasprune(*args), capture_output=True, text=True, env=_env())
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, (args, proc.stderr)
        assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
        assert "refused for safety" in lines[0] and "Traceback" not in proc.stderr
        assert not marker.exists()
    for target in (run_dir, run_dir / "teacher" / "model.pt"):
        with pytest.raises(CheckpointError, match="refused for safety"):
            tasprune.load(target)
    assert not marker.exists()
