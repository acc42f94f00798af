"""The user's contract: a saved model takes raw inputs, augmentation fits the data, no silent
data fallbacks, and runs that TensorBoard can show.

The three findings of a new user's first run are tests here: the loaded model was fed the
images given to ``train`` and scored far under tasprune's own figure (hidden normalisation);
the default augmentation shifted 8x8 images by half their size and mirrored them; a
``--data-root`` that does not exist silently trained on the system copy.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import tasprune
from conftest import needs_fashion_mnist
from tasprune.checkpoint import load_checkpoint
from tasprune.cli import main
from tasprune.data import Augment
from tasprune.datasets import load_dataset
from tasprune.errors import ConfigError
from tasprune.export import export_model, load_safetensors

pytestmark = needs_fashion_mnist


def small_grey(split: str, n: int) -> TensorDataset:
    """``n`` real Fashion-MNIST images shrunk to 8x8, as a user's own float tensors in [0, 1]
    (exact multiples of 1/255, as ``ToTensor`` gives), not a dataset tasprune knows."""
    ds = load_dataset("fashion-mnist", split)
    x = F.interpolate(ds.images[:n].float(), size=(8, 8), mode="area")
    x = x.round() / 255.0  # N x 1 x 8 x 8
    return TensorDataset(x, ds.labels[:n])


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean()) * 100


@pytest.fixture(scope="module")
def user_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, TensorDataset]:
    out = tmp_path_factory.mktemp("user") / "teacher"
    train, test = small_grey("train", 1200), small_grey("test", 600)
    torch.set_num_threads(1)
    metrics = tasprune.train(
        "cifar_resnet20",
        train,
        test,
        {"epochs": 2, "batch_size": 100, "lr": 0.05, "channels_last": "off"},
        out,
        device="cpu",
        progress=False,
    )
    return out, metrics, test


def test_loaded_and_exported_models_reproduce_accuracy_on_raw_tensors(
    user_run: tuple[Path, dict, TensorDataset], tmp_path: Path
) -> None:
    out, metrics, test = user_run
    x, y = test.tensors
    assert metrics["top1"] > 40  # it learned something, so a hidden normalisation would show
    loaded = tasprune.load(out)
    assert accuracy(loaded, x, y) == pytest.approx(metrics["top1"], abs=0.2)
    assert accuracy(loaded, (x * 255).round().to(torch.uint8), y) == pytest.approx(
        metrics["top1"], abs=0.2
    )
    import onnxruntime as ort

    onnx_file = export_model(out, "onnx", tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {"input": x.numpy()})[0]
    onnx_top1 = float(np.mean(logits.argmax(1) == y.numpy())) * 100
    assert onnx_top1 == pytest.approx(metrics["top1"], abs=0.2)
    st_file = export_model(out, "safetensors", tmp_path / "m.safetensors")
    assert accuracy(load_safetensors(st_file), x, y) == pytest.approx(metrics["top1"], abs=0.2)
    meta = json.loads((tmp_path / "m.json").read_text())
    assert meta["input"]["height"] == 8 and len(meta["input"]["mean"]) == 1


def test_default_augmentation_fits_the_data(user_run: tuple[Path, dict, TensorDataset]) -> None:
    out, _, _ = user_run
    meta = load_checkpoint(out / "model.pt")["meta"]
    # 8x8 grey images nobody declared mirror-invariant: 1 pixel of padding, no flip.
    assert meta["augment"] == {"crop_padding": 1, "flip": False}
    assert Augment().resolve("fashion-mnist", (28, 28)) == Augment(crop_padding=2, flip=True)
    assert Augment().resolve("cifar10", (32, 32)) == Augment(crop_padding=4, flip=True)
    assert Augment().resolve("custom", (64, 64)) == Augment(crop_padding=8, flip=False)
    assert Augment(flip=True).resolve("custom", (8, 8)) == Augment(crop_padding=1, flip=True)
    assert Augment(crop_padding=0).resolve("cifar10", (32, 32)).crop_padding == 0


def test_moved_recipe_keys_name_the_new_place() -> None:
    with pytest.raises(ConfigError, match="data.augment.crop_padding") as info:
        tasprune.load_recipe(None, {"data": {"crop_padding": 2}})
    assert "\n" not in str(info.value) and "Fix:" in str(info.value)


@pytest.mark.parametrize("make", [False, True], ids=["missing", "empty"])
def test_data_root_without_the_data_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make: bool
) -> None:
    root = tmp_path / "x"
    if make:
        root.mkdir()
    out = tmp_path / "out"
    code = main(
        ["train", "--data", "fashion-mnist", "--data-root", str(root), "--epochs", "1"]
        + ["--out", str(out), "--quiet"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error:") and "Fix:" in err[0]
    assert str(root) in err[0]
    assert ("does not exist" in err[0]) != make
    assert not out.exists()  # nothing written


def test_tensorboard_run_folder(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "r"
    code = main(
        [
            "run",
            str(Path(__file__).resolve().parents[1] / "configs" / "fmnist-r20-quick.yaml"),
            "--out",
            str(out),
            "--log",
            "tensorboard",
            "--quiet",
            "--device",
            "cpu",
        ]
        + [
            f"--set={kv}"
            for kv in (
                "data.train_subset=160",
                "data.test_subset=64",
                "teacher.train.epochs=2",
                "teacher.train.batch_size=64",
                "teacher.train.eval_every=1",
                "search.epochs=2",
                "search.batch_size=32",
                "search.valid_batches=1",
                "distill.train.epochs=1",
                "distill.train.batch_size=64",
                "report.latency_batches=[1]",
                "report.latency_repeats=1",
                "report.int8=false",
            )
        ]
    )
    assert code == 0

    def scalars(folder: Path) -> dict[str, list[float]]:
        acc = EventAccumulator(str(folder))
        acc.Reload()
        return {t: [e.value for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}

    teacher = scalars(out / "teacher" / "tensorboard")
    assert len(teacher["train_loss"]) == 2 and len(teacher["test_top1"]) == 2
    search = scalars(out / "search" / "tensorboard")
    for tag in ("flops_ratio", "entropy_mean", "tau"):
        assert len(search[tag]) == 2
    assert search["tau"][0] > search["tau"][1]  # annealed
    assert len(scalars(out / "student" / "tensorboard")["train_loss"]) == 1
    report = json.loads((out / "report.json").read_text())
    board = scalars(out / "tensorboard" / "report")
    assert board["pruned/top1"] == [pytest.approx(report["pruned"]["top1"])]
    assert board["pruned/flops_ratio"] == [pytest.approx(report["pruned"]["flops_ratio"])]
