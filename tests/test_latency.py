"""Latency timed in one place: the settings type, eager and ONNX Runtime, and the latency
table's whole-network timing going through the same entry point."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import tasprune.search.latency as search_latency
from tasprune.errors import ConfigError
from tasprune.latency import LatencySettings, measure
from tasprune.latency_table import TableKey
from user_nets import plain_net

pytestmark = pytest.mark.usefixtures("one_thread")

INPUT = (1, 12, 12)
KEYS = {"median_ms", "p10_ms", "p90_ms", "batch", "repeats"}


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return plain_net(num_classes=3, in_channels=1)


@pytest.mark.parametrize(
    ("field", "value"),
    [("runtime", "tflite"), ("batch", 0), ("threads", 0), ("repeats", 0), ("warmup", -1)],
)
def test_settings_refuse_a_bad_field_naming_it(field: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=field) as info:
        LatencySettings(**{field: value})
    assert "Fix:" in str(info.value)


def test_eager_timing_restores_mode_and_threads() -> None:
    net = tiny().train()
    before = torch.get_num_threads()
    stats = measure(net, INPUT, LatencySettings("eager", batch=2, threads=2, repeats=3, warmup=1))
    assert set(stats) == KEYS and stats["batch"] == 2 and stats["repeats"] == 3
    assert 0 < stats["p10_ms"] <= stats["median_ms"] <= stats["p90_ms"]
    assert net.training and torch.get_num_threads() == before


def test_onnx_timing_of_a_module_and_of_its_exported_file(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    net = tiny().eval()
    settings = LatencySettings("onnxruntime", batch=2, threads=1, repeats=3, warmup=1)
    in_memory = measure(net, INPUT, settings)
    assert set(in_memory) == KEYS and in_memory["median_ms"] > 0
    file = tmp_path / "tiny.onnx"
    torch.onnx.export(net, (torch.rand(2, *INPUT),), str(file), dynamo=False, input_names=["x"])
    from_file = measure(net, INPUT, settings, onnx_file=file)
    assert set(from_file) == KEYS and from_file["median_ms"] > 0


def test_the_table_times_whole_networks_through_the_one_entry_point(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The latency table's calibration (`measure_network`) is `latency.measure` at the
    table key's runtime, batch and threads."""
    seen: list[LatencySettings] = []

    def fake(model: nn.Module, size: tuple[int, int, int], s: LatencySettings) -> dict[str, Any]:
        seen.append(s)
        return {"median_ms": 1.5}

    monkeypatch.setattr(search_latency, "measure", fake)
    key = TableKey.here("eager", 1, 4)
    assert search_latency.measure_network(tiny(), key, INPUT, 7) == 1.5
    assert seen == [LatencySettings("eager", batch=4, threads=1, repeats=7, warmup=3)]
