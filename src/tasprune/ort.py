"""ONNX Runtime sessions: the one place that opens them (the export's check, latency timing).

Kept apart from `tasprune.latency` so that the export (which checks its graphs here) and the
latency timers (which export the graphs they time) do not import each other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tasprune.errors import TaspruneError

__all__ = ["ort_session"]


def ort_session(
    path: Path | bytes,
    threads: int | None,
    purpose: str,
    fix: str,
    error_cls: type[TaspruneError] = TaspruneError,
) -> Any:
    """An ONNX Runtime CPU session of ``path`` (a file, or a serialised model's bytes;
    ``threads`` intra-op threads, default torch's; one inter-op thread; errors only in its log).
    A missing onnxruntime or a model it cannot load is one ``error_cls`` line naming
    ``purpose`` and ``fix``."""
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise error_cls(
            f"onnxruntime is not installed, so {purpose}. Fix: pip install 'tasprune[export]'"
        ) from err
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads if threads is not None else torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # errors only: no graph-optimisation chatter on stderr
    source = path if isinstance(path, bytes) else str(path)
    try:
        return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own untyped exception classes
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        what = "the exported graph" if isinstance(path, bytes) else str(path)
        raise error_cls(f"onnxruntime cannot load {what} ({first[:200]}). Fix: {fix}") from err
