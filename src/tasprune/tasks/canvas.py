"""An offline detection + segmentation set: real Fashion-MNIST items placed on larger canvases.

No detection set is available offline, so one is composed from real images: 1-4 Fashion-MNIST
items per grey canvas, each at a random scale and position, overlaps capped, optionally over
unlabelled clutter (fragments of other items). The builder is shipped, never the images: the
set is built on first use into a cache folder named by a hash of its arguments
(``$TASPRUNE_CACHE/canvas/<key>`` or ``~/.cache/tasprune/canvas/<key>``), written to a
``.partial-*`` folder and renamed into place, so a half-built folder is never used. The same
arguments rebuild it byte for byte.

Splits: ``train`` and ``val`` from Fashion-MNIST's training images (two disjoint pools of item
indices, in proportion to the two counts), ``test`` from its test images. One build writes::

    <key>/canvas.json                        the arguments (CanvasSpec), class names, counts
    <key>/data.yaml                          Ultralytics: absolute paths, nc, names
    <key>/images/{train,val,test}/NNNNNN.png the canvases (grey, 8 bit)
    <key>/labels/{train,val,test}/NNNNNN.txt YOLO: "class cx cy w h" (0-9, normalised)
    <key>/annotations/{train,val,test}.json  COCO: bbox [x,y,w,h], area, iscrowd 0,
                                             category_id 1..10, segmentation (RLE)
    <key>/semantic/{train,val,test}/NNNNNN.png class index + 1 per pixel, 0 = background
    <key>/instances/{train,val,test}/NNNNNN.png annotation's "instance" per pixel, 0 = none

The images/ + labels/ pair is the YOLO layout itself, so nothing is stored twice.

Masks and boxes describe what is visible: an item's pixels are those of its scaled image at or
above :data:`MASK_THRESHOLD` (faint resampling fringes and near-black pixels are not part of it
and are not drawn); a later item is drawn over earlier ones, and an item's mask, box and area
are its pixels that stay visible. Placement keeps at least :data:`MIN_VISIBLE` of every item
visible and the IoU of any two items' boxes at most ``max_overlap``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image
from tqdm import tqdm

from tasprune.datasets import load_dataset
from tasprune.errors import ConfigError, DataError
from tasprune.latency_table import cache_dir
from tasprune.tasks.metrics import rle_encode
from tasprune.utils import read_json_object

logger = logging.getLogger(__name__)

__all__ = [
    "CANVAS_VERSION",
    "FASHION_MNIST_CLASSES",
    "MASK_THRESHOLD",
    "MIN_VISIBLE",
    "SPLITS",
    "CanvasSpec",
    "build_canvas_set",
    "read_manifest",
]

#: Bumped whenever the composition or the files change, so old cache folders are not reused.
CANVAS_VERSION = 1

#: An item's pixel belongs to it when its scaled value is at least this (0-255 scale).
MASK_THRESHOLD = 16

#: Every item keeps at least this fraction of its pixels visible after later items are drawn.
MIN_VISIBLE = 0.5

#: Fashion-MNIST's class names, label 0..9 (COCO category_id 1..10, YOLO class 0..9).
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

SPLITS: tuple[str, ...] = ("train", "val", "test")

MANIFEST = "canvas.json"

_PLACE_TRIES = 50  # random positions tried per item before it is left out
_MIN_ITEM_PIXELS = 16  # an item darker than the threshold almost everywhere is drawn again
_SOURCE_SIDE = 28  # Fashion-MNIST images are 28 x 28


@dataclass(frozen=True)
class CanvasSpec:
    """The arguments that define a canvas set; its :meth:`key` names the cache folder.

    ``scale`` is the side of an item's 28 x 28 square as a fraction of the canvas side;
    ``max_overlap`` caps the IoU of any two items' boxes; ``clutter`` is the most unlabelled
    fragments (crops of other items of the same split) drawn under the items of a canvas.
    """

    size: int = 96
    counts: tuple[int, int, int] = (4000, 500, 1000)
    items: tuple[int, int] = (1, 4)
    scale: tuple[float, float] = (0.2, 0.5)
    max_overlap: float = 0.25
    clutter: int = 2
    seed: int = 0
    version: int = field(default=CANVAS_VERSION)

    def __post_init__(self) -> None:
        """Refuse arguments that cannot make a set, naming the argument and the fix."""
        object.__setattr__(self, "counts", tuple(int(c) for c in self.counts))
        object.__setattr__(self, "items", tuple(int(i) for i in self.items))
        object.__setattr__(self, "scale", tuple(float(s) for s in self.scale))
        if not 32 <= self.size <= 1024:
            raise ConfigError(f"canvas size={self.size}. Fix: use 32..1024 pixels (e.g. 96)")
        if len(self.counts) != 3 or min(self.counts) < 0 or self.counts[0] + self.counts[1] < 1:
            raise ConfigError(
                f"canvas counts={self.counts}. Fix: give (train, val, test) canvas counts, "
                "non-negative, e.g. (4000, 500, 1000)"
            )
        if len(self.items) != 2 or not 1 <= self.items[0] <= self.items[1] <= 32:
            raise ConfigError(
                f"canvas items={self.items}. Fix: give (min, max) with 1 <= min <= max"
            )
        lo, hi = self.scale if len(self.scale) == 2 else (0.0, 0.0)
        if len(self.scale) != 2 or not 0 < lo <= hi <= 1 or hi * self.size < 8:
            raise ConfigError(
                f"canvas scale={self.scale}. Fix: give (min, max) item sides as fractions of the "
                "canvas, 0 < min <= max <= 1, with max * size >= 8 pixels (e.g. (0.2, 0.5))"
            )
        if not 0 <= self.max_overlap <= 1:
            raise ConfigError(f"canvas max_overlap={self.max_overlap}. Fix: use an IoU in 0..1")
        if self.clutter < 0:
            raise ConfigError(f"canvas clutter={self.clutter}. Fix: use 0 or more fragments")

    def key(self) -> str:
        """A short hash of every argument (and the format version and mask threshold)."""
        blob = json.dumps({**asdict(self), "threshold": MASK_THRESHOLD}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:16]

    def to_json(self) -> dict[str, Any]:
        """The spec as plain JSON values (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def build_canvas_set(
    root: str | os.PathLike[str] | None = None,
    *,
    size: int = 96,
    counts: tuple[int, int, int] = (4000, 500, 1000),
    items: tuple[int, int] = (1, 4),
    scale: tuple[float, float] = (0.2, 0.5),
    max_overlap: float = 0.25,
    clutter: int = 2,
    seed: int = 0,
    data_root: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> Path:
    """The folder of the canvas set with these arguments, built first if it is not cached.

    ``root`` holds one folder per argument set (default ``$TASPRUNE_CACHE/canvas`` or
    ``~/.cache/tasprune/canvas``); ``data_root`` is where Fashion-MNIST is read from (default:
    the Debian package's copy) and does not change the set. See the module docstring for the
    files. Raises :class:`ConfigError` for bad arguments, :class:`DataError` when
    Fashion-MNIST is missing or a cache folder is not a complete set.
    """
    spec = CanvasSpec(
        size=size,
        counts=counts,
        items=items,
        scale=scale,
        max_overlap=max_overlap,
        clutter=clutter,
        seed=seed,
    )
    base = Path(root).expanduser() if root is not None else cache_dir() / "canvas"
    final = base / spec.key()
    if final.exists():
        _check_complete(final, spec)
        return final
    data = Path(data_root) if data_root is not None else None
    try:
        train_src = load_dataset("fashion-mnist", "train", data)
        test_src = load_dataset("fashion-mnist", "test", data)
    except DataError as err:
        raise DataError(f"the canvas set needs Fashion-MNIST: {err.problem}", err.fix) from err
    base.mkdir(parents=True, exist_ok=True)
    _remove_dead_partials(base, spec.key())
    tmp = base / f".partial-{spec.key()}-{os.getpid()}-{secrets.token_hex(4)}"
    logger.info("building canvas set %s into %s", spec, final)
    try:
        _write_set(tmp, final, spec, train_src, test_src, progress)
        os.rename(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if final.exists():  # another process finished the same set first: use its copy
            _check_complete(final, spec)
            return final
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def read_manifest(root: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``canvas.json`` of a built set, or a :class:`DataError` saying how to build one."""
    data = read_json_object(Path(root) / MANIFEST)
    if data is None or not isinstance(data.get("spec"), dict):
        raise DataError(
            f"{Path(root)} is not a canvas set (no readable {MANIFEST} with a spec). Fix: pass "
            "the folder that tasprune.tasks.build_canvas_set() returned, or delete it and build "
            "again"
        )
    return data


def _check_complete(final: Path, spec: CanvasSpec) -> None:
    """A cached folder is used only when its manifest is readable and names the same spec."""
    try:
        found = read_manifest(final)["spec"]
    except DataError:
        found = None
    if found != spec.to_json():
        raise DataError(
            f"cache folder {final} is not a complete canvas set for {spec}. Fix: delete it and "
            "build again"
        )


def _remove_dead_partials(base: Path, key: str) -> None:
    """Remove half-built folders of this key left by processes that no longer run."""
    for path in base.glob(f".partial-{key}-*"):
        try:
            pid = int(path.name.split("-")[2])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            continue


# --------------------------------------------------------------------------------------------
# Composition
# --------------------------------------------------------------------------------------------


@dataclass
class _Item:
    label: int  # Fashion-MNIST class 0..9
    source: int  # index into the Fashion-MNIST split the canvas is drawn from
    pixels: int  # mask pixels when drawn (before later items cover some)
    box: tuple[int, int, int, int]  # unoccluded tight box, x1 y1 x2 y2 (x2, y2 exclusive)


@dataclass
class _Canvas:
    image: np.ndarray  # H x W uint8
    instances: np.ndarray  # H x W uint8: k = items[k - 1], 0 = none
    items: list[_Item]
    clutter: list[int]  # source indices of the unlabelled fragments


class _Pool:
    """A split's item indices, handed out in a seeded order; reshuffled when used up."""

    def __init__(self, indices: np.ndarray, rng: np.random.Generator) -> None:
        self.indices, self.rng, self.pos = indices, rng, len(indices)
        self.order = indices

    def next(self) -> int:
        if self.pos >= len(self.order):
            self.order, self.pos = self.rng.permutation(self.indices), 0
        self.pos += 1
        return int(self.order[self.pos - 1])


def _split_pools(spec: CanvasSpec, n_train: int, n_test: int) -> dict[str, np.ndarray]:
    """Disjoint item indices per split: train/val share the training images by their counts."""
    order = np.random.default_rng([spec.seed, 1000]).permutation(n_train)
    n_train_canvas, n_val_canvas, _ = spec.counts
    n_val = round(n_train * n_val_canvas / (n_train_canvas + n_val_canvas))
    n_val = min(max(n_val, 1 if n_val_canvas else 0), n_train - (1 if n_train_canvas else 0))
    return {"val": order[:n_val], "train": order[n_val:], "test": np.arange(n_test)}


def _scaled(image: np.ndarray, side: int) -> np.ndarray:
    """``image`` (uint8, 28 x 28 or a crop) resized to side x side, bilinear."""
    return np.asarray(Image.fromarray(image).resize((side, side), Image.Resampling.BILINEAR))


def _iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def _draw_clutter(
    canvas: np.ndarray, source: np.ndarray, spec: CanvasSpec, rng: np.random.Generator
) -> None:
    """Paste a crop (a third to a half of the item's side) of ``source`` at a random place."""
    crop = int(rng.integers(_SOURCE_SIDE // 3, _SOURCE_SIDE // 2 + 1))
    y0, x0 = (int(v) for v in rng.integers(0, _SOURCE_SIDE - crop + 1, size=2))
    item_side = rng.uniform(*spec.scale) * spec.size
    side = max(4, round(crop * item_side / _SOURCE_SIDE))
    frag = _scaled(np.ascontiguousarray(source[y0 : y0 + crop, x0 : x0 + crop]), side)
    y, x = (int(v) for v in rng.integers(0, spec.size - side + 1, size=2))
    keep = frag >= MASK_THRESHOLD
    canvas[y : y + side, x : x + side][keep] = frag[keep]


def _place(
    item: np.ndarray,
    mask: np.ndarray,
    placed: list[_Item],
    inst: np.ndarray,
    spec: CanvasSpec,
    rng: np.random.Generator,
) -> tuple[int, int, tuple[int, int, int, int]] | None:
    """A position (y, x) and box for ``item`` that keeps the overlap and visibility limits."""
    side = item.shape[0]
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    visible = np.bincount(inst.ravel(), minlength=len(placed) + 1)
    for _ in range(_PLACE_TRIES):
        y, x = (int(v) for v in rng.integers(0, spec.size - side + 1, size=2))
        box = (x + int(cols[0]), y + int(rows[0]), x + int(cols[-1]) + 1, y + int(rows[-1]) + 1)
        if any(_iou(box, p.box) > spec.max_overlap for p in placed):
            continue
        covered = np.bincount(inst[y : y + side, x : x + side][mask], minlength=len(placed) + 1)
        if all(visible[k] - covered[k] >= MIN_VISIBLE * p.pixels for k, p in enumerate(placed, 1)):
            return y, x, box
    return None


def _compose(
    spec: CanvasSpec,
    images: np.ndarray,
    labels: np.ndarray,
    pool: _Pool,
    rng: np.random.Generator,
) -> _Canvas:
    """One canvas: clutter first, then 1..items[1] items drawn in order, later ones on top."""
    canvas = np.zeros((spec.size, spec.size), np.uint8)
    inst = np.zeros_like(canvas)
    clutter = [pool.next() for _ in range(int(rng.integers(0, spec.clutter + 1)))]
    for src in clutter:
        _draw_clutter(canvas, images[src], spec, rng)
    placed: list[_Item] = []
    for _ in range(int(rng.integers(spec.items[0], spec.items[1] + 1))):
        src = pool.next()
        side = round(rng.uniform(*spec.scale) * spec.size)
        item = _scaled(images[src], max(side, 8))
        mask = item >= MASK_THRESHOLD
        if int(mask.sum()) < _MIN_ITEM_PIXELS:
            continue
        spot = _place(item, mask, placed, inst, spec, rng)
        if spot is None:
            continue
        y, x, box = spot
        s = item.shape[0]
        canvas[y : y + s, x : x + s][mask] = item[mask]
        inst[y : y + s, x : x + s][mask] = len(placed) + 1
        placed.append(_Item(int(labels[src]), src, int(mask.sum()), box))
    return _Canvas(canvas, inst, placed, clutter)


def _canvases(
    spec: CanvasSpec, split: str, images: np.ndarray, labels: np.ndarray, indices: np.ndarray
) -> Iterator[_Canvas]:
    """The split's canvases in order, from its own seeded stream (independent of the others)."""
    rng = np.random.default_rng([spec.seed, SPLITS.index(split)])
    pool = _Pool(indices, rng)
    for _ in range(spec.counts[SPLITS.index(split)]):
        yield _compose(spec, images, labels, pool, rng)


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def _png(array: np.ndarray) -> bytes:
    """Grey 8-bit PNG bytes, no metadata (the same array gives the same bytes)."""
    buf = io.BytesIO()
    Image.fromarray(array, mode="L").save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def _visible_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Tight x1, y1, x2, y2 (x2, y2 exclusive) of a non-empty mask."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _categories() -> list[dict[str, Any]]:
    return [
        {"id": i + 1, "name": name, "supercategory": "fashion"}
        for i, name in enumerate(FASHION_MNIST_CLASSES)
    ]


def _write_split(
    tmp: Path, spec: CanvasSpec, split: str, canvases: Iterator[_Canvas], source: str
) -> dict[str, Any]:
    """Write one split's PNGs, YOLO labels and COCO json; return its counts for the manifest."""
    for folder in ("images", "labels", "semantic", "instances"):
        (tmp / folder / split).mkdir(parents=True)
    coco_images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    n = spec.size
    for i, canvas in enumerate(canvases):
        name = f"{i:06d}"
        semantic = np.zeros_like(canvas.instances)
        lines = []
        for k, item in enumerate(canvas.items, 1):
            mask = canvas.instances == k
            semantic[mask] = item.label + 1
            x1, y1, x2, y2 = _visible_box(mask)
            w, h = x2 - x1, y2 - y1
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": item.label + 1,
                    "bbox": [x1, y1, w, h],
                    "area": int(mask.sum()),
                    "iscrowd": 0,
                    "segmentation": rle_encode(mask),
                    "instance": k,
                    "source_index": item.source,
                }
            )
            cx, cy = (x1 + x2) / 2 / n, (y1 + y2) / 2 / n
            lines.append(f"{item.label} {cx:.6f} {cy:.6f} {w / n:.6f} {h / n:.6f}\n")
        coco_images.append(
            {
                "id": i + 1,
                "file_name": f"{name}.png",
                "width": n,
                "height": n,
                "clutter_sources": canvas.clutter,
            }
        )
        (tmp / "images" / split / f"{name}.png").write_bytes(_png(canvas.image))
        (tmp / "semantic" / split / f"{name}.png").write_bytes(_png(semantic))
        (tmp / "instances" / split / f"{name}.png").write_bytes(_png(canvas.instances))
        (tmp / "labels" / split / f"{name}.txt").write_text("".join(lines), encoding="utf-8")
    coco = {
        "info": {
            "description": f"tasprune canvas set ({split}): Fashion-MNIST {source} items on "
            f"{n} px canvases",
            "version": str(spec.version),
        },
        "licenses": [],
        "images": coco_images,
        "annotations": annotations,
        "categories": _categories(),
    }
    (tmp / "annotations").mkdir(exist_ok=True)
    text = json.dumps(coco, separators=(",", ":"))
    (tmp / "annotations" / f"{split}.json").write_text(text, encoding="utf-8")
    return {"canvases": len(coco_images), "items": len(annotations), "source": source}


def _write_set(
    tmp: Path, final: Path, spec: CanvasSpec, train_src: Any, test_src: Any, progress: bool
) -> None:
    """Every file of the set into ``tmp``; ``data.yaml`` already names ``final``."""
    train_images, test_images = train_src.images[:, 0].numpy(), test_src.images[:, 0].numpy()
    train_labels, test_labels = train_src.labels.numpy(), test_src.labels.numpy()
    pools = _split_pools(spec, len(train_images), len(test_images))
    tmp.mkdir()
    splits: dict[str, Any] = {}
    with contextlib.closing(
        tqdm(total=sum(spec.counts), desc="canvas set", disable=None if progress else True)
    ) as bar:
        for split in SPLITS:
            imgs, lbls, source = (
                (test_images, test_labels, "test")
                if split == "test"
                else (train_images, train_labels, "train")
            )
            canvases = _canvases(spec, split, imgs, lbls, pools[split])
            splits[split] = _write_split(tmp, spec, split, _ticking(canvases, bar), source)
    data_yaml = {
        "path": str(final.resolve()),
        **{split: str(final.resolve() / "images" / split) for split in SPLITS},
        "nc": len(FASHION_MNIST_CLASSES),
        "names": list(FASHION_MNIST_CLASSES),
    }
    (tmp / "data.yaml").write_text(yaml.safe_dump(data_yaml, sort_keys=False), encoding="utf-8")
    manifest = {
        "spec": spec.to_json(),
        "mask_threshold": MASK_THRESHOLD,
        "min_visible": MIN_VISIBLE,
        "classes": list(FASHION_MNIST_CLASSES),
        "splits": splits,
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def _ticking(canvases: Iterator[_Canvas], bar: Any) -> Iterator[_Canvas]:
    for canvas in canvases:
        yield canvas
        bar.update(1)
