"""bench/bench_coverage.py's pieces that decide pass or fail: the output comparison, the
trained-like weights that make a wrong copy show, and totals that count only whole-path
entries. (The sweep itself runs models for minutes; it is not run here.)"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from torch import nn

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "bench_coverage.py"


@pytest.fixture(scope="module")
def cov() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_coverage", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compare_is_exact_or_within_a_few_ulps(cov: ModuleType) -> None:
    ref = torch.tensor([[1.0, -20.0, 3.0]])
    check = cov.Check()
    check.diff(ref.clone(), ref)
    assert check.detail == "exact"
    check.diff(ref + 2e-6, ref)  # up to 20 x 1e-6 allowed at this scale
    assert check.detail not in (None, "exact")
    for bad in (ref + 1e-3, ref * float("nan"), ref[:, :2]):
        with pytest.raises(RuntimeError):
            check.diff(bad, ref)


def test_trained_weights_make_a_wrong_copy_show(cov: ModuleType) -> None:
    torch.manual_seed(0)
    conv, bn, fc = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Linear(8, 4)
    net = nn.Sequential(conv, bn, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), fc)
    nn.init.zeros_(fc.bias)
    cov.give_trained_weights(net, side=8)
    assert not net.training
    assert bn.running_mean is not None and bn.running_var is not None and conv.bias is not None
    for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var, fc.bias, conv.bias):
        assert float(t.min()) != float(t.max())  # no two channels alike
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = net(x)
        bn.running_var[[0, 1]] = bn.running_var[[1, 0]].clone()  # a wrong copy
        with pytest.raises(RuntimeError):
            cov.Check().diff(net(x), ref)


def _entry(status: str, checks: dict[str, str] | None) -> dict[str, Any]:
    r: dict[str, Any] = {"status": status, "seconds": 1.0}
    if checks is not None:
        r["checks"] = checks
    return r


def test_totals_count_only_whole_path_passes(cov: ModuleType) -> None:
    ok = dict.fromkeys(cov.CHECKS, "ok")
    results = {
        "torchvision:a": _entry("ok", {**ok, "report": "-"}),
        "torchvision:b": _entry("ok", None),  # recorded by the path-only version
        "torchvision:c": _entry("failed", {**ok, "checkpoint": "failed", "report": "-"}),
        "timm:d": _entry("ok", ok),
    }
    text = cov.summary(results)
    assert "torchvision: 1 of 3 pass every check" in text
    assert "1 recorded without the whole-path checks" in text
    assert "timm: 1 of 1 pass every check" in text
    rows = cov.table(results).splitlines()
    assert len(rows) == 2 + len(results)
    assert "old (path only)" in rows[3]
    assert rows[0].count("|") == rows[2].count("|")  # one column per check
