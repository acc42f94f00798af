"""`tasprune run` under torchrun: 2 CPU processes on gloo run every stage end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

RECIPE = """
model: cifar_resnet20
device: cpu
data: {train_subset: 512, test_subset: 256}
teacher: {train: {epochs: 1, batch_size: 64}}
search: {epochs: 2, batch_size: 64, arch_lr: 0.1, valid_batches: 2}
distill: {init: teacher, train: {epochs: 1, batch_size: 64}}
report: {latency_batches: [1], latency_repeats: 2, int8: false}
"""


def _why(proc: subprocess.CompletedProcess[str]) -> str:
    """The lines of a failed torchrun that name the cause (a rank's error or a C++ abort),
    then the tail: the launcher's own summary alone does not say why a rank died."""
    keys = ("error", "terminate", "what()", "exception", "abort")
    cause = [x for x in proc.stderr.splitlines() if any(k in x.lower() for k in keys)]
    return "\n".join(cause[:20]) + "\n...\n" + proc.stderr[-1500:]


@pytest.mark.slow
def test_two_process_run_completes_and_resumes(tmp_path: Path) -> None:
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(RECIPE)
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "tasprune.cli",
        "run",
        str(recipe),
        "--out",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TASPRUNE_NO_PROGRESS": "1"}
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert first.returncode == 0, _why(first)
    report = json.loads((out / "report.json").read_text())
    shape = json.loads((out / "search" / "shape.json").read_text())
    assert report["pruned"]["flops"] == shape["flops"]
    assert first.stdout.count("teacher") == 1  # the table is printed by rank 0 only
    assert not (out / ".lock").exists()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0, _why(again)
    assert again.stderr.count("skipped") == 4  # rank 0 logs each finished stage as skipped


def _torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += ["--nproc-per-node", str(nproc), "-m", "tasprune.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TASPRUNE_NO_PROGRESS": "1"}
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow
def test_every_stage_command_runs_under_torchrun(tmp_path: Path) -> None:
    """train, search and distill each under 2 gloo processes: rank 0 alone locks and writes
    (no 'in use' refusal), the ranks agree, every epoch is logged once.

    The registered networks have BatchNorm, which normalises per rank on CPU (no SyncBatchNorm
    there), so a 2-rank run is not numerically a 1-rank run; the numerical match of DDP
    training is tested in test_distributed.py on a network without BatchNorm."""
    data = ["--data", "fashion-mnist", "--train-subset", "256", "--test-subset", "64"]
    data += ["--device", "cpu", "--batch-size", "64"]
    t, s, d = tmp_path / "t", tmp_path / "s", tmp_path / "d"
    r = _torchrun("train", "--model", "cifar_resnet20", "--epochs", "2", *data, "--out", str(t))
    assert r.returncode == 0, _why(r)
    assert r.stdout.count("model.pt: test top1") == 1  # printed by rank 0 only
    rows = [json.loads(x) for x in (t / "history.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [0, 1]
    r = _torchrun("search", "--model", "cifar_resnet20", "--flops-ratio", "0.5", "--epochs", "2",
                  "--arch-lr", "0.1", "--teacher", str(t), *data, "--out", str(s))  # fmt: skip
    assert r.returncode == 0, _why(r)
    shape = json.loads((s / "shape.json").read_text())
    assert shape["model"] == "cifar_resnet20" and shape["flops"] > 0
    r = _torchrun("distill", "--shape", str(s / "shape.json"), "--teacher", str(t),
                  "--epochs", "1", *data, "--out", str(d))  # fmt: skip
    assert r.returncode == 0, _why(r)
    final = json.loads((d / "final.json").read_text())
    assert final["meta"]["flops"] == shape["flops"]
    assert not any((p / ".lock").exists() for p in (t, s, d))
