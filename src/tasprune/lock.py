"""One writer per run folder: an exclusive ``flock`` on ``DIR/.lock``.

Why: two processes resuming the same folder would interleave checkpoints and history rows and
each silently overwrite the other's work. ``run``/``train``/``search``/``distill`` hold the lock
for their whole life; a second process pointed at the folder refuses at once with one line
naming the holder (pid, host, start time), before it writes anything.

A lock left behind by a killed process never blocks: the kernel drops a ``flock`` when its
holder dies, so the next process simply takes it (and overwrites the stale holder record). The
lock file is removed on release; acquiring re-checks that the file it locked is still the one
at ``DIR/.lock`` so a release racing with an acquire cannot give two holders. Within one process
the lock is re-entrant (the CLI and :func:`tasprune.pipeline.run` both take it).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tasprune.errors import RunInUseError, TaspruneError

try:  # POSIX only; elsewhere the folder is used unlocked (with a warning).
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

__all__ = ["LOCK_NAME", "RunLock", "lock_holder", "run_lock"]

LOCK_NAME = ".lock"

# Locks this process holds: resolved folder -> [open fd, depth, created the folder?].
_HELD: dict[Path, list[Any]] = {}


def lock_holder(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The holder record written into ``folder/.lock`` (pid, host, started, argv), if readable."""
    try:
        data = json.loads((Path(folder) / LOCK_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _in_use_line(folder: Path, holder: dict[str, Any] | None) -> str:
    if holder and holder.get("pid") is not None:
        who = f"pid {holder.get('pid')}"
        if holder.get("host") and holder.get("host") != socket.gethostname():
            who += f" on {holder['host']}"
        who += f" (started {holder.get('started', 'at an unknown time')})"
    else:
        who = "another process"
    return (
        f"run folder {folder} is in use by {who}. Fix: wait for it to finish or use another --out"
    )


def _cannot_create(folder: Path, err: OSError) -> TaspruneError:
    reason = err.strerror or str(err)
    if err.errno in (errno.ENOTDIR, errno.EEXIST) or (folder.exists() and not folder.is_dir()):
        fix = "a file is in the way; choose another --out"
    elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "make the parent folder writable or choose another --out"
    elif err.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free disk space or choose another --out"
    else:
        fix = "choose another --out"
    return TaspruneError(f"cannot use output folder {folder}: {reason}. Fix: {fix}")


def _try_lock(fd: int) -> bool:
    """Non-blocking exclusive flock: True when taken, False when another process holds it."""
    if fcntl is None:  # pragma: no cover - Windows
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as err:
        if err.errno in (errno.EAGAIN, errno.EACCES):
            return False
        # A filesystem without flock (some network mounts): proceed, but say so.
        logger.warning("cannot lock (%s); make sure no other process uses this folder", err)
    return True


def _acquire(folder: Path) -> list[Any]:
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _cannot_create(folder, err) from None
    if not folder.is_dir():
        raise _cannot_create(folder, OSError(errno.ENOTDIR, "Not a directory"))
    path = folder / LOCK_NAME
    for _ in range(20):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise _cannot_create(folder, err) from None
        if not _try_lock(fd):
            os.close(fd)
            raise RunInUseError(_in_use_line(folder, lock_holder(folder)))
        # The previous holder may have unlinked the file between our open and our lock.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    else:  # pragma: no cover - would need 20 lost races in a row
        raise RunInUseError(_in_use_line(folder, lock_holder(folder)))
    stale = lock_holder(folder)
    if stale and stale.get("pid") not in (None, os.getpid()):
        logger.info(
            "%s: taking over the lock left by pid %s (that process is gone)", folder, stale["pid"]
        )
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "argv": list(sys.argv),
    }
    try:
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(record) + "\n").encode("utf-8"))
    except OSError as err:
        # Still locked (the flock does not need the content); only the message would suffer.
        logger.warning("cannot write %s (%s)", path, err.strerror or err)
    return [fd, 0, created]


def _release(folder: Path, entry: list[Any]) -> None:
    fd, _, created = entry
    with contextlib.suppress(OSError):
        os.unlink(folder / LOCK_NAME)  # unlinked while still locked: see the module docstring
    with contextlib.suppress(OSError):
        os.close(fd)  # closing drops the flock
    if created:
        with contextlib.suppress(OSError):
            folder.rmdir()  # a command that failed at once leaves no empty folder behind


class RunLock:
    """Context manager holding the exclusive lock of a run folder (creating the folder)."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder).expanduser()

        self._key: Path | None = None

    def __enter__(self) -> RunLock:
        key = self.folder.resolve()
        entry = _HELD.get(key)
        if entry is None:
            entry = _acquire(self.folder)
            _HELD[key] = entry
        entry[1] += 1
        self._key = key
        return self

    def __exit__(self, *exc: object) -> None:
        key, self._key = self._key, None
        entry = _HELD.get(key) if key is not None else None
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0 and key is not None:
            del _HELD[key]
            _release(self.folder, entry)


@contextlib.contextmanager
def run_lock(folder: str | os.PathLike[str]) -> Iterator[Path]:
    """``with run_lock(out):`` holds ``out/.lock`` for the block; yields the folder."""
    with RunLock(folder) as lock:
        yield lock.folder
