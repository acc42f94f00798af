"""The shipped examples run end to end on tiny data (what a user copies must work)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import needs_fashion_mnist

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, cache: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``python examples/SCRIPT ARGS`` from the clone's root, one thread (a canvas set, when
    built, goes to ``cache``); asserts it exits 0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if cache is not None:
        env["TASPRUNE_CACHE"] = str(cache)
    out = subprocess.run(
        [sys.executable, f"examples/{script}", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out


@needs_fashion_mnist
@pytest.mark.slow
def test_own_loop_example(tmp_path: Path) -> None:
    out = _run("own_loop.py", "--images", "600", "--epochs", "1", "--out", str(tmp_path))
    assert "rebuilt from a fresh SmallNet: outputs equal" in out.stdout
    assert (tmp_path / "shape.json").is_file() and (tmp_path / "student.pt").is_file()


@needs_fashion_mnist
@pytest.mark.slow
@pytest.mark.parametrize(("example", "metric"), [("detection", "map"), ("segmentation", "miou")])
def test_task_examples(tmp_path: Path, example: str, metric: str) -> None:
    """The torchvision detector (SSDlite) and segmenter (LRASPP) examples on a few canvases:
    searched and pruned inside the band (counted FLOPs), rebuilt from a fresh original with
    equal outputs, exported to ONNX with parity, scored by COCO's mAP or mIoU."""
    import json

    _run(f"{example}.py", "--tiny", "--out", str(tmp_path / "run"), cache=tmp_path / "cache")
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert 0.45 <= report["flops_ratio"] <= 0.5
    assert report["reload_equal"] is True and report["onnx_max_abs_diff"] < 1e-4
    assert 0 <= report["student"]["test"][metric] <= 1


@needs_fashion_mnist
@pytest.mark.slow
def test_yolo_example(tmp_path: Path) -> None:
    """YOLOv8n inside the Ultralytics trainer on a few canvases: searched and pruned inside
    the band (counted FLOPs), fine-tuned with Ultralytics' distillation and validated by its
    val, rebuilt from a fresh YOLOv8n with equal outputs, exported by Ultralytics with ONNX
    Runtime parity."""
    import json

    pytest.importorskip("ultralytics")
    _run("yolo.py", "--tiny", "--out", str(tmp_path / "run"), cache=tmp_path / "cache")
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert 0.45 <= report["flops_ratio"] <= 0.5
    assert report["reload_equal"] is True and report["onnx_max_abs_diff"] < 1e-3
    assert 0 <= report["student"]["test_map"] <= 1
