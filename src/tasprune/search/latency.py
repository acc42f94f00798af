"""The latency budget's model for one search: the table for the search's runtime, thread
count and batch (loaded from its file or the cache, measured where points are missing), and
the model's calibration (scale, ``rest_ms``), attached to the `SuperNet` so that its cost function predicts latency
the way it counts FLOPs (`tasprune.latency_table`)."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from tasprune import distributed as ddp
from tasprune.config import SearchConfig
from tasprune.errors import ConfigError
from tasprune.latency import (
    LatencySettings,
    Runtime,
    bound_run,
    measure,
    median_ms,
    onnx_session,
    time_calls,
    time_eager,
    torch_threads,
)
from tasprune.latency_table import LatencyTable, Op, TableKey, default_table_path
from tasprune.models import create_model
from tasprune.search.expected import ExpectedAlgebra
from tasprune.search.supernet import SuperNet

log = logging.getLogger(__name__)

__all__ = ["attach_latency", "build_table", "measure_network", "measure_points", "model_key"]


def model_key(net: SuperNet) -> str:
    size = "x".join(map(str, (net.in_channels, *net.input_size)))
    return f"{net.model_name} {size} classes {net.num_classes}"


def _open(cfg: SearchConfig, key: TableKey) -> tuple[LatencyTable, Path]:
    """The table to extend and the file it is saved to. A table file the user named is used
    when it was measured for ``key``; otherwise (logged) the cache's file for the key."""
    cache = default_table_path(key)
    if cfg.latency_table is not None:
        path = Path(cfg.latency_table).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"latency table {path} does not exist. Fix: build it (tasprune latency-table "
                "--out FILE) or leave latency_table unset to use the cache"
            )
        table = LatencyTable.load(path, key)
        if table is not None:
            return table, path
        log.warning("measuring a table for this machine in %s instead", cache)
    if cache.is_file():
        table = LatencyTable.load(cache, key)
        if table is not None:
            return table, cache
    return LatencyTable(key), cache


def build_table(
    net: SuperNet, cfg: SearchConfig, *, progress: bool = True, device: str = "cpu"
) -> tuple[LatencyTable, tuple[float, float], Path]:
    """(table holding every layer point of ``net``'s space, the model's calibration
    (scale, rest_ms), its file),
    measuring only what the table lacks; saved as it grows."""
    key = TableKey.here(cfg.latency_runtime, cfg.latency_threads, cfg.latency_batch, device)
    table, path = _open(cfg, key)
    net.latency_table = table
    try:
        with table.collecting() as wanted:
            net._count(ExpectedAlgebra(net))
    finally:
        net.latency_table = None
    todo = table.missing(wanted)
    if todo:
        log.info(
            "measuring %d layer latencies (%s, %d threads, batch %d) into %s",
            len(todo),
            key.runtime,
            key.threads,
            key.batch,
            path,
        )
    measure_points(table, todo, progress=progress, on_save=lambda: table.save(path))
    name = model_key(net)
    if name not in table.models:
        table.models[name] = _calibrate(net, table, key)
    table.save(path)
    entry = table.models[name]
    return table, (entry["scale"], entry["rest_ms"]), path


LAYER_WARMUP = 3  # untimed calls before each layer's (and each calibration network's) timing
CALIBRATION_SHAPES = 4  # random shapes measured whole, besides the unpruned and smallest ones


def _calibrate(net: SuperNet, table: LatencyTable, key: TableKey) -> dict[str, Any]:
    """Fit measured = scale * (sum of the table's layers) + rest on a few whole networks of
    the space (the unpruned one, the smallest, and random ones): what the layers measured
    alone miss (adds, pooling, the call, caches) is partly constant, partly proportional."""
    from tasprune.search.space import smallest_shape

    size = (net.in_channels, *net.input_size)
    rng = random.Random(0)
    shapes = [net.full_shape, smallest_shape(net.model_name, net.options)]
    shapes += [net.sample(rng) for _ in range(CALIBRATION_SHAPES)]
    net.attach_latency(table, (1.0, 0.0))
    points = []
    for shape in shapes:
        plain = create_model(
            net.model_name, shape, num_classes=net.num_classes, in_channels=net.in_channels
        ).to(_timing_device(key))  # where the table's layers were timed
        measured = measure_network(plain, key, size, max(table.repeats, 20))
        points.append((net.shape_costs(shape)["latency"], measured))
    net.latency_table = None
    xs, ys = np.array([p[0] for p in points]), np.array([p[1] for p in points])
    scale, rest = np.polyfit(xs, ys, 1)
    if scale <= 0:  # degenerate (all shapes alike): keep the layers' sum, offset only
        scale, rest = 1.0, float(np.mean(ys - xs))
    log.info(
        "%s: measured = %.3f x layers %+.3f ms (fit on %d networks; unpruned %.3f ms measured)",
        model_key(net),
        scale,
        rest,
        len(points),
        points[0][1],
    )
    return {
        "scale": float(scale),
        "rest_ms": float(rest),
        "calibration": [{"layers_ms": x, "measured_ms": y} for x, y in points],
    }


def attach_latency(
    net: SuperNet, cfg: SearchConfig, *, progress: bool = True, device: str = "cpu"
) -> dict[str, Any]:
    """Give ``net`` the latency model of ``cfg`` (rank 0 builds it, every rank gets the same
    table); returns what shape.json records about it."""
    state: tuple[dict[str, Any], tuple[float, float], str] | None = None
    if ddp.is_main():
        table, fit, path = build_table(net, cfg, progress=progress, device=device)
        state = (table.to_dict(), fit, str(path))
    if ddp.is_distributed():
        state = ddp.broadcast_object(state)
    assert state is not None
    raw, (scale, rest), path_s = state
    key = TableKey(**raw["key"])
    net.attach_latency(LatencyTable.from_dict(raw, key), (scale, rest))
    net.latency_info = {
        "runtime": key.runtime,
        "version": key.version,
        "device": key.device,
        "threads": key.threads,
        "batch": key.batch,
        "table": path_s,
        "scale": scale,
        "rest_ms": rest,
        "full_ms": net.full_latency,
    }
    return net.latency_info


# ---------------------------------------------------------------------- timers
def measure_points(
    table: LatencyTable,
    points: Sequence[tuple[Op, int, int]],
    *,
    progress: bool = True,
    on_save: Callable[[], None] | None = None,
) -> None:
    """Measure every point ``table`` lacks (a progress bar over them); ``on_save`` is called
    every 50 points so that an interrupted build keeps what it measured."""
    todo = table.missing(points)
    if not todo:
        return
    timer = _timer(table.key, table.repeats)
    with torch_threads(table.key.threads):
        bar = tqdm(todo, desc=f"latency table ({table.key.runtime})", disable=not progress)
        for i, (op, cin, cout) in enumerate(bar):
            table.record(op, cin, cout, timer(op, cin, cout))
            if on_save is not None and (i + 1) % 50 == 0:
                on_save()


def _timer(key: TableKey, repeats: int) -> Callable[[Op, int, int], float]:
    """The median ms of one layer in the key's runtime (ONNX: less one session call's
    overhead, which the model's ``rest_ms`` carries once per network)."""
    device = _timing_device(key)
    if key.runtime == "eager":

        def eager(op: Op, cin: int, cout: int) -> float:
            layer = op.build(cin, cout).eval().to(device)
            x = op.example(key.batch, cin, cout).to(device)
            return median_ms(time_eager(layer, x, repeats, LAYER_WARMUP))

        return eager

    overhead = _ort_overhead(key.threads, key.batch, repeats)
    int8 = key.runtime == "onnxruntime-int8"

    def onnx(op: Op, cin: int, cout: int) -> float:
        layer = op.build(cin, cout).eval()
        x = op.example(key.batch, cin, cout)
        run = bound_run(onnx_session(layer, x, key.threads, int8=int8), x, layer)
        return max(median_ms(time_calls(run, repeats, LAYER_WARMUP)) - overhead, 0.0)

    return onnx


def _ort_overhead(threads: int, batch: int, repeats: int) -> float:
    """The time of one ``session.run`` around a negligible graph: paid once per network, so
    taken off every single-layer measurement (the model's ``rest_ms`` carries it once)."""
    x = torch.rand(batch, 1)
    relu = nn.ReLU()
    run = bound_run(onnx_session(relu, x, threads), x, relu)
    return median_ms(time_calls(run, max(repeats, 50), warmup=10))


def _timing_device(key: TableKey) -> torch.device:
    """The device a table's layers (and its calibration networks) are timed on."""
    return torch.device("cuda" if key.device.startswith("cuda") else "cpu")


def measure_network(
    net: nn.Module, key: TableKey, input_size: tuple[int, ...], repeats: int
) -> float:
    """Median ms per batch of a whole network in the key's runtime, threads and batch, timed
    as the table's layers are (`tasprune.latency.measure`; the ONNX one exported padded, as
    `tasprune export` does)."""
    c, h, w = (int(v) for v in input_size)
    runtime = cast(Runtime, key.runtime)  # TableKey.here checked it
    settings = LatencySettings(runtime, key.batch, key.threads, repeats, LAYER_WARMUP)
    return float(measure(net, (c, h, w), settings)["median_ms"])
