"""The shipped datasets read from their official files into memory (`ArrayDataset`).

Fashion-MNIST (idx files, the Debian package's copy when no folder holds one), CIFAR-10/100
(python pickle batches) and small ImageFolder trees (`tasprune.imagefolder`). Everything that
reads a file validates it and turns any problem into a :class:`DataError` whose message names
the file, the problem and the fix (the CLI prints ``str(err)`` as its one line). CIFAR pickles
are read with a restricted unpickler that can only rebuild numpy arrays, so a tampered file
cannot execute code.
"""

from __future__ import annotations

import gzip
import importlib
import math
import pickle
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tasprune.arrays import ArrayDataset
from tasprune.errors import DataError
from tasprune.imagefolder import load_imagefolder

__all__ = ["DATASETS", "DATASET_STATS", "SYSTEM_FASHION_MNIST", "load_dataset"]


#: Where the Debian package ``dataset-fashion-mnist`` installs the idx files.
SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

#: Known in-memory dataset names accepted by :func:`load_dataset`.
DATASETS: tuple[str, ...] = ("fashion-mnist", "cifar10", "cifar100", "imagefolder")

_SPLITS: tuple[str, ...] = ("train", "test")

# Per-channel statistics on the 0-1 scale (standard published constants, so nothing has to be
# computed at load time and every run normalises identically).
_FASHION_MEAN: tuple[float, ...] = (0.2860,)
_FASHION_STD: tuple[float, ...] = (0.3530,)
_CIFAR10_MEAN: tuple[float, ...] = (0.4914, 0.4822, 0.4465)
_CIFAR10_STD: tuple[float, ...] = (0.2470, 0.2435, 0.2616)
_CIFAR100_MEAN: tuple[float, ...] = (0.5071, 0.4865, 0.4409)
_CIFAR100_STD: tuple[float, ...] = (0.2673, 0.2564, 0.2762)

#: Published per-channel (mean, std) of the shipped datasets, by name.
DATASET_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "fashion-mnist": (_FASHION_MEAN, _FASHION_STD),
    "cifar10": (_CIFAR10_MEAN, _CIFAR10_STD),
    "cifar100": (_CIFAR100_MEAN, _CIFAR100_STD),
}

_IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned byte, 3 dimensions
_IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned byte, 1 dimension


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_dataset(
    name: str, split: str, root: str | Path | None = None, *, image_size: int | None = None
) -> ArrayDataset:
    """Load an in-memory dataset split (``"train"`` or ``"test"``) from its official files.

    ``name`` is one of :data:`DATASETS`. ``root`` is the data folder (``--data-root``); for
    Fashion-MNIST the system copy from ``dataset-fashion-mnist`` is used when ``root`` does not
    hold one. ``imagefolder`` reads ``root/train`` and ``root/val`` (resized to ``image_size``
    when given). Raises :class:`DataError` for unknown names, missing or corrupt files.
    """
    key = name.strip().lower()
    if split not in _SPLITS:
        raise DataError(
            f"unknown split {split!r} for dataset {name!r}. Fix: use one of {', '.join(_SPLITS)}"
        )
    root_path = Path(root).expanduser() if root is not None else None
    if key in ("fashion-mnist", "fashion_mnist", "fashionmnist"):
        return _load_fashion_mnist(split, root_path)
    if key in ("cifar10", "cifar-10"):
        return _load_cifar(10, split, root_path)
    if key in ("cifar100", "cifar-100"):
        return _load_cifar(100, split, root_path)
    if key == "imagefolder":
        if root_path is None:
            raise DataError("dataset 'imagefolder' needs a folder. Fix: pass --data-root DIR")
        return load_imagefolder(root_path, split, image_size)
    raise DataError(f"unknown dataset {name!r}. Fix: use one of {', '.join(DATASETS)}")


# ---- Fashion-MNIST (idx format) ------------------------------------------------------------

_FASHION_SOURCE = (
    "apt-get install dataset-fashion-mnist or pass --data-root DIR containing FashionMNIST/raw"
)
_FASHION_FIX = f"Fix: {_FASHION_SOURCE}"


def _fashion_dirs(root: Path | None) -> list[Path]:
    """Folders searched for Fashion-MNIST idx files, in priority order.

    A folder the user named is the only place looked at (never a silent fallback to the
    system copy); without one, the Debian package's copy is used.
    """
    if root is None:
        return [SYSTEM_FASHION_MNIST]
    return [root / "FashionMNIST" / "raw", root / "fashion-mnist", root]


def _check_root(root: Path | None, what: str) -> None:
    """Refuse a data folder the user named that does not exist (no fallback elsewhere)."""
    if root is not None and not root.is_dir():
        raise DataError(
            f"data root {root} does not exist. Fix: pass the folder that holds {what}, or "
            "leave --data-root out to use the default place"
        )


def _find_idx(folder: Path, stem: str) -> Path | None:
    """Return ``folder/stem.gz`` or ``folder/stem`` if either exists (gzip preferred)."""
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def _load_fashion_mnist(split: str, root: Path | None) -> ArrayDataset:
    """Find and parse the Fashion-MNIST idx pair for ``split``."""
    prefix = "train" if split == "train" else "t10k"
    img_stem, lbl_stem = f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"
    _check_root(root, "FashionMNIST/raw")
    dirs = _fashion_dirs(root)
    for folder in dirs:
        img_file = _find_idx(folder, img_stem)
        if img_file is None:
            continue
        lbl_file = _find_idx(folder, lbl_stem)
        if lbl_file is None:
            raise DataError(
                f"Fashion-MNIST labels missing: {folder} has {img_file.name} but no "
                f"{lbl_stem}.gz. Fix: copy {lbl_stem}.gz next to it, apt-get install "
                "dataset-fashion-mnist or pass --data-root DIR containing FashionMNIST/raw"
            )
        images = _read_idx(img_file, _IDX_IMAGES_MAGIC)
        labels = _read_idx(lbl_file, _IDX_LABELS_MAGIC)
        if labels.shape[0] != images.shape[0]:
            raise DataError(
                f"Fashion-MNIST file mismatch: {lbl_file} has {labels.shape[0]} labels but "
                f"{img_file} has {images.shape[0]} images. Fix: re-download both files of the "
                f"{split} split ({_FASHION_SOURCE})"
            )
        if labels.size and int(labels.max()) >= 10:
            raise DataError(
                f"corrupt Fashion-MNIST labels: {lbl_file} contains label {int(labels.max())} "
                f"(expected 0-9). Fix: re-download the file ({_FASHION_SOURCE})"
            )
        return ArrayDataset(
            images=torch.from_numpy(images.copy()).unsqueeze(1),
            labels=torch.from_numpy(labels.astype(np.int64)),
            num_classes=10,
            mean=_FASHION_MEAN,
            std=_FASHION_STD,
            name="fashion-mnist",
        )
    searched = ", ".join(str(d) for d in dirs)
    fix = (
        f"Fix: put the four idx .gz files in {root}/FashionMNIST/raw, or leave --data-root out "
        "to use the system copy (apt-get install dataset-fashion-mnist)"
        if root is not None
        else _FASHION_FIX
    )
    raise DataError(f"Fashion-MNIST not found: none of {searched} has {img_stem}.gz. {fix}")


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """Parse one idx file (optionally gzipped) and check magic, dimensions and exact length."""
    fix = f"Fix: re-download {path.name} ({_FASHION_SOURCE})"
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                raw = fh.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise DataError(f"cannot read idx file {path}: {exc}. {fix}") from exc
    if len(raw) < 4:
        raise DataError(f"truncated idx file {path}: only {len(raw)} bytes. {fix}")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise DataError(f"corrupt idx file {path}: magic number {found}, expected {magic}. {fix}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"truncated idx file {path}: header cut short. {fix}")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = math.prod(dims)
    have = len(raw) - header
    if have != expected:
        what = "truncated" if have < expected else "corrupt"
        raise DataError(
            f"{what} idx file {path}: header promises {'x'.join(map(str, dims))} = {expected} "
            f"bytes of data but the file has {have}. {fix}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


# ---- CIFAR (python pickle batches) ---------------------------------------------------------


def _numpy_attr(modules: Sequence[str], attr: str) -> Any:
    """Return ``attr`` from the first importable module (numpy 2 moved ``core`` to ``_core``)."""
    for mod in modules:
        try:
            return getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError):
            continue
    raise pickle.UnpicklingError(f"numpy has no {attr} in {', '.join(modules)}")


# (module, name) pairs a CIFAR batch may reference; each maps to the modules to resolve from.
_MULTIARRAY = ("numpy._core.multiarray", "numpy.core.multiarray")
_NUMERIC = ("numpy._core.numeric", "numpy.core.numeric")
_SAFE_GLOBALS: dict[tuple[str, str], tuple[tuple[str, ...], str]] = {
    ("numpy.core.multiarray", "_reconstruct"): (_MULTIARRAY, "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): (_MULTIARRAY, "_reconstruct"),
    ("numpy.core.multiarray", "scalar"): (_MULTIARRAY, "scalar"),
    ("numpy._core.multiarray", "scalar"): (_MULTIARRAY, "scalar"),
    ("numpy.core.numeric", "_frombuffer"): (_NUMERIC, "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"): (_NUMERIC, "_frombuffer"),
    ("numpy", "ndarray"): (("numpy",), "ndarray"),
    ("numpy", "dtype"): (("numpy",), "dtype"),
    # Python 3 writes bytes as _codecs.encode(str, "latin1") under pickle protocol <= 2.
    ("_codecs", "encode"): (("_codecs",), "encode"),
}


class _SafeUnpickler(pickle.Unpickler):
    """Unpickler that can only rebuild numpy arrays, dicts, lists, strings and numbers.

    ``pickle.load`` executes whatever callable a file names; CIFAR batches only ever need the
    numpy array reconstructors, so every other global is refused before it is imported.
    """

    def __init__(self, fh: Any, path: Path) -> None:
        super().__init__(fh, encoding="bytes")
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        """Resolve only allow-listed numpy globals; anything else raises :class:`DataError`."""
        entry = _SAFE_GLOBALS.get((module, name))
        if entry is None:
            raise DataError(
                f"unsafe pickle refused: {self._path} references {module}.{name}, which a CIFAR "
                "batch never needs (the file may be tampered with). Fix: delete it and "
                "re-download the official CIFAR python archive"
            )
        return _numpy_attr(*entry)


def _unpickle(path: Path) -> Any:
    """Load one pickle file with :class:`_SafeUnpickler`, mapping every failure to DataError."""
    fix = "Fix: delete it and re-extract the official CIFAR python archive"
    try:
        with path.open("rb") as fh:
            return _SafeUnpickler(fh, path).load()
    except DataError:
        raise
    except OSError as exc:
        raise DataError(f"cannot read CIFAR batch {path}: {exc}. {fix}") from exc
    except Exception as exc:  # truncated/garbled pickles raise many different types
        raise DataError(
            f"corrupt or truncated CIFAR batch {path}: {type(exc).__name__}: {exc}. {fix}"
        ) from exc


def _load_cifar(classes: int, split: str, root: Path | None) -> ArrayDataset:
    """Read the official python-pickle CIFAR-10/100 batches for ``split``."""
    if classes == 10:
        folder_name, label_key = "cifar-10-batches-py", b"labels"
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        mean, std, name = _CIFAR10_MEAN, _CIFAR10_STD, "cifar10"
    else:
        folder_name, label_key = "cifar-100-python", b"fine_labels"
        files = ["train"] if split == "train" else ["test"]
        mean, std, name = _CIFAR100_MEAN, _CIFAR100_STD, "cifar100"
    _check_root(root, folder_name)
    base = root if root is not None else Path("data")
    candidates = [base / folder_name, base]
    folder = next((d for d in candidates if (d / files[0]).is_file()), None)
    if folder is None:
        raise DataError(
            f"{name} not found: {base / folder_name} has no {files[0]}. Fix: extract the "
            f"official python archive so that DIR/{folder_name}/{files[0]} exists and pass "
            "--data-root DIR"
        )
    images: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for fname in files:
        path = folder / fname
        if not path.is_file():
            raise DataError(
                f"{name} incomplete: {path} is missing. Fix: re-extract the official python "
                f"archive into {folder.parent}"
            )
        x, y = _parse_cifar_batch(_unpickle(path), path, label_key, classes)
        images.append(x)
        labels.append(y)
    data = np.concatenate(images).reshape(-1, 3, 32, 32)
    return ArrayDataset(
        images=torch.from_numpy(np.ascontiguousarray(data)),
        labels=torch.from_numpy(np.concatenate(labels)),
        num_classes=classes,
        mean=mean,
        std=std,
        name=name,
    )


def _parse_cifar_batch(
    batch: Any, path: Path, label_key: bytes, classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Validate one unpickled CIFAR batch dict and return (uint8 N x 3072, int64 N)."""
    fix = "Fix: delete it and re-extract the official CIFAR python archive"
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        keys = sorted(map(str, batch)) if isinstance(batch, dict) else type(batch).__name__
        raise DataError(
            f"corrupt CIFAR batch {path}: expected a dict with b'data' and {label_key!r}, got "
            f"{keys}. {fix}"
        )
    data = batch[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise DataError(f"corrupt CIFAR batch {path}: b'data' is not a uint8 N x 3072 array. {fix}")
    if data.shape[1] != 3 * 32 * 32:
        raise DataError(
            f"corrupt CIFAR batch {path}: rows have {data.shape[1]} bytes, expected 3072. {fix}"
        )
    try:
        labels = np.asarray(batch[label_key], dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise DataError(f"corrupt CIFAR batch {path}: unreadable labels ({exc}). {fix}") from exc
    if labels.shape[0] != data.shape[0]:
        raise DataError(
            f"corrupt CIFAR batch {path}: {labels.shape[0]} labels for {data.shape[0]} images. "
            f"{fix}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        raise DataError(
            f"corrupt CIFAR batch {path}: labels outside 0-{classes - 1} "
            f"(min {labels.min()}, max {labels.max()}). {fix}"
        )
    return data, labels
