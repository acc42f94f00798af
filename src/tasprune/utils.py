"""Small shared helpers: seeding, RNG snapshots, device choice, JSONL history, atomic writes.

Everything that ends up inside a checkpoint (``rng_state``) is made of tensors and plain
python values only, so checkpoints load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import random
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tasprune.errors import ConfigError, TaspruneError

logger = logging.getLogger(__name__)

__all__ = [
    "JsonlLogger",
    "atomic_write_bytes",
    "atomic_write_text",
    "replace_file",
    "write_temp_file",
    "count_params",
    "pick_device",
    "rng_state",
    "seed_everything",
    "set_rng_state",
]


# --------------------------------------------------------------------------- seeding / RNG


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device).

    With ``deterministic`` torch is asked for deterministic kernels. ``warn_only=True`` is
    used because a few CPU/CUDA ops have no deterministic variant; those warn instead of
    aborting a run (on CPU the ops this package uses are deterministic for a fixed thread
    count). cuDNN autotuning is switched off in that mode, on otherwise.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if deterministic:
        # cuBLAS needs a fixed workspace for reproducible GEMMs; harmless on CPU.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    else:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True


def rng_state() -> dict[str, Any]:
    """Snapshot every RNG (python, numpy, torch CPU, CUDA) as tensors and plain values.

    The result survives ``torch.save`` + ``torch.load(weights_only=True)``: numpy's uint32
    key array and python's state tuple are stored as int64 tensors.
    """
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {
            "version": int(py_version),
            "state": torch.tensor(py_state, dtype=torch.int64),
            "gauss": py_gauss,
        },
        "numpy": {
            "name": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64).copy()),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
        "cuda": [],
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore a snapshot made by :func:`rng_state` (after a weights-only load too)."""
    try:
        py = state["python"]
        random.setstate(
            (int(py["version"]), tuple(int(v) for v in py["state"].tolist()), py["gauss"])
        )
        npy = state["numpy"]
        keys = np.asarray(npy["keys"].cpu().numpy(), dtype=np.uint32)
        np.random.set_state(
            (npy["name"], keys, int(npy["pos"]), int(npy["has_gauss"]), float(npy["gauss"]))
        )
        torch.set_rng_state(state["torch"].cpu().to(torch.uint8))
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as err:
        raise TaspruneError(
            f"the saved random-number state is malformed ({type(err).__name__}: {err}). "
            "Fix: delete the checkpoint to restart the stage"
        ) from err
    cuda_states = list(state.get("cuda") or [])
    if cuda_states and torch.cuda.is_available():
        n = min(len(cuda_states), torch.cuda.device_count())
        if n != len(cuda_states):
            logger.warning(
                "checkpoint has RNG states for %d CUDA devices, this machine has %d; "
                "restoring the first %d",
                len(cuda_states),
                torch.cuda.device_count(),
                n,
            )
        for i in range(n):
            torch.cuda.set_rng_state(cuda_states[i].cpu().to(torch.uint8), device=i)


# --------------------------------------------------------------------------- devices / models


def pick_device(name: str = "auto") -> torch.device:
    """Resolve a device name: ``auto`` picks CUDA, then Apple MPS, then CPU.

    Explicit names (``cpu``, ``cuda``, ``cuda:1``, ``mps``) are checked for availability so a
    typo or a missing GPU is a one-line :class:`ConfigError`, not a crash mid-run.
    """
    name = name.strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as err:
        raise ConfigError(
            f"unknown device {name!r}. Fix: use auto, cpu, cuda, cuda:N or mps"
        ) from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device {name!r} requested but CUDA is not available on this machine. "
                "Fix: use --device cpu (or auto)"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {name!r} requested but only {torch.cuda.device_count()} CUDA "
                "device(s) exist. Fix: pick an index below that, or use auto"
            )
    elif device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ConfigError(
                f"device {name!r} requested but MPS is not available. Fix: use --device cpu"
            )
    elif device.type != "cpu":
        raise ConfigError(f"unsupported device {name!r}. Fix: use auto, cpu, cuda, cuda:N or mps")
    return device


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# --------------------------------------------------------------------------- atomic writes


def _oserror_line(path: Path, err: OSError) -> str:
    """One user-facing line for a failed write: what, why, and how to fix it."""
    reason = err.strerror or str(err)
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free disk space or choose another --out"
    elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = f"make {path.parent} writable or choose another --out"
    elif err.errno == errno.ENOENT:
        fix = f"check that {path.parent} exists or choose another --out"
    else:
        fix = "check the output folder or choose another --out"
    return f"cannot write {path}: {reason}. Fix: {fix}"


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable (best effort: not every OS/filesystem lets a folder be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_temp_file(
    path: str | os.PathLike[str], data: bytes, *, error_cls: type[TaspruneError] = TaspruneError
) -> Path:
    """Write ``data`` to a fresh fsynced temp file next to ``path`` and return its path.

    Used by :func:`atomic_write_bytes` and by checkpoint rotation, which needs the data safely
    on disk *before* it touches the existing files. On failure the temp file is removed and
    ``error_cls`` is raised with one line naming the problem and the fix.
    """
    target = Path(path)
    tmp_name: str | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        # mkstemp creates 0600 files; give the result the mode a plain open() would (umask).
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as fh:
            view = memoryview(data)
            while view:
                written = fh.write(view)
                view = view[written:]
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as err:
        if tmp_name is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
        raise error_cls(_oserror_line(target, err)) from err
    return Path(tmp_name)


def replace_file(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    error_cls: type[TaspruneError] = TaspruneError,
) -> None:
    """``os.replace`` + folder fsync, with OSError turned into a one-line ``error_cls``."""
    target = Path(dst)
    try:
        os.replace(src, target)
    except OSError as err:
        with contextlib.suppress(OSError):
            if Path(src).name.endswith(".tmp"):
                os.unlink(src)
        raise error_cls(_oserror_line(target, err)) from err
    _fsync_dir(target.parent)


def atomic_write_bytes(
    path: str | os.PathLike[str], data: bytes, *, error_cls: type[TaspruneError] = TaspruneError
) -> None:
    """Replace ``path`` with ``data`` all-or-nothing.

    The bytes go to a temp file in the same folder, are fsynced, then ``os.replace``-d over
    ``path``; a crash or a full disk leaves the old file intact. OSErrors (ENOSPC, EACCES, ...)
    become ``error_cls`` with a line like "cannot write X: No space left on device. Fix: ...".
    """
    tmp = write_temp_file(path, data, error_cls=error_cls)
    replace_file(tmp, path, error_cls=error_cls)


def atomic_write_text(
    path: str | os.PathLike[str], text: str, *, error_cls: type[TaspruneError] = TaspruneError
) -> None:
    """UTF-8 text version of :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"), error_cls=error_cls)


# --------------------------------------------------------------------------- JSONL history


def _json_safe(value: Any) -> Any:
    """Non-finite floats become ``None`` so every row is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


class JsonlLogger:
    """Append-only JSON-lines file, one row per call, flushed and fsynced per row.

    On resume call :meth:`truncate_after` with the checkpoint's epoch so rows written after the
    last checkpoint (a crash between "log row" and "save checkpoint") are not duplicated.
    With ``tensorboard`` the rows' numbers also go to ``<folder>/tensorboard`` (step = epoch).
    """

    def __init__(self, path: str | os.PathLike[str], *, tensorboard: bool = False) -> None:
        self.path = Path(path)
        self.tensorboard: Any = None
        if tensorboard:
            from tasprune.tracking import TensorBoardMirror

            self.tensorboard = TensorBoardMirror(self.path.parent / "tensorboard")

    def log(self, row: dict[str, Any]) -> None:
        """Append one row (a JSON object) and make it durable."""
        if self.tensorboard is not None:
            epoch = row.get("epoch")
            self.tensorboard.scalars(row, epoch if isinstance(epoch, int) else None)
        line = json.dumps(_json_safe(row), sort_keys=False) + "\n"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as err:
            raise TaspruneError(_oserror_line(self.path, err)) from err

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows())

    def rows(self) -> list[dict[str, Any]]:
        """All well-formed rows; a torn last line (crash mid-write) is skipped with a warning."""
        if not self.path.exists():
            return []
        rows: list[dict[str, Any]] = []
        with open(self.path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    logger.warning("%s:%d is not valid JSON; dropping that row", self.path, lineno)
                    continue
                if isinstance(row, dict):
                    rows.append(row)
        return rows

    def truncate_after(self, epoch: int) -> int:
        """Drop rows whose ``epoch`` is greater than ``epoch``; return how many were dropped.

        ``truncate_after(-1)`` empties the history (a restart from scratch). Rows without an
        ``epoch`` key are kept. The file is rewritten atomically.
        """
        if self.tensorboard is not None:
            self.tensorboard.purge(epoch + 1)
        if not self.path.exists():
            return 0
        rows = self.rows()
        kept = [r for r in rows if not isinstance(r.get("epoch"), int) or r["epoch"] <= epoch]
        dropped = len(rows) - len(kept)
        text = "".join(json.dumps(r) + "\n" for r in kept)
        if dropped or text != self.path.read_text(encoding="utf-8"):
            atomic_write_text(self.path, text)
        return dropped


def read_json_object(path: Path) -> dict[str, Any] | None:
    """The JSON object stored in ``path``; None when missing, unreadable, or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None
