"""Files written by tasprune 0.x (per-conv shape keys of the shipped networks) load, or fail
with one line naming the older version."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tasprune.checkpoint import load_model_checkpoint, save_checkpoint
from tasprune.cost import model_cost
from tasprune.errors import CheckpointError, ShapeError
from tasprune.models import create_model, get_model_spec
from tasprune.models.legacy import upgrade_shape
from tasprune.shape import Shape

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]


def old_r20(conv2: int = 16) -> dict:
    """A 0.x cifar_resnet20 shape: one width per conv block, one depth per container;
    ``conv2`` is layer1.1's output width (16: the stream's own)."""
    widths = {"stem": 16}
    for s, planes in enumerate((16, 32, 64), start=1):
        for j in range(3):
            widths[f"layer{s}.{j}.conv1"] = planes // 2
            widths[f"layer{s}.{j}.conv2"] = planes
    widths["layer1.1.conv2"] = conv2
    return {"widths": widths, "depths": {"layer1": 3, "layer2": 2, "layer3": 1}}


def test_an_old_shape_reads_in_todays_keys() -> None:
    new = upgrade_shape("cifar_resnet20", old_r20())
    full = get_model_spec("cifar_resnet20").full_shape()
    assert set(new.widths) == set(full.widths)
    assert new.widths["stem.conv"] == 16 and new.widths["layer2.1.conv1.conv"] == 16
    assert new.widths["layer2.0.conv2.conv"] == 32  # the stage's stream (with its projection)
    assert new.depths == {"layer1.0": 3, "layer2.0": 2, "layer3.0": 1}
    assert upgrade_shape("cifar_resnet20", new) == new  # today's keys: unchanged


def test_the_published_resnet50_shape_costs_what_its_file_says() -> None:
    """The reference's searched ResNet-50, written in 0.x keys with 0.x's FLOPs: read in
    today's keys it costs exactly those FLOPs."""
    data = json.loads((ROOT / "configs/shapes/resnet50-tas-imagenet.json").read_text())
    shape = upgrade_shape("resnet50", data)
    flops, _ = model_cost("resnet50", shape, (3, 224, 224), 1000)
    assert flops == data["flops"]


def test_a_key_of_no_version_is_left_for_validation_to_name() -> None:
    bad = old_r20()
    bad["widths"]["conv_nope"] = 3
    shape = upgrade_shape("cifar_resnet20", bad)  # not dropped silently: not upgraded at all
    assert "conv_nope" in shape.widths
    with pytest.raises(ShapeError, match="unknown widths"):
        shape.validate_against(get_model_spec("cifar_resnet20").full_shape(), "cifar_resnet20")


def test_two_widths_for_one_group_is_one_line() -> None:
    bad = old_r20()
    bad["widths"]["layer2.0.shortcut"] = 8  # writes the same group as layer2.0.conv2 (32)
    with pytest.raises(ShapeError, match="0.x") as err:
        upgrade_shape("cifar_resnet20", bad)
    assert len(str(err.value).splitlines()) == 1 and "Fix:" in str(err.value)


def test_the_committed_teachers_load() -> None:
    for name in ("fmnist-r20", "fmnist-r56"):
        net, meta = load_model_checkpoint(ROOT / "bench/teachers" / f"{name}.pt")
        model = str(meta["model"])
        assert Shape.from_dict(meta["shape"]) == get_model_spec(model).full_shape()
        assert net(torch.zeros(1, 1, 28, 28)).shape == (1, 10)


def test_an_old_pruned_checkpoint_with_other_shortcuts_is_one_line(tmp_path: Path) -> None:
    """0.x gave a block whose widths differ a pooled conv + BN shortcut; today's is a bare
    1x1 conv: such a checkpoint is refused naming the version, not as damaged."""
    old = old_r20(conv2=8)
    shape = upgrade_shape("cifar_resnet20", old)
    state = create_model("cifar_resnet20", shape, in_channels=1).state_dict()
    w = state.pop("layer1.1.shortcut.weight")
    state["layer1.1.shortcut.conv.weight"] = w
    state["layer1.1.shortcut.bn.weight"] = torch.ones(w.shape[0])
    meta = {"model": "cifar_resnet20", "shape": old, "num_classes": 10, "in_channels": 1}
    save_checkpoint(tmp_path / "model.pt", {"model": state, "meta": meta})
    with pytest.raises(CheckpointError, match="tasprune 0.x") as err:
        load_model_checkpoint(tmp_path / "model.pt")
    assert len(str(err.value).splitlines()) == 1 and "Fix:" in str(err.value)


def test_a_stream_that_had_one_width_gives_it_to_every_block() -> None:
    """Before each block's output could be its own choice, a traced shape had one width per
    residual stream (keyed by a layer writing it, e.g. the stage's projection)."""
    full = get_model_spec("cifar_resnet20").full_shape()
    widths = {k: v for k, v in full.widths.items() if not k.startswith("layer2.") or "conv1" in k}
    widths["layer2.0.shortcut.conv"] = 20
    new = upgrade_shape("cifar_resnet20", {"widths": widths, "depths": dict(full.depths)})
    assert [new.widths[f"layer2.{j}.conv2.conv"] for j in range(3)] == [20, 20, 20]
    assert new.widths["layer2.1.conv1.conv"] == 32
