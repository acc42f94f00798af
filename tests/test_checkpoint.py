"""Checkpoints and the file helpers under them: atomic writes, checksums, fallback, safety."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from tasprune.checkpoint import load_checkpoint, prev_path, save_checkpoint, sidecar_path
from tasprune.errors import CheckpointError, ConfigError, TaspruneError
from tasprune.utils import (
    JsonlLogger,
    atomic_write_bytes,
    atomic_write_text,
    count_params,
    pick_device,
    rng_state,
    seed_everything,
    set_rng_state,
)


def payload(epoch: int) -> dict[str, object]:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "epoch": epoch,
        "rng": rng_state(),
        "meta": {"model": "linear", "shape": {"w": [3, 2]}},
    }


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


# --------------------------------------------------------------------------- atomic writes


def test_atomic_write_roundtrip(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "f.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert no_temp_files(target.parent)


@pytest.mark.parametrize("fail", ["fsync", "write"])
def test_atomic_write_enospc_keeps_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail: str
) -> None:
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")

    def no_space(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if fail == "fsync":
        monkeypatch.setattr(os, "fsync", no_space)
    else:
        real_fdopen = os.fdopen

        class FullDisk(io.RawIOBase):
            """A file whose writes fail like a full disk (closes the real fd)."""

            def __init__(self, fd: int, *args: object, **kwargs: object) -> None:
                super().__init__()
                self.inner = real_fdopen(fd, "wb")

            def write(self, data: object) -> int:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            def close(self) -> None:
                self.inner.close()
                super().close()

        monkeypatch.setattr(os, "fdopen", FullDisk)
    with pytest.raises(TaspruneError) as info:
        atomic_write_bytes(target, b"new" * 1000)
    monkeypatch.undo()
    msg = str(info.value)
    assert f"cannot write {target}" in msg and "No space left on device" in msg
    assert "Fix: free disk space or choose another --out" in msg and "\n" not in msg
    assert target.read_bytes() == b"old"
    assert no_temp_files(tmp_path)


def test_atomic_write_permission_denied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "f.txt"
    atomic_write_text(target, "old")

    def denied(*args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(os, "replace", denied)
    with pytest.raises(TaspruneError, match="Permission denied. Fix: make .* writable"):
        atomic_write_text(target, "new")
    monkeypatch.undo()
    assert target.read_text() == "old"
    assert no_temp_files(tmp_path)


def test_save_checkpoint_enospc_keeps_old(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, payload(0))

    def no_space(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(CheckpointError, match="No space left on device"):
        save_checkpoint(path, payload(1))
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 0
    assert not prev_path(path).exists()
    assert no_temp_files(tmp_path)


# --------------------------------------------------------------------------- checkpoints


def test_save_load_rotates_prev(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, payload(0))
    assert (
        sidecar_path(path).read_text().split()[0] == hashlib.sha256(path.read_bytes()).hexdigest()
    )
    save_checkpoint(path, payload(1))
    assert prev_path(path) == tmp_path / "checkpoint.prev.pt"
    assert load_checkpoint(path)["epoch"] == 1
    assert load_checkpoint(prev_path(path))["epoch"] == 0
    loaded = load_checkpoint(path)
    assert loaded["meta"] == {"model": "linear", "shape": {"w": [3, 2]}}
    assert no_temp_files(tmp_path)


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_checksum_mismatch_falls_back_to_prev(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, payload(0))
    save_checkpoint(path, payload(1))
    _corrupt(path)
    with caplog.at_level(logging.WARNING, logger="tasprune.checkpoint"):
        loaded = load_checkpoint(path)
    assert loaded["epoch"] == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(path) in m and "checksum mismatch" in m for m in warnings), warnings


def test_corrupt_current_never_rotated_over_good_prev(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, payload(0))
    save_checkpoint(path, payload(1))
    _corrupt(path)
    save_checkpoint(path, payload(2))  # the corrupted epoch-1 file must not become .prev
    assert load_checkpoint(prev_path(path))["epoch"] == 0
    assert load_checkpoint(path)["epoch"] == 2


def test_checksum_mismatch_without_prev_raises(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, payload(0))
    _corrupt(path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert f"checkpoint {path} is corrupted (checksum mismatch)" in msg
    assert "no earlier good checkpoint exists. Fix: delete it" in msg


def test_truncated_without_sidecar_raises(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, payload(0))
    sidecar_path(path).unlink()
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="corrupted .*truncated"):
        load_checkpoint(path)


def test_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


class Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["pickle", "torch"])
def test_malicious_pickle_is_not_executed(tmp_path: Path, writer: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "checkpoint.pt"
    if writer == "pickle":
        path.write_bytes(pickle.dumps({"model": Evil(marker)}, protocol=2))
    else:
        torch.save({"model": Evil(marker)}, path)
    # A matching checksum proves it is weights_only, not the checksum, that stops it.
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    sidecar_path(path).write_text(f"{digest}  {path.name}\n")
    with pytest.raises(CheckpointError, match="refused for safety"):
        load_checkpoint(path)
    assert not marker.exists()


class Custom:
    pass


def test_unserialisable_payload(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="cannot serialise"):
        save_checkpoint(tmp_path / "c.pt", {"f": lambda: 1})
    with pytest.raises(CheckpointError, match="weights-only load refuses.*Fix: store only"):
        save_checkpoint(tmp_path / "c.pt", {"obj": Custom()})
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- utils


def test_rng_state_survives_weights_only_roundtrip(tmp_path: Path) -> None:
    seed_everything(3)
    state = rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(3))
    buf = io.BytesIO()
    torch.save({"rng": state}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)["rng"]
    seed_everything(99)
    set_rng_state(loaded)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert again[0] == expected[0] and again[1] == expected[1]
    assert torch.equal(again[2], expected[2])


def test_set_rng_state_malformed() -> None:
    with pytest.raises(TaspruneError, match="malformed"):
        set_rng_state({"python": {}})


def test_jsonl_logger_truncate(tmp_path: Path) -> None:
    log = JsonlLogger(tmp_path / "h.jsonl")
    for e in range(4):
        log.log({"epoch": e, "loss": 1.0 / (e + 1), "bad": float("nan")})
    with open(log.path, "a") as fh:
        fh.write('{"epoch": 4, "lo')  # torn last line from a crash
    assert log.truncate_after(1) == 2
    rows = [json.loads(line) for line in log.path.read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1] and rows[0]["bad"] is None
    log.log({"epoch": 2})
    assert [r["epoch"] for r in log.rows()] == [0, 1, 2]
    assert log.truncate_after(-1) == 3 and log.rows() == []


def test_pick_device_and_count_params() -> None:
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type in {"cpu", "cuda", "mps"}
    with pytest.raises(ConfigError, match="Fix"):
        pick_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            pick_device("cuda")
    lin = torch.nn.Linear(3, 2)
    lin.bias.requires_grad_(False)
    assert count_params(lin) == 8 and count_params(lin, trainable_only=True) == 6
