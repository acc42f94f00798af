"""The shipped examples run end to end on tiny data (what a user copies must work)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import needs_fashion_mnist

ROOT = Path(__file__).resolve().parents[1]


@needs_fashion_mnist
@pytest.mark.slow
def test_own_loop_example(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [
            sys.executable,
            "examples/own_loop.py",
            "--images",
            "600",
            "--epochs",
            "1",
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "rebuilt from a fresh SmallNet: outputs equal" in out.stdout
    assert (tmp_path / "shape.json").is_file() and (tmp_path / "student.pt").is_file()
