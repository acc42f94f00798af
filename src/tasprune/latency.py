"""Inference latency of a network: eager PyTorch and ONNX Runtime, median of timed runs.

Both timers run a few untimed warm-up calls (allocator, kernel selection and lazy
initialisation happen there) and then report the median and the 10th/90th percentiles of
``repeats`` timed calls, in milliseconds per batch. The median, not the mean, is kept because
a shared machine produces occasional slow outliers that say nothing about the network.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tasprune.errors import ConfigError, TaspruneError

logger = logging.getLogger(__name__)

__all__ = ["measure_latency", "measure_onnx_latency"]


def _check_args(input_size: tuple[int, ...], batch: int, repeats: int, warmup: int) -> None:
    if len(input_size) != 3 or any(int(s) < 1 for s in input_size):
        raise ConfigError(
            f"input_size {tuple(input_size)} is not (C, H, W). Fix: pass three positive sizes"
        )
    if batch < 1:
        raise ConfigError(f"latency batch {batch} is not positive. Fix: use a batch size >= 1")
    if repeats < 1:
        raise ConfigError(f"latency repeats {repeats} is not positive. Fix: use repeats >= 1")
    if warmup < 0:
        raise ConfigError(f"latency warmup {warmup} is negative. Fix: use warmup >= 0")


def _summary(times_ms: list[float], batch: int) -> dict[str, Any]:
    t = np.asarray(times_ms, dtype=np.float64)
    return {
        "median_ms": float(np.median(t)),
        "p10_ms": float(np.percentile(t, 10)),
        "p90_ms": float(np.percentile(t, 90)),
        "batch": int(batch),
        "repeats": len(times_ms),
    }


def time_calls(fn: Callable[[], object], repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times: list[float] = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run with ``threads`` intra-op threads, restoring the previous count afterwards."""
    if threads is None:
        yield
        return
    if threads < 1:
        raise ConfigError(f"threads {threads} is not positive. Fix: use threads >= 1 or None")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def measure_latency(
    model: nn.Module,
    input_size: tuple[int, int, int],
    batch: int,
    *,
    repeats: int = 20,
    warmup: int = 5,
    threads: int | None = None,
    channels_last: bool = False,
) -> dict[str, Any]:
    """Eager forward latency of ``model`` on a random batch, on the model's own device.

    Returns ``{"median_ms", "p10_ms", "p90_ms", "batch", "repeats"}`` (milliseconds per batch).
    The model is timed in eval mode under ``torch.inference_mode``; its previous train/eval
    mode is restored afterwards. ``threads`` temporarily sets torch's intra-op thread count.
    ``channels_last`` converts the model's weights to that memory format in place.
    """
    _check_args(input_size, batch, repeats, warmup)
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    x = torch.rand(batch, *input_size, device=device)  # N, C, H, W; raw images in [0, 1]
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        model = model.to(memory_format=torch.channels_last)
    sync: Callable[[], None] = (
        (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    )

    def call() -> None:
        model(x)
        sync()  # CUDA kernels are asynchronous: time their completion, not their launch

    was_training = model.training
    model.eval()
    try:
        with torch_threads(threads), torch.inference_mode():
            times = time_calls(call, repeats, warmup)
    finally:
        model.train(was_training)
    result = _summary(times, batch)
    logger.debug("eager latency batch %d on %s: %.3f ms", batch, device, result["median_ms"])
    return result


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


def measure_onnx_latency(
    onnx_path: str | os.PathLike[str],
    input_size: tuple[int, int, int],
    batch: int,
    repeats: int = 20,
    warmup: int = 5,
    *,
    threads: int | None = None,
) -> dict[str, Any]:
    """ONNX Runtime (CPU) latency of the network in ``onnx_path`` on a random batch.

    Same result keys as :func:`measure_latency`. Intra-op threads default to
    ``torch.get_num_threads()`` so eager and ONNX numbers use the same cores.
    """
    _check_args(input_size, batch, repeats, warmup)
    path = Path(onnx_path)
    if not path.is_file():
        raise TaspruneError(
            f"ONNX file {path} does not exist. Fix: export it first (`tasprune export`)"
        )
    session = ort_session(path, threads, "ONNX latency cannot be measured", "re-export the model")
    name = session.get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal((batch, *input_size)).astype(np.float32)
    times = time_calls(lambda: session.run(None, {name: x}), repeats, warmup)
    result = _summary(times, batch)
    logger.debug("onnx latency batch %d: %.3f ms", batch, result["median_ms"])
    return result
