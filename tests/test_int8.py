"""int8 ONNX export: ONNX Runtime's QDQ quantisation of a briefly trained tiny net, calibrated
and checked on real Fashion-MNIST images; refusals are one line and leave files untouched."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import tasprune
import tasprune.int8
from conftest import needs_fashion_mnist
from tasprune.checkpoint import load_checkpoint, save_checkpoint
from tasprune.cli import main
from tasprune.datasets import load_dataset
from tasprune.errors import ConfigError, DataError, ExportError
from tasprune.export import META, export_model
from tasprune.models import get_model_spec

pytestmark = [needs_fashion_mnist, pytest.mark.usefixtures("one_thread")]

MODEL = "cifar_resnet20"
CALIBRATION = 100  # images: enough for these tests, a third of the default


def _session(path: Path) -> object:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder whose student (widths 6/12/24, one block per stage: the 6 and 12 are
    zero-padded to 8 and 16 by the export) is trained a few seconds on real images, so that
    its predictions mean something."""
    out = tmp_path_factory.mktemp("int8")
    full = get_model_spec(MODEL).full_shape()
    widths = {k: v * 3 // 8 for k, v in full.widths.items()}
    shape = full.replace(widths=widths, depths={k: 1 for k in full.depths})
    train = load_dataset("fashion-mnist", "train").subset(torch.arange(2000))
    test = load_dataset("fashion-mnist", "test").subset(torch.arange(200))
    cfg = {"epochs": 3, "batch_size": 50, "lr": 0.1, "warmup_epochs": 0}
    tasprune.train(
        MODEL, train, test, cfg, out / "student", shape=shape, device="cpu", progress=False
    )
    return out


@pytest.fixture(scope="module")
def exported(run_dir: Path) -> Path:
    return export_model(run_dir, "onnx", int8=True, calibration_images=CALIBRATION)


@pytest.fixture(scope="module")
def held_out() -> tuple[np.ndarray, np.ndarray]:
    """500 raw test images (float in [0, 1], what the graph takes) and their labels."""
    test = load_dataset("fashion-mnist", "test")
    idx = torch.arange(5000, 5500)
    return (test.images[idx].float() / 255).numpy(), test.labels[idx].numpy()


def test_int8_file_beside_fp32_is_quantised_per_channel(run_dir: Path, exported: Path) -> None:
    import onnx
    from onnx import numpy_helper

    assert exported == run_dir / "export" / "pruned.int8.onnx"
    assert (run_dir / "export" / "pruned.onnx").is_file()
    model = onnx.load(str(exported))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    weights = 0
    for node in model.graph.node:
        w = inits.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if w is None or w.ndim != 4:
            continue
        weights += 1
        scale = inits[node.input[1]]
        assert w.dtype == np.int8 and scale.shape == (w.shape[0],)  # one scale per out channel
        assert np.isfinite(scale).all() and (scale > 0).all()
        zero = np.abs(w).reshape(w.shape[0], -1).sum(1) == 0
        assert (scale[zero] == 1).all()  # a zero-padded filter gets scale 1, not 0
    assert weights >= 7  # every conv of the 3-block net (stem, 2 per block, 2 shortcuts)
    meta = json.loads(next(p.value for p in model.metadata_props if p.key == META))
    assert meta["model"] == MODEL and meta["input"]["mean"] == [0.286]
    assert meta["quantization"]["format"] == "QDQ"
    assert meta["quantization"]["check"]["agreement"] >= tasprune.int8.MIN_AGREEMENT


def test_padded_zero_channels_reach_the_int8_model(exported: Path) -> None:
    """The export padded 6 -> 8 channels: the int8 model holds those zero filters."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(exported))
    stem = [
        numpy_helper.to_array(t) for t in model.graph.initializer if tuple(t.dims)[1:] == (1, 3, 3)
    ]
    assert stem and stem[0].shape[0] == 8 and not stem[0][6:].any() and stem[0][:6].any()


def test_int8_predicts_like_fp32_on_real_images(
    exported: Path, held_out: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = held_out
    fp32 = _session(exported.with_name("pruned.onnx"))
    int8 = _session(exported)
    want = fp32.run(None, {"input": x})[0]  # type: ignore[attr-defined]
    got = int8.run(None, {"input": x})[0]  # type: ignore[attr-defined]
    assert got.shape == (len(x), 10) and np.isfinite(got).all()
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.9
    assert (want.argmax(1) == y).mean() > 0.4  # the tiny net learnt something to agree on
    assert abs((got.argmax(1) == y).mean() - (want.argmax(1) == y).mean()) <= 0.05


def test_missing_data_is_one_line_and_writes_nothing(run_dir: Path, tmp_path: Path) -> None:
    for root in (tmp_path / "absent", tmp_path):  # no such folder; a folder without the files
        with pytest.raises(DataError, match="Fix:") as info:
            export_model(run_dir, "onnx", tmp_path / "m.onnx", int8=True, data_root=root)
        assert "int8 calibration needs the train images of fashion-mnist" in str(info.value)
        assert "\n" not in str(info.value)
    assert not list(tmp_path.glob("*.onnx"))
    with pytest.raises(ConfigError, match="Fix: use --format onnx --int8"):
        export_model(run_dir, "torchscript", tmp_path / "m.pt", int8=True)
    with pytest.raises(ConfigError, match="not positive"):
        export_model(run_dir, "onnx", tmp_path / "m.onnx", int8=True, calibration_images=0)


def test_data_tasprune_cannot_read_is_given_as_images(run_dir: Path, tmp_path: Path) -> None:
    payload = load_checkpoint(run_dir / "student" / "model.pt")
    payload["meta"]["dataset"] = "imagenet"  # streamed: not for calibration
    save_checkpoint(tmp_path / "student" / "model.pt", payload)
    with pytest.raises(ConfigError, match="Fix: give export_model the training images") as info:
        export_model(tmp_path, "onnx", int8=True)
    assert "'imagenet'" in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "export").exists()
    images = load_dataset("fashion-mnist", "train").subset(torch.arange(400))
    path = export_model(tmp_path, "onnx", int8=True, calibration_images=200, data=images)
    assert path.is_file() and path.name == "pruned.int8.onnx"


def test_gross_failure_is_refused_and_nothing_is_overwritten(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Calibrated on pixel values 0-255 (a graph that takes 0-1): most classes change."""
    real = tasprune.int8.quantize
    monkeypatch.setattr(tasprune.int8, "quantize", lambda fp32, x: real(fp32, x * 255))
    fp32, int8 = tmp_path / "m.onnx", tmp_path / "m.int8.onnx"
    fp32.write_bytes(b"old fp32")
    int8.write_bytes(b"old int8")
    with pytest.raises(ExportError, match="below the 90%") as info:
        export_model(run_dir, "onnx", fp32, int8=True, calibration_images=CALIBRATION)
    assert "Fix:" in str(info.value) and "\n" not in str(info.value)
    assert fp32.read_bytes() == b"old fp32" and int8.read_bytes() == b"old int8"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.int8.onnx", "m.onnx"]


def test_cli_int8(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "net.onnx"
    argv = ["export", str(run_dir), "--int8", "--calibration-images", "50", "--out", str(out)]
    assert main([*argv, "-q"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "net.int8.onnx")
    assert out.is_file() and (tmp_path / "net.int8.onnx").is_file()
    code = main(["export", str(run_dir), "--int8", "--data-root", str(tmp_path / "absent")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "Fix:" in err[0] and "fashion-mnist" in err[0]
