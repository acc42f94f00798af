"""Inference latency of a network: the one place that times it, in eager PyTorch or ONNX Runtime.

The report, the benchmark runner and the latency table (its layers and its calibration on
whole networks) all time through here. Every timer runs ``warmup`` untimed calls (allocator,
kernel selection and lazy initialisation happen there) and then ``repeats`` timed calls, in
milliseconds per batch; the median is kept (with the 10th/90th percentiles), not the mean,
because a shared machine produces occasional slow outliers that say nothing about the network.
`LatencySettings` says how a network is timed: runtime, batch, intra-op threads, repeats and
warm-up calls.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from tasprune.errors import ConfigError, TaspruneError
from tasprune.export import OPSET, padded_copy, quiet_exporters
from tasprune.latency_table import ORT_BLOCK, RUNTIMES
from tasprune.ort import ort_session

logger = logging.getLogger(__name__)

__all__ = [
    "LatencySettings",
    "Runtime",
    "bound_run",
    "measure",
    "measure_latency",
    "measure_onnx_latency",
    "median_ms",
    "onnx_session",
    "time_calls",
    "time_eager",
    "torch_threads",
]

Runtime = Literal["eager", "onnxruntime", "onnxruntime-int8"]


@dataclass(frozen=True)
class LatencySettings:
    """How a network is timed: in ``runtime`` at ``batch``, with ``threads`` intra-op threads
    (None: torch's current count), the median of ``repeats`` calls after ``warmup`` untimed
    ones. Validated on construction; the errors name the field."""

    runtime: Runtime = "eager"
    batch: int = 1
    threads: int | None = None
    repeats: int = 20
    warmup: int = 5

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise ConfigError(
                f"unknown latency runtime {self.runtime!r}. Fix: use one of {', '.join(RUNTIMES)}"
            )
        if self.batch < 1:
            raise ConfigError(
                f"latency batch {self.batch} is not positive. Fix: use a batch size >= 1"
            )
        if self.threads is not None and self.threads < 1:
            raise ConfigError(
                f"threads {self.threads} is not positive. Fix: use threads >= 1 or None"
            )
        if self.repeats < 1:
            raise ConfigError(
                f"latency repeats {self.repeats} is not positive. Fix: use repeats >= 1"
            )
        if self.warmup < 0:
            raise ConfigError(f"latency warmup {self.warmup} is negative. Fix: use warmup >= 0")


def _check_size(input_size: tuple[int, ...]) -> None:
    if len(input_size) != 3 or any(int(s) < 1 for s in input_size):
        raise ConfigError(
            f"input_size {tuple(input_size)} is not (C, H, W). Fix: pass three positive sizes"
        )


def median_ms(times_ms: list[float]) -> float:
    """The statistic every latency here reports: the median of the timed calls."""
    return float(np.median(np.asarray(times_ms, dtype=np.float64)))


def _summary(times_ms: list[float], batch: int) -> dict[str, Any]:
    t = np.asarray(times_ms, dtype=np.float64)
    return {
        "median_ms": median_ms(times_ms),
        "p10_ms": float(np.percentile(t, 10)),
        "p90_ms": float(np.percentile(t, 90)),
        "batch": int(batch),
        "repeats": len(times_ms),
    }


def time_calls(fn: Callable[[], object], repeats: int, warmup: int) -> list[float]:
    """Milliseconds of each of ``repeats`` calls of ``fn``, after ``warmup`` untimed ones."""
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


# ---------------------------------------------------------------------- eager PyTorch


def time_eager(model: nn.Module, x: Tensor, repeats: int, warmup: int) -> list[float]:
    """Milliseconds of each timed ``model(x)`` (eval mode, ``torch.inference_mode``, CUDA
    synchronised, on ``x``'s device); the model's train/eval mode is restored afterwards."""
    device = x.device
    sync: Callable[[], None] = (
        (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    )

    def call() -> None:
        model(x)
        sync()  # CUDA kernels are asynchronous: time their completion, not their launch

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            return time_calls(call, repeats, warmup)
    finally:
        model.train(was_training)


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
    _check_size(input_size)
    settings = LatencySettings("eager", batch, threads, repeats, warmup)
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    x = torch.rand(batch, *input_size, device=device)  # N, C, H, W; raw images in [0, 1]
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        model = model.to(memory_format=torch.channels_last)
    with torch_threads(settings.threads):
        times = time_eager(model, x, settings.repeats, settings.warmup)
    result = _summary(times, batch)
    logger.debug("eager latency batch %d on %s: %.3f ms", batch, device, result["median_ms"])
    return result


# ---------------------------------------------------------------------- ONNX Runtime


def onnx_session(
    model: nn.Module,
    x: Tensor,
    threads: int | None,
    fix: str = "use latency_runtime: eager",
    *,
    int8: bool = False,
) -> Any:
    """An ONNX Runtime session of ``model`` exported in memory at input ``x`` (the TorchScript
    exporter at the export's opset); with ``int8`` quantised as `tasprune export --int8`
    quantises (`tasprune.int8.quantize`, calibrated on ``x``: scales do not change the
    time). A runtime that cannot load it is one ConfigError line ending in ``fix``."""
    buf = io.BytesIO()
    with quiet_exporters(), torch.no_grad():
        torch.onnx.export(
            model,
            (x,),
            buf,  # type: ignore[arg-type]  # the TorchScript exporter writes file objects
            dynamo=False,
            opset_version=OPSET,
            input_names=["input"],
        )
    data = buf.getvalue()
    if int8:
        from tasprune.int8 import quantize

        data = quantize(data, x.detach().cpu().numpy()).SerializeToString()
    return ort_session(data, threads, "no ONNX Runtime latency can be measured", fix, ConfigError)


def bound_run(session: Any, x: Tensor, model: nn.Module) -> Callable[[], None]:
    """One ``session`` call with its input and output bound to preallocated buffers: inside a
    network ONNX Runtime reuses its buffers, so a lone layer must not pay for allocating and
    copying out its result (``model`` gives the output's shape)."""
    import onnxruntime as ort

    with torch.no_grad():
        out_shape = tuple(model(x[:1]).shape[1:])
    binding = session.io_binding()
    binding.bind_cpu_input(session.get_inputs()[0].name, x.numpy())
    out = ort.OrtValue.ortvalue_from_shape_and_type((x.shape[0], *out_shape), np.float32)
    binding.bind_ortvalue_output(session.get_outputs()[0].name, out)
    return lambda: session.run_with_iobinding(binding)


def measure_onnx_latency(
    onnx_path: str | os.PathLike[str],
    input_size: tuple[int, int, int],
    batch: int,
    repeats: int = 20,
    warmup: int = 5,
    *,
    threads: int | None = None,
) -> dict[str, Any]:
    """ONNX Runtime (CPU) latency of the network in ``onnx_path`` on a random batch, run as a
    user's session runs it (``session.run``, outputs copied out).

    Same result keys as :func:`measure_latency`. Intra-op threads default to
    ``torch.get_num_threads()`` so eager and ONNX numbers use the same cores.
    """
    _check_size(input_size)
    settings = LatencySettings("onnxruntime", batch, threads, repeats, warmup)
    path = Path(onnx_path)
    if not path.is_file():
        raise TaspruneError(
            f"ONNX file {path} does not exist. Fix: export it first (`tasprune export`)"
        )
    session = ort_session(
        path, settings.threads, "ONNX latency cannot be measured", "re-export the model"
    )
    name = session.get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal((batch, *input_size)).astype(np.float32)
    times = time_calls(lambda: session.run(None, {name: x}), settings.repeats, settings.warmup)
    result = _summary(times, batch)
    logger.debug("onnx latency batch %d: %.3f ms", batch, result["median_ms"])
    return result


def _measure_onnx_module(
    model: nn.Module, input_size: tuple[int, int, int], settings: LatencySettings
) -> dict[str, Any]:
    """``model`` exported in memory, its channels padded as `tasprune export` pads them (as is
    when its graph cannot be padded), timed with bound input and output buffers: the way the
    latency table times its layers, so that the two compare."""
    was_training = model.training
    model.eval()
    x = torch.rand(settings.batch, *input_size)
    try:
        with torch_threads(settings.threads):
            twin = padded_copy(model, x, ORT_BLOCK)
            int8 = settings.runtime == "onnxruntime-int8"
            session = onnx_session(twin, x, settings.threads, int8=int8)
            times = time_calls(bound_run(session, x, twin), settings.repeats, settings.warmup)
    finally:
        model.train(was_training)
    return _summary(times, settings.batch)


# ---------------------------------------------------------------------- the entry point


def measure(
    model: nn.Module,
    input_size: tuple[int, int, int],
    settings: LatencySettings,
    *,
    onnx_file: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Time ``model`` on a random batch as ``settings`` say; returns ``{"median_ms", "p10_ms",
    "p90_ms", "batch", "repeats"}`` (milliseconds per batch).

    eager: on the model's own device (:func:`measure_latency`). onnxruntime (CPU): the
    exported ``onnx_file`` when given, run as a user's session runs it
    (:func:`measure_onnx_latency`); otherwise ``model`` exported in memory, padded, with bound
    buffers (how the latency table's layers and calibration are timed).
    """
    if settings.runtime == "eager":
        return measure_latency(
            model,
            input_size,
            settings.batch,
            repeats=settings.repeats,
            warmup=settings.warmup,
            threads=settings.threads,
        )
    if onnx_file is not None:
        return measure_onnx_latency(
            onnx_file,
            input_size,
            settings.batch,
            settings.repeats,
            settings.warmup,
            threads=settings.threads,
        )
    _check_size(input_size)
    return _measure_onnx_module(model, input_size, settings)
