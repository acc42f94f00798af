"""The offline canvas detection + segmentation set: reproducible, disjoint, consistent files.

Tiny builds (tens of canvases) of real Fashion-MNIST items; one shared build per module.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import needs_fashion_mnist
from tasprune.datasets import load_dataset
from tasprune.errors import ConfigError, DataError, TaspruneError
from tasprune.tasks import (
    MASK_THRESHOLD,
    CanvasDetection,
    CanvasSegmentation,
    build_canvas_set,
    coco_map,
    collate,
    miou,
    rle_decode,
    rle_encode,
    save_canvas_preview,
    to_coco_detections,
)
from tasprune.tasks.canvas import SPLITS

pytestmark = pytest.mark.usefixtures("one_thread")

TINY: dict[str, Any] = {"counts": (16, 6, 8), "items": (1, 4), "clutter": 2, "progress": False}


@pytest.fixture(scope="module")
def canvas_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_canvas_set(tmp_path_factory.mktemp("canvas"), **TINY)


def _coco(root: Path, split: str) -> dict[str, Any]:
    return json.loads((root / "annotations" / f"{split}.json").read_text())


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def _digests(root: Path) -> dict[str, str]:
    """sha256 of every file, data.yaml with its own folder's path taken out."""
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if path.name == "data.yaml":
            data = data.replace(str(root.resolve()).encode(), b"ROOT")
        out[str(path.relative_to(root))] = hashlib.sha256(data).hexdigest()
    return out


def _anns_by_image(coco: dict[str, Any]) -> dict[int, list[dict[str, Any]]]:
    out: dict[int, list[dict[str, Any]]] = {img["id"]: [] for img in coco["images"]}
    for ann in coco["annotations"]:
        out[ann["image_id"]].append(ann)
    return out


@needs_fashion_mnist
def test_build_is_reproducible_byte_for_byte(canvas_set: Path, tmp_path: Path) -> None:
    again = build_canvas_set(tmp_path / "a", **TINY)
    assert again.name == canvas_set.name
    first, second = _digests(canvas_set), _digests(again)
    assert len(first) == 1 + 1 + 4 * (16 + 6 + 8) + 3  # manifest, data.yaml, 4 files a canvas
    assert first == second
    other = build_canvas_set(tmp_path / "b", **{**TINY, "seed": 1})
    assert other.name != canvas_set.name
    assert _digests(other)["images/train/000000.png"] != first["images/train/000000.png"]


@needs_fashion_mnist
def test_splits_are_disjoint_and_drawn_from_the_right_file(canvas_set: Path) -> None:
    sources: dict[str, set[int]] = {}
    for split in SPLITS:
        coco = _coco(canvas_set, split)
        fmnist = load_dataset("fashion-mnist", "test" if split == "test" else "train")
        for ann in coco["annotations"]:  # the item's class is its Fashion-MNIST label there
            assert ann["category_id"] == int(fmnist.labels[ann["source_index"]]) + 1
        clutter = {i for img in coco["images"] for i in img["clutter_sources"]}
        sources[split] = {a["source_index"] for a in coco["annotations"]} | clutter
    assert sources["train"] and sources["val"] and sources["test"]
    assert not sources["train"] & sources["val"]
    manifest = json.loads((canvas_set / "canvas.json").read_text())
    assert [manifest["splits"][s]["source"] for s in SPLITS] == ["train", "train", "test"]


@needs_fashion_mnist
def test_boxes_are_tight_around_visible_pixels_and_masks_agree(canvas_set: Path) -> None:
    for split in SPLITS:
        coco = _coco(canvas_set, split)
        counts = [len(a) for a in _anns_by_image(coco).values()]
        assert min(counts) >= 1 and max(counts) <= 4
        for img in coco["images"]:
            name = img["file_name"]
            image = _png(canvas_set / "images" / split / name)
            inst = _png(canvas_set / "instances" / split / name)
            semantic = _png(canvas_set / "semantic" / split / name)
            expected = np.zeros_like(semantic)
            anns = _anns_by_image(coco)[img["id"]]
            assert set(np.unique(inst)) - {0} == {a["instance"] for a in anns}
            for ann in anns:
                mask = inst == ann["instance"]
                rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
                x, y, w, h = ann["bbox"]
                assert (x, y, x + w, y + h) == (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
                assert ann["area"] == mask.sum() > 0
                assert (image[mask] >= MASK_THRESHOLD).all()  # what is masked is drawn
                assert (rle_decode(ann["segmentation"]) == mask).all()
                expected[mask] = ann["category_id"]
            assert (semantic == expected).all()


@needs_fashion_mnist
def test_yolo_labels_agree_with_coco_boxes(canvas_set: Path) -> None:
    data = yaml.safe_load((canvas_set / "data.yaml").read_text())
    assert data["nc"] == 10 and data["names"][9] == "Ankle boot"
    assert Path(data["train"]) == canvas_set.resolve() / "images" / "train"
    for split in SPLITS:
        assert Path(data[split]).is_absolute() and Path(data[split]).is_dir()
        coco = _coco(canvas_set, split)
        for img in coco["images"]:
            txt = canvas_set / "labels" / split / img["file_name"].replace(".png", ".txt")
            rows = [list(map(float, line.split())) for line in txt.read_text().splitlines()]
            anns = _anns_by_image(coco)[img["id"]]
            assert len(rows) == len(anns)
            for (cls, cx, cy, w, h), ann in zip(rows, anns, strict=True):
                x, y, bw, bh = (v / 96 for v in ann["bbox"])
                assert cls == ann["category_id"] - 1
                assert np.allclose([cx, cy, w, h], [x + bw / 2, y + bh / 2, bw, bh], atol=1e-6)


@needs_fashion_mnist
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools' own numpy 2 notice
def test_coco_json_scores_ground_truth_perfectly_and_shifted_boxes_lower(
    canvas_set: Path,
) -> None:
    pytest.importorskip("pycocotools")
    from pycocotools.coco import COCO

    gt_file = canvas_set / "annotations" / "test.json"
    gt = COCO(str(gt_file))
    assert len(gt.getCatIds()) == 10 and gt.loadCats(1)[0]["name"] == "T-shirt/top"
    ann = gt.loadAnns(gt.getAnnIds())[0]
    assert (gt.annToMask(ann) == rle_decode(ann["segmentation"])).all()
    dets = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1}
        for a in _coco(canvas_set, "test")["annotations"]
    ]
    assert coco_map(gt_file, dets)["map"] == pytest.approx(1.0)
    assert coco_map(gt_file, dets)["map50"] == pytest.approx(1.0)
    shifted = [{**d, "bbox": [d["bbox"][0] + 3, *d["bbox"][1:]]} for d in dets]
    assert coco_map(gt_file, shifted)["map"] < 0.9
    assert coco_map(gt_file, [])["map"] == 0.0
    # The torch dataset's targets, as a perfect detector's outputs, score 1.0 on boxes and masks.
    data = CanvasDetection(canvas_set, "test")
    outputs = [
        {**t, "scores": torch.ones(len(t["labels"])), "masks": t["masks"][:, None].float()}
        for _, t in (data[i] for i in range(len(data)))
    ]
    results = to_coco_detections(outputs, data.image_ids)
    assert coco_map(gt_file, results)["map"] == pytest.approx(1.0)
    assert coco_map(gt_file, results, iou_type="segm")["map"] == pytest.approx(1.0)


@needs_fashion_mnist
def test_torch_datasets(canvas_set: Path) -> None:
    det = CanvasDetection(canvas_set, "train")
    assert len(det) == 16
    image, target = det[0]
    assert image.shape == (1, 96, 96) and image.dtype == torch.float32
    assert image.min() >= 0 and image.max() <= 1
    n = len(target["labels"])
    assert target["boxes"].shape == (n, 4) and target["boxes"].dtype == torch.float32
    assert target["labels"].dtype == torch.int64 and target["labels"].min() >= 1
    assert target["labels"].max() <= 10
    assert target["masks"].shape == (n, 96, 96) and target["masks"].dtype == torch.uint8
    rgb, _ = CanvasDetection(canvas_set, "train", channels=3)[0]
    assert rgb.shape == (3, 96, 96) and torch.equal(rgb[2], image[0])
    images, targets = collate([det[0], det[1]])
    assert len(images) == len(targets) == 2
    loader = torch.utils.data.DataLoader(det, batch_size=4, collate_fn=CanvasDetection.collate)
    assert len(next(iter(loader))[0]) == 4
    seg = CanvasSegmentation(canvas_set, "val")
    seg_image, semantic = seg[0]
    assert len(seg) == 6 and seg_image.shape == (1, 96, 96) and semantic.dtype == torch.long
    _, val_target = CanvasDetection(canvas_set, "val")[0]
    from_masks = (val_target["masks"] * val_target["labels"].view(-1, 1, 1)).sum(0)
    assert torch.equal(from_masks.long(), semantic)
    assert miou(semantic, semantic, 11) == 1.0
    with pytest.raises(ConfigError, match="split"):
        CanvasDetection(canvas_set, "holdout")
    with pytest.raises(DataError, match="not a canvas set"):
        CanvasSegmentation(canvas_set.parent, "train")


@needs_fashion_mnist
def test_cache_is_reused_and_a_changed_argument_builds_anew(
    canvas_set: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_data(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("rebuilt a cached set")

    before = (canvas_set / "canvas.json").stat().st_mtime_ns
    monkeypatch.setattr("tasprune.tasks.canvas.load_dataset", no_data)
    assert build_canvas_set(canvas_set.parent, **TINY) == canvas_set
    assert (canvas_set / "canvas.json").stat().st_mtime_ns == before
    monkeypatch.undo()
    changed = build_canvas_set(canvas_set.parent, **{**TINY, "max_overlap": 0.1})
    assert changed != canvas_set and (changed / "canvas.json").is_file()
    assert not list(canvas_set.parent.glob(".partial-*"))


@needs_fashion_mnist
def test_default_root_is_the_cache_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASPRUNE_CACHE", str(tmp_path))
    path = build_canvas_set(counts=(2, 1, 1), progress=False)
    assert path.parent == tmp_path / "canvas"


def test_a_half_built_or_foreign_folder_is_never_used(tmp_path: Path) -> None:
    from tasprune.tasks.canvas import CanvasSpec

    (tmp_path / CanvasSpec(**{k: v for k, v in TINY.items() if k != "progress"}).key()).mkdir()
    with pytest.raises(DataError, match="not a complete canvas set"):
        build_canvas_set(tmp_path, **TINY)


def test_missing_fashion_mnist_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        build_canvas_set(tmp_path / "cache", data_root=tmp_path, **TINY)
    line = str(err.value)
    assert "Fashion-MNIST" in line and "Fix:" in line and "\n" not in line
    assert not (tmp_path / "cache").exists()  # nothing written before the data is found


@pytest.mark.parametrize(
    ("arg", "value"),
    [("size", 8), ("counts", (1, 2)), ("items", (3, 1)), ("scale", (0.5, 2.0)),
     ("max_overlap", 1.5), ("clutter", -1)],
)  # fmt: skip
def test_bad_arguments_name_the_argument(tmp_path: Path, arg: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=arg):
        build_canvas_set(tmp_path, **{**TINY, arg: value})


def test_rle_round_trip_and_miou() -> None:
    rng = np.random.default_rng(0)
    for mask in (rng.random((7, 5)) > 0.5, np.ones((3, 4), bool), np.zeros((4, 3), bool)):
        rle = rle_encode(mask)
        assert sum(rle["counts"]) == mask.size and (rle_decode(rle) == mask).all()
    target = torch.tensor([[0, 0, 1, 1], [0, 0, 2, 2]])
    pred = torch.tensor([[0, 0, 1, 2], [0, 0, 2, 2]])
    # IoU: class 0 4/4, class 1 1/2, class 2 2/3
    assert miou(pred, target, 3) == pytest.approx((1 + 0.5 + 2 / 3) / 3)
    assert miou(pred, target, 5) == pytest.approx((1 + 0.5 + 2 / 3) / 3)  # absent classes
    with pytest.raises(TaspruneError, match="num_classes"):
        miou(pred, target, 2)


@needs_fashion_mnist
def test_preview_is_written(canvas_set: Path, tmp_path: Path) -> None:
    out = save_canvas_preview(canvas_set, tmp_path / "grid.png", split="test", count=4, cols=2)
    assert out.is_file() and Image.open(out).size[0] > 300
