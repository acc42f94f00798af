"""Optional TensorBoard mirror of the per-epoch history (``--log tensorboard``).

``history.jsonl`` stays the record; with TensorBoard on, every numeric value of every row is
also written as a scalar (step = epoch) to ``<stage folder>/tensorboard``, so
``tensorboard --logdir RUN`` shows the teacher, the search and the student side by side.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from tasprune.errors import ConfigError

__all__ = ["TensorBoardMirror", "require_tensorboard"]

_INSTALL = "Fix: pip install 'tasprune[tensorboard]' (or leave --log tensorboard out)"


def require_tensorboard() -> None:
    """Raise a one-line ConfigError when the tensorboard package is missing (checked before
    anything is written)."""
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"TensorBoard logging needs the tensorboard package. {_INSTALL}"
        ) from None


class TensorBoardMirror:
    """Scalars of history rows into ``log_dir``; opened on the first row.

    ``purge(step)``: on resume, events at or after ``step`` left by the interrupted run are
    dropped (TensorBoard's ``purge_step``), so a redone epoch is not drawn twice.
    """

    def __init__(self, log_dir: Path) -> None:
        require_tensorboard()
        self.log_dir = log_dir
        self._writer: Any = None
        self._purge_step: int | None = None
        self._count = 0

    def purge(self, step: int) -> None:
        if self._writer is None:
            self._purge_step = max(0, step)

    def scalars(self, values: dict[str, Any], step: int | None = None) -> None:
        """Write every finite int/float of ``values`` (bools and the step itself skipped)."""
        writer = self._open()
        at = step if step is not None else self._count
        self._count += 1
        for key, value in values.items():
            if key == "epoch" or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if math.isfinite(value):
                writer.add_scalar(key, value, at)
        writer.flush()

    def _open(self) -> Any:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.log_dir), purge_step=self._purge_step)
        return self._writer

    def text(self, tag: str, body: str) -> None:
        self._open().add_text(tag, body)
        self._writer.flush()

    def image(self, tag: str, hwc: Any) -> None:
        """An H x W x C image (floats in [0, 1], e.g. a plot read back from its PNG)."""
        self._open().add_image(tag, hwc, dataformats="HWC")
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
