"""Tasks beyond classification: the offline detection + segmentation set and its scores.

``build_canvas_set`` composes real Fashion-MNIST items on larger canvases (COCO json, YOLO
folder, semantic and instance masks, all from one seeded build cached by its arguments);
``CanvasDetection`` / ``CanvasSegmentation`` read it as torch datasets; ``coco_map`` and
``miou`` score predictions on it.
"""

from tasprune.tasks.canvas import (
    FASHION_MNIST_CLASSES,
    MASK_THRESHOLD,
    CanvasSpec,
    build_canvas_set,
    read_manifest,
)
from tasprune.tasks.canvas_data import (
    CanvasDetection,
    CanvasSegmentation,
    collate,
    save_canvas_preview,
)
from tasprune.tasks.metrics import coco_map, miou, rle_decode, rle_encode, to_coco_detections

__all__ = [
    "FASHION_MNIST_CLASSES",
    "MASK_THRESHOLD",
    "CanvasDetection",
    "CanvasSegmentation",
    "CanvasSpec",
    "build_canvas_set",
    "coco_map",
    "collate",
    "miou",
    "read_manifest",
    "rle_decode",
    "rle_encode",
    "save_canvas_preview",
    "to_coco_detections",
]
