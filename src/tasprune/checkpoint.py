"""Crash-safe, checksummed, pickle-safe checkpoints.

Layout for ``path = out/checkpoint.pt``::

    out/checkpoint.pt            torch.save bytes of the payload
    out/checkpoint.pt.sha256     "<hex>  checkpoint.pt" (written after the data)
    out/checkpoint.prev.pt       the previous checkpoint that verified, kept as a fallback
    out/checkpoint.prev.pt.sha256

Every file is written temp-file + fsync + ``os.replace``, in an order where a crash at any
point leaves at least one checkpoint that verifies. Loading uses ``torch.load(weights_only=
True)`` only, so a file that tries to run code while unpickling is refused, never executed.

Payload convention (tensors and plain python values only)::

    {"model": state_dict, "optimizer": ..., "scheduler": ..., "epoch": int (last COMPLETED
     epoch, 0-based), "rng": utils.rng_state(), "meta": {JSON-able: model name, shape, ...}}
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tasprune.errors import CheckpointError
from tasprune.models import create_model
from tasprune.utils import atomic_write_text, replace_file, write_temp_file
from tasprune.weights import load_weights

logger = logging.getLogger(__name__)

__all__ = [
    "checkpoint_exists",
    "load_checkpoint",
    "load_model_checkpoint",
    "prev_path",
    "resolve_model_file",
    "save_checkpoint",
    "sidecar_path",
]


def sidecar_path(path: str | os.PathLike[str]) -> Path:
    """The checksum file that belongs to ``path`` (``path + ".sha256"``)."""
    p = Path(path)
    return p.with_name(p.name + ".sha256")


def prev_path(path: str | os.PathLike[str]) -> Path:
    """The fallback copy of ``path``: ``checkpoint.pt`` -> ``checkpoint.prev.pt``."""
    return Path(path).with_suffix(".prev.pt")


def checkpoint_exists(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` or its ``.prev.pt`` fallback exists (a resume is possible)."""
    return Path(path).exists() or prev_path(path).exists()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_digest(path: Path) -> str | None:
    """The hex digest recorded for ``path``, or None when there is no (readable) sidecar."""
    side = sidecar_path(path)
    try:
        text = side.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    token = text.split()[0] if text else ""
    return token.lower() if len(token) == 64 else None


def _write_sidecar(path: Path, digest: str) -> None:
    atomic_write_text(sidecar_path(path), f"{digest}  {path.name}\n", error_cls=CheckpointError)


def _verifies(path: Path) -> bool:
    """True when ``path`` exists and matches its recorded checksum."""
    digest = _read_digest(path)
    if digest is None:
        return False
    try:
        return _sha256(path.read_bytes()) == digest
    except OSError:
        return False


def save_checkpoint(path: str | os.PathLike[str], payload: dict[str, Any]) -> None:
    """Serialise ``payload`` and write it to ``path`` atomically with a sha256 sidecar.

    The bytes are test-loaded with ``weights_only=True`` first, so a payload that could not be
    resumed from (a custom class, a numpy array) fails here with a clear line, not at resume.

    Order (each step atomic): 1) the new bytes go to an fsynced temp file — a full disk fails
    here and touches nothing; 2) if the current ``path`` verifies it becomes ``.prev.pt``
    (its sidecar first); 3) the temp file replaces ``path``; 4) the new sidecar is written.
    A crash between 3 and 4 leaves a stale sidecar, so loading falls back to ``.prev.pt``.
    A current file that does NOT verify is never rotated over a good ``.prev.pt``.
    """
    target = Path(path)
    buf = io.BytesIO()
    try:
        torch.save(payload, buf)
    except (pickle.PicklingError, TypeError, AttributeError) as err:
        raise CheckpointError(
            f"cannot serialise checkpoint {target}: {err}. "
            "Fix: payload values must be tensors or plain python types"
        ) from err
    data = buf.getvalue()
    try:  # refuse now what a weights-only load would refuse at resume time
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).splitlines()[-1].strip() if str(err) else type(err).__name__
        raise CheckpointError(
            f"cannot save checkpoint {target}: the payload holds objects a weights-only load "
            f"refuses ({first[:160]}). Fix: store only tensors and plain python values"
        ) from err
    digest = _sha256(data)
    tmp = write_temp_file(target, data, error_cls=CheckpointError)
    try:
        if target.exists():
            old_digest = _read_digest(target)
            if old_digest is not None and _verifies(target):
                prev = prev_path(target)
                _write_sidecar(prev, old_digest)
                replace_file(target, prev, error_cls=CheckpointError)
        replace_file(tmp, target, error_cls=CheckpointError)
    finally:
        if tmp.exists():
            tmp.unlink(missing_ok=True)
    _write_sidecar(target, digest)
    logger.debug("saved checkpoint %s (%d bytes, sha256 %s)", target, len(data), digest[:12])


class _BadCheckpoint(Exception):
    """Internal: why one file could not be used (message is a short reason)."""


def _load_one(path: Path, map_location: str | torch.device) -> dict[str, Any]:
    """Verify and weights-only load one file, or raise _BadCheckpoint with the reason."""
    try:
        data = path.read_bytes()
    except FileNotFoundError as err:
        raise _BadCheckpoint("missing") from err
    except OSError as err:
        raise _BadCheckpoint(f"unreadable: {err.strerror or err}") from err
    digest = _read_digest(path)
    if digest is None:
        # No sidecar: a file copied by hand, or a crash before the first sidecar write.
        # The data itself was fsynced before it was renamed into place, so try it.
        logger.warning("checkpoint %s has no checksum file; loading it unverified", path)
    elif _sha256(data) != digest:
        raise _BadCheckpoint("checksum mismatch")
    try:
        obj = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower() or "weights_only" in str(err).lower():
            raise _BadCheckpoint(
                "it contains objects other than tensors and plain values, refused for safety"
            ) from err
        raise _BadCheckpoint(f"unpickling failed: {str(err).splitlines()[0]}") from err
    except (RuntimeError, EOFError, ValueError, OSError, KeyError, AttributeError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise _BadCheckpoint(f"truncated or unreadable: {first}") from err
    if not isinstance(obj, dict):
        raise _BadCheckpoint(f"it holds a {type(obj).__name__}, not a checkpoint dict")
    return obj


def load_checkpoint(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`, falling back to ``.prev.pt``.

    The checksum is verified and the bytes are loaded with ``weights_only=True`` only. If the
    file is corrupted (checksum mismatch, truncation, unpickling error, unsafe content) a
    WARNING names it and the ``.prev.pt`` copy is used if it loads cleanly; otherwise a
    :class:`CheckpointError` says what is wrong and how to recover.
    """
    target = Path(path)
    try:
        return _load_one(target, map_location)
    except _BadCheckpoint as err:
        reason = str(err)
    prev = prev_path(target)
    if reason == "missing" and not prev.exists():
        raise CheckpointError(
            f"checkpoint {target} does not exist. Fix: check the path, or run the stage "
            "that writes it first"
        )
    if prev.exists():
        logger.warning(
            "checkpoint %s is unusable (%s); falling back to the previous one %s",
            target,
            reason,
            prev,
        )
        try:
            return _load_one(prev, map_location)
        except _BadCheckpoint as prev_err:
            raise CheckpointError(
                f"checkpoint {target} is unusable ({reason}) and the earlier one {prev} is "
                f"unusable too ({prev_err}). Fix: delete both to restart the stage"
            ) from prev_err
    raise CheckpointError(
        f"checkpoint {target} is corrupted ({reason}) and no earlier good checkpoint exists. "
        "Fix: delete it to restart the stage"
    )


# --------------------------------------------------------------------------- stored networks


def resolve_model_file(path: str | Path, prefer: tuple[str, ...] = ("student", "teacher")) -> Path:
    """A ``model.pt`` from a file, a fit folder, or a run folder (its ``prefer`` sub-folders)."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        for cand in [*(p / sub / "model.pt" for sub in prefer), p / "model.pt"]:
            if cand.is_file():
                return cand
        raise CheckpointError(
            f"{p} holds no model.pt (looked in {', '.join(prefer)}/ and the folder itself). "
            "Fix: pass a run folder whose stage finished, or a model.pt file"
        )
    raise CheckpointError(f"{p} does not exist. Fix: pass a run folder or a model.pt file")


def load_model_checkpoint(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the network stored in a ``model.pt`` from its meta; returns (model, meta)."""
    payload = load_checkpoint(path)
    meta = payload.get("meta")
    if not isinstance(meta, dict) or "model" not in meta or "shape" not in meta:
        raise CheckpointError(
            f"{path} has no model meta (model name and shape). Fix: use a model.pt written by "
            "tasprune train/run/distill"
        )
    from tasprune.models.legacy import upgrade_shape

    shape = upgrade_shape(str(meta["model"]), meta["shape"])
    legacy = shape.to_dict() != dict(meta["shape"])
    meta["shape"] = shape.to_dict()  # a 0.x checkpoint's shape in this version's keys
    model = create_model(
        str(meta["model"]),
        shape,
        num_classes=int(meta.get("num_classes", 10)),
        in_channels=int(meta.get("in_channels", 3)),
    )
    try:
        load_weights(model, payload["model"])
    except (KeyError, RuntimeError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        if legacy:
            raise CheckpointError(
                f"{path} comes from tasprune 0.x, whose pruned {meta['model']} had other "
                f"shortcut layers ({first}). Fix: distill the student again with this version"
            ) from None
        raise CheckpointError(
            f"weights in {path} do not fit {meta['model']} at its stored shape ({first}). "
            "Fix: the file is damaged or was edited; retrain that stage"
        ) from None
    return model, meta
