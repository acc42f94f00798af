"""`Shape`: JSON round trips and validation errors that name the offending key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasprune.errors import ShapeError, TaspruneError
from tasprune.models import get_model_spec, list_models
from tasprune.shape import Shape

FULL = Shape(
    widths={"stem": 16, "layer1.0.conv1": 16, "layer1.0.conv2": 16, "layer1.1.conv1": 16},
    depths={"layer1": 2},
)
PRUNED = Shape(
    widths={"stem": 3, "layer1.0.conv1": 1, "layer1.0.conv2": 16, "layer1.1.conv1": 9},
    depths={"layer1": 1},
)


def _needs_atomic_write() -> None:
    """Shape.save goes through tasprune.utils.atomic_write_text, which may not exist yet."""
    utils = pytest.importorskip("tasprune.utils")
    if not hasattr(utils, "atomic_write_text"):
        pytest.skip("tasprune.utils.atomic_write_text is not available yet")


def test_to_dict_from_dict_round_trip() -> None:
    assert Shape.from_dict(PRUNED.to_dict()) == PRUNED
    assert Shape.from_dict(json.loads(PRUNED.to_json())) == PRUNED


def test_to_dict_is_a_copy() -> None:
    d = PRUNED.to_dict()
    d["widths"]["stem"] = 99
    assert PRUNED.widths["stem"] == 3


def test_to_json_keeps_extra_fields_and_from_dict_ignores_them() -> None:
    text = PRUNED.to_json(model="cifar_resnet20", flops=123)
    data = json.loads(text)
    assert data["model"] == "cifar_resnet20" and data["flops"] == 123
    assert data["widths"] == PRUNED.widths and data["depths"] == PRUNED.depths
    assert Shape.from_dict(data) == PRUNED


def test_to_json_preserves_key_order() -> None:
    data = json.loads(PRUNED.to_json())
    assert list(data["widths"]) == list(PRUNED.widths)


@pytest.mark.parametrize("name", list_models())
def test_full_shape_json_round_trip(name: str) -> None:
    full = get_model_spec(name).full_shape()
    back = Shape.from_dict(json.loads(full.to_json(model=name)))
    assert back == full
    back.validate_against(full, name)


def test_save_load_round_trip(tmp_path: Path) -> None:
    _needs_atomic_write()
    path = tmp_path / "shape.json"
    PRUNED.save(path, model="cifar_resnet20", flops=4242)
    shape, data = Shape.load(path)
    assert shape == PRUNED
    assert data["model"] == "cifar_resnet20" and data["flops"] == 4242
    assert path.read_text().endswith("\n")
    assert [p.name for p in tmp_path.iterdir()] == ["shape.json"]  # no temp file left behind
    PRUNED.replace(widths={"stem": 5}).save(str(path))  # overwrite, str path accepted
    assert Shape.load(path)[0].widths["stem"] == 5


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ShapeError, match="Fix:") as info:
        Shape.load(tmp_path / "nope.json")
    assert "nope.json" in str(info.value)


@pytest.mark.parametrize("text", ["{not json", "", "\xff\xfe"])
def test_load_invalid_json(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.json"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(ShapeError, match="Fix:"):
        Shape.load(path)


def test_load_json_that_is_not_a_shape(tmp_path: Path) -> None:
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    with pytest.raises(ShapeError):
        Shape.load(path)
    path.write_text('{"widths": {"stem": 3}}')
    with pytest.raises(ShapeError, match="depths") as info:
        Shape.load(path)
    assert "Fix:" in str(info.value)


def test_replace_is_a_copy() -> None:
    new = FULL.replace(widths={"stem": 4}, depths={"layer1": 1})
    assert new.widths["stem"] == 4 and new.depths["layer1"] == 1
    assert FULL.widths["stem"] == 16 and FULL.depths["layer1"] == 2
    assert FULL.replace() == FULL


def test_valid_subshape_passes() -> None:
    PRUNED.validate_against(FULL, "toy")
    FULL.validate_against(FULL, "toy")


def _bad(widths: dict | None = None, depths: dict | None = None) -> Shape:
    return Shape(widths=dict(widths or FULL.widths), depths=dict(depths or FULL.depths))


def _without(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


@pytest.mark.parametrize(
    ("case", "shape", "key"),
    [
        ("width 0", FULL.replace(widths={"layer1.0.conv1": 0}), "layer1.0.conv1"),
        ("width negative", FULL.replace(widths={"layer1.1.conv1": -3}), "layer1.1.conv1"),
        ("width above full", FULL.replace(widths={"layer1.0.conv2": 17}), "layer1.0.conv2"),
        ("unknown conv", FULL.replace(widths={"layer9.0.conv1": 4}), "layer9.0.conv1"),
        ("missing conv", _bad(widths=_without(FULL.widths, "layer1.0.conv2")), "layer1.0.conv2"),
        ("depth 0", FULL.replace(depths={"layer1": 0}), "layer1"),
        ("depth above full", FULL.replace(depths={"layer1": 3}), "layer1"),
        ("unknown stage", FULL.replace(depths={"layer4": 1}), "layer4"),
    ],
)
def test_validate_against_errors(case: str, shape: Shape, key: str) -> None:
    with pytest.raises(ShapeError) as info:
        shape.validate_against(FULL, "toy")
    msg = str(info.value)
    assert key in msg, (case, msg)
    assert "Fix:" in msg, (case, msg)
    assert "toy" in msg, (case, msg)
    assert isinstance(info.value, TaspruneError)


def test_missing_stage_names_it() -> None:
    shape = Shape(widths=dict(FULL.widths), depths={})
    with pytest.raises(ShapeError, match=r"layer1.*Fix:"):
        shape.validate_against(FULL, "toy")


@pytest.mark.parametrize("value", [2.5, 3.0, "4", None, True, [4]])
def test_from_dict_rejects_non_integer_width(value: object) -> None:
    data = PRUNED.to_dict()
    data["widths"]["layer1.1.conv1"] = value
    with pytest.raises(ShapeError) as info:
        Shape.from_dict(data)
    assert "layer1.1.conv1" in str(info.value)
    assert "Fix:" in str(info.value)


@pytest.mark.parametrize("value", [1.5, "1", False])
def test_from_dict_rejects_non_integer_depth(value: object) -> None:
    data = PRUNED.to_dict()
    data["depths"]["layer1"] = value
    with pytest.raises(ShapeError, match=r"layer1.*Fix:"):
        Shape.from_dict(data)


@pytest.mark.parametrize(
    "data",
    [
        [],
        "shape",
        {},
        {"widths": {"stem": 3}},
        {"depths": {"layer1": 1}},
        {"widths": [3], "depths": {"layer1": 1}},
    ],
)
def test_from_dict_rejects_malformed(data: object) -> None:
    with pytest.raises(ShapeError):
        Shape.from_dict(data)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [2.5, True])
def test_validate_against_rejects_non_integer_width(value: object) -> None:
    shape = FULL.replace(widths={"layer1.0.conv1": value})  # type: ignore[dict-item]
    with pytest.raises(ShapeError, match=r"layer1\.0\.conv1"):
        shape.validate_against(FULL, "toy")
