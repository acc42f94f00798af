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
report: {latency_batches: [1], latency_repeats: 2}
"""


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
    assert first.returncode == 0, first.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    shape = json.loads((out / "search" / "shape.json").read_text())
    assert report["pruned"]["flops"] == shape["flops"]
    assert first.stdout.count("teacher") == 1  # the table is printed by rank 0 only
    assert not (out / ".lock").exists()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stderr.count("skipped") == 4  # rank 0 logs each finished stage as skipped
