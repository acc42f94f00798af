"""Scores for the detection and segmentation tasks: COCO mAP (pycocotools) and mean IoU.

``coco_map`` wraps pycocotools' ``COCOeval`` (the reference evaluator; the optional extra
``tasprune[detection]`` installs it) and returns its summary numbers as a dict; its console
table is kept out of the caller's output. ``miou`` is the confusion-matrix mean IoU of
semantic maps. Masks travel as COCO's uncompressed RLE (column-major run lengths starting with
a background run), which needs nothing but numpy to write and which pycocotools reads.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tasprune.errors import TaspruneError

__all__ = ["coco_map", "miou", "rle_decode", "rle_encode", "to_coco_detections"]

_NO_PYCOCOTOOLS = (
    "pycocotools is not installed. Fix: pip install 'tasprune[detection]' "
    "(or pip install pycocotools)"
)


def rle_encode(mask: np.ndarray) -> dict[str, Any]:
    """COCO uncompressed RLE of a 2-D boolean mask: ``{"size": [h, w], "counts": [...]}``."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate(([0], edges, [flat.size]))).tolist()
    if flat.size and flat[0]:
        runs = [0, *runs]  # COCO's counts start with a background run
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": runs}


def rle_decode(rle: Mapping[str, Any]) -> np.ndarray:
    """The boolean H x W mask of an uncompressed RLE written by :func:`rle_encode`."""
    h, w = rle["size"]
    values = np.arange(len(rle["counts"])) % 2 == 1
    flat = np.repeat(values, rle["counts"])
    return flat.reshape((w, h)).T


def to_coco_detections(
    outputs: Sequence[Mapping[str, torch.Tensor]],
    image_ids: Sequence[int],
    *,
    mask_threshold: float = 0.5,
) -> list[dict[str, Any]]:
    """COCO result dicts from torchvision-style outputs (boxes x1y1x2y2, labels, scores).

    ``labels`` are COCO category ids (the canvas set's 1..10). With ``masks`` in an output
    (N x 1 x H x W probabilities, as Mask R-CNN gives) each result also carries a
    compressed-RLE ``segmentation`` (needs pycocotools) for ``coco_map(..., iou_type="segm")``.
    """
    results: list[dict[str, Any]] = []
    for out, image_id in zip(outputs, image_ids, strict=True):
        boxes = out["boxes"].detach().cpu().to(torch.float64)
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        labels, scores = out["labels"].tolist(), out["scores"].tolist()
        masks = out.get("masks")
        encoded = _encode_masks(masks, mask_threshold) if masks is not None else None
        for j, (box, label, score) in enumerate(zip(xywh, labels, scores, strict=True)):
            row: dict[str, Any] = {
                "image_id": int(image_id),
                "category_id": int(label),
                "bbox": [round(v, 3) for v in box],
                "score": float(score),
            }
            if encoded is not None:
                row["segmentation"] = encoded[j]
            results.append(row)
    return results


def _encode_masks(masks: torch.Tensor, threshold: float) -> list[dict[str, Any]]:
    try:
        from pycocotools import mask as mask_utils
    except ImportError as err:
        raise TaspruneError(_NO_PYCOCOTOOLS) from err
    binary = (masks.detach().cpu().reshape(-1, *masks.shape[-2:]) > threshold).numpy()
    encoded = []
    for m in binary:
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        encoded.append({"size": rle["size"], "counts": rle["counts"].decode("ascii")})
    return encoded


def coco_map(
    coco_gt_json: str | os.PathLike[str],
    detections: Sequence[Mapping[str, Any]] | str | os.PathLike[str],
    *,
    iou_type: str = "bbox",
) -> dict[str, float]:
    """COCO's mAP of ``detections`` against the ground truth json, by pycocotools' COCOeval.

    ``detections`` is a list of COCO result dicts (``image_id``, ``category_id``, ``bbox``
    [x, y, w, h], ``score``; ``segmentation`` for ``iou_type="segm"``) or a path to a json of
    them; :func:`to_coco_detections` builds it from a torchvision detector's outputs. Returns
    ``map`` (mAP@[.5:.95]), ``map50``, ``map75``, ``map_small``, ``map_medium``, ``map_large``
    (-1 where the ground truth has no object of that size, as COCOeval reports it). No
    detections at all score 0.
    """
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as err:
        raise TaspruneError(_NO_PYCOCOTOOLS) from err
    if iou_type not in ("bbox", "segm"):
        raise TaspruneError(f"iou_type={iou_type!r}. Fix: use 'bbox' or 'segm'")
    rows: list[Any] = (
        json.loads(Path(detections).read_text(encoding="utf-8"))
        if isinstance(detections, str | os.PathLike)
        else copy.deepcopy(list(detections))  # loadRes adds ids and areas in place
    )
    keys = ("map", "map50", "map75", "map_small", "map_medium", "map_large")
    if not rows:
        return dict.fromkeys(keys, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):  # COCO/COCOeval print their progress
        gt = COCO(str(coco_gt_json))
        dt = gt.loadRes(rows)
        evaluator = COCOeval(gt, dt, iouType=iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {k: float(v) for k, v in zip(keys, evaluator.stats[:6], strict=True)}


def miou(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, *, ignore_index: int | None = None
) -> float:
    """Mean IoU over the classes present in ``pred`` or ``target`` (class-index maps).

    ``num_classes`` counts the background (11 for the canvas set: 0 = background, 1..10);
    pixels whose target is ``ignore_index`` are left out. A class absent from both maps does
    not count towards the mean.
    """
    if pred.shape != target.shape:
        raise TaspruneError(
            f"miou: prediction shape {tuple(pred.shape)} differs from target "
            f"{tuple(target.shape)}. Fix: pass class-index maps (argmax over the class dim)"
        )
    p, t = pred.reshape(-1).long(), target.reshape(-1).long()
    keep = t != ignore_index if ignore_index is not None else torch.ones_like(t, dtype=torch.bool)
    p, t = p[keep], t[keep]
    if p.numel() and (
        min(int(p.min()), int(t.min())) < 0 or max(int(p.max()), int(t.max())) >= num_classes
    ):
        raise TaspruneError(
            f"miou: class indices outside 0..{num_classes - 1}. Fix: pass num_classes that "
            "counts every class, the background included"
        )
    confusion = torch.bincount(t * num_classes + p, minlength=num_classes**2)
    confusion = confusion.reshape(num_classes, num_classes).double()
    inter = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - inter
    present = union > 0
    return float((inter[present] / union[present]).mean()) if present.any() else 0.0
