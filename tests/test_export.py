"""Exports of a pruned network reproduce its PyTorch outputs: ONNX, TorchScript, safetensors."""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import tasprune
from tasprune.checkpoint import save_checkpoint
from tasprune.contract import FORMAT_VERSION, InputContract, InputError
from tasprune.errors import TaspruneError
from tasprune.export import export_model, load_exportable, load_safetensors
from tasprune.latency import measure_latency, measure_onnx_latency
from tasprune.models import create_model, get_model_spec
from tasprune.shape import Shape

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = "cifar_resnet20"
INPUT = (1, 28, 28)


def pruned_shape() -> Shape:
    """Uneven widths (projection shortcuts everywhere) and a removed block in two stages."""
    full = get_model_spec(MODEL).full_shape()
    widths = {
        k: max(1, (v * 5) // 8) if i % 3 else v for i, (k, v) in enumerate(full.widths.items())
    }
    return full.replace(widths=widths, depths={"layer1.0": 2, "layer2.0": 1, "layer3.0": 3})


def randomise_bn(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial BN statistics, so an export that ran BN in train mode would not match."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model


def write_model(
    path: Path, shape: Shape | None, role: str, seed: int = 0
) -> tuple[nn.Module, dict[str, object]]:
    torch.manual_seed(seed)
    model = randomise_bn(create_model(MODEL, shape, num_classes=10, in_channels=1), seed)
    meta = {
        "model": MODEL,
        "shape": (shape or get_model_spec(MODEL).full_shape()).to_dict(),
        "num_classes": 10,
        "in_channels": 1,
        "input_size": list(INPUT),
        "dataset": "fashion-mnist",
        "role": role,
        "recipe": {"model": MODEL},
        "format_version": FORMAT_VERSION,
        "input": InputContract(*INPUT, mean=(0.25,), std=(0.5,)).to_dict(),
    }
    save_checkpoint(path, {"model": model.state_dict(), "meta": meta})
    return model.eval(), meta


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    write_model(out / "teacher" / "model.pt", None, "teacher", seed=1)
    write_model(out / "student" / "model.pt", pruned_shape(), "student", seed=2)
    return out


def batch(n: int = 8, seed: int = 3) -> torch.Tensor:
    """Raw images (float in [0, 1]): what the loaded and the exported networks take."""
    return torch.rand(n, *INPUT, generator=torch.Generator().manual_seed(seed))


def reference(run_dir: Path, sub: str = "student") -> nn.Module:
    """What ``tasprune.load`` gives: the network behind its input normalisation."""
    return tasprune.load(run_dir / sub / "model.pt")


def test_loaded_model_normalises_inside(run_dir: Path) -> None:
    bare, _, _ = load_exportable(run_dir / "student" / "model.pt")
    loaded = reference(run_dir)
    x = batch()
    with torch.no_grad():
        assert torch.allclose(loaded(x), bare((x - 0.25) / 0.5), atol=1e-6)
        # uint8 pixels are the same images
        assert torch.allclose(loaded((x * 255).round().to(torch.uint8)), loaded(x), atol=1e-3)
    assert set(loaded.state_dict()) == {f"net.{k}" for k in bare.state_dict()}


def test_exports_state_the_contract(run_dir: Path, tmp_path: Path) -> None:
    import onnx

    onnx_file = export_model(run_dir, "onnx", tmp_path)
    props = {p.key: p.value for p in onnx.load(str(onnx_file)).metadata_props}
    meta = json.loads(props["tasprune_meta"])
    assert meta["input"]["mean"] == [0.25] and meta["input"]["std"] == [0.5]
    assert meta["format_version"] == FORMAT_VERSION and meta["model"] == MODEL
    ts_file = export_model(run_dir, "torchscript", tmp_path / "net.pt")
    extra = {"tasprune_meta.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.load(str(ts_file), _extra_files=extra)
    assert json.loads(extra["tasprune_meta.json"])["input"]["height"] == INPUT[1]


def test_wrong_input_is_one_clear_error(run_dir: Path) -> None:
    loaded = reference(run_dir)
    for bad, words in (
        (torch.rand(2, 3, 28, 28), "N x 1 x 28 x 28"),
        (torch.rand(2, 1, 32, 32), "resize to 28x28"),
        (torch.randn(2, 1, 28, 28) * 3, "raw images"),
    ):
        with pytest.raises(InputError, match="Fix:") as info:
            loaded(bad)
        assert words in str(info.value) and "\n" not in str(info.value)


def test_checkpoint_without_contract_loads_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model, meta = write_model(tmp_path / "old" / "model.pt", pruned_shape(), "student")
    old = {k: v for k, v in meta.items() if k not in ("input", "format_version")}
    save_checkpoint(tmp_path / "old" / "model.pt", {"model": model.state_dict(), "meta": old})
    with caplog.at_level("WARNING"):
        loaded = tasprune.load(tmp_path / "old")
    assert "before tasprune recorded input contracts" in caplog.text
    assert "fashion-mnist" in caplog.text  # a shipped dataset: its published statistics
    assert loaded.contract.mean == (0.2860,) and loaded.contract.std == (0.3530,)


def test_onnx_matches_pytorch_with_dynamic_batch(run_dir: Path) -> None:
    import onnxruntime as ort

    path = export_model(run_dir, "onnx")
    assert path == run_dir / "export" / "pruned.onnx"
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    model = reference(run_dir)
    for n in (1, 8):  # exported at batch 2: other sizes prove the batch axis is dynamic
        x = batch(n)
        got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        with torch.no_grad():
            want = model(x).numpy()
        assert got.shape == (n, 10)
        assert np.abs(got - want).max() <= 1e-4


def test_onnx_of_teacher_file_gets_teacher_name(run_dir: Path, tmp_path: Path) -> None:
    path = export_model(run_dir / "teacher" / "model.pt", "onnx", tmp_path)
    assert path == tmp_path / "teacher.onnx"
    assert path.stat().st_size > 0


def test_torchscript_matches_pytorch(run_dir: Path, tmp_path: Path) -> None:
    path = export_model(run_dir, "torchscript", tmp_path / "net.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated
        traced = torch.jit.load(io.BytesIO(path.read_bytes()))
    x = batch(5)
    with torch.no_grad():
        assert torch.allclose(traced(x), reference(run_dir)(x), atol=1e-5, rtol=0)


def test_safetensors_round_trip_without_pickle(run_dir: Path, tmp_path: Path) -> None:
    path = export_model(run_dir, "safetensors", tmp_path / "pruned.safetensors")
    sidecar = json.loads((tmp_path / "pruned.json").read_text())
    assert sidecar["model"] == MODEL
    assert Shape.from_dict(sidecar["shape"]) == pruned_shape()
    assert sidecar["input_size"] == list(INPUT) and "recipe" not in sidecar
    rebuilt = load_safetensors(path)
    x = batch()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), reference(run_dir)(x))
    # The header holds the meta too: the file alone still rebuilds the network.
    (tmp_path / "pruned.json").unlink()
    with torch.no_grad():
        assert torch.equal(load_safetensors(path)(x), reference(run_dir)(x))


def test_missing_model_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "teacher").mkdir()
    with pytest.raises(TaspruneError, match="Fix:") as info:
        export_model(tmp_path, "onnx")
    assert "model.pt" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(TaspruneError, match="Fix:"):
        export_model(tmp_path / "nope" / "model.pt", "safetensors")
    assert not (tmp_path / "export").exists()


def test_unknown_format_is_refused(run_dir: Path) -> None:
    with pytest.raises(TaspruneError, match="Fix: use one of onnx"):
        export_model(run_dir, "tflite")  # type: ignore[arg-type]


def test_latency_measurements(run_dir: Path) -> None:
    model = reference(run_dir)
    model.train()
    stats = measure_latency(model, INPUT, 2, repeats=3, warmup=1, threads=1)
    assert model.training  # mode restored
    assert set(stats) >= {"median_ms", "p10_ms", "p90_ms", "batch"} and stats["batch"] == 2
    assert 0 < stats["p10_ms"] <= stats["median_ms"] <= stats["p90_ms"]
    onnx_file = export_model(run_dir, "onnx")
    ort_stats = measure_onnx_latency(onnx_file, INPUT, 2, repeats=3, warmup=1)
    assert ort_stats["median_ms"] > 0 and ort_stats["batch"] == 2
    with pytest.raises(TaspruneError, match="Fix:"):
        measure_latency(model, INPUT, 0)
