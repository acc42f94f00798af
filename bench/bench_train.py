"""Training throughput: the engine's ``train_one_epoch`` vs a bare compute loop.

Both run on the same pre-made synthetic batches (3x32x32, CPU by default), the same model
and the same optimiser, so the difference is the engine's bookkeeping: device transfer,
loss/accuracy sums, NaN check, scheduler step and timing. Also measured: the bare loop with
channels_last off, to justify ``TrainConfig.channels_last="auto"``.

Timed windows of ``--steps`` steps each are interleaved (bare, engine, bare-NCHW, ...) after
a warm-up, and the median images/second is reported.

    python bench/bench_train.py                       # ResNet-20 and -56, batch 128
    python bench/bench_train.py --quick               # a smoke run in well under a minute
    python bench/bench_train.py --models cifar_resnet20 --steps 20 --windows 7

Writes bench/results/train_throughput.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from tasprune.config import TrainConfig
from tasprune.epoch import cross_entropy_loss, train_one_epoch
from tasprune.models import create_model
from tasprune.optim import build_optimizer, build_scheduler

logger = logging.getLogger(__name__)

RESULTS = Path(__file__).resolve().parent / "results" / "train_throughput.json"


class FixedBatches:
    """A sized loader that cycles over pre-made batches (no data-pipeline cost)."""

    def __init__(self, batches: list[tuple[Tensor, Tensor]], steps: int) -> None:
        self.batches = batches
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for i in range(self.steps):
            yield self.batches[i % len(self.batches)]


def make_batches(
    batch_size: int, n: int, channels_last: bool, num_classes: int = 10
) -> list[tuple[Tensor, Tensor]]:
    """``n`` random normalised batches, already in the memory format being measured."""
    g = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return [
        (
            torch.randn(batch_size, 3, 32, 32, generator=g).contiguous(memory_format=fmt),
            torch.randint(0, num_classes, (batch_size,), generator=g),
        )
        for _ in range(n)
    ]


class Runner:
    """One model + optimiser + scheduler; runs timed windows bare or through the engine."""

    def __init__(self, model_name: str, batch_size: int, steps: int, channels_last: bool) -> None:
        torch.manual_seed(0)
        self.model = create_model(model_name, num_classes=10, in_channels=3)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.model.to(memory_format=fmt).train()
        self.cfg = TrainConfig(epochs=1000, lr=0.01, channels_last="on" if channels_last else "off")
        self.opt = build_optimizer(self.model, self.cfg)
        self.sched = build_scheduler(self.opt, self.cfg, steps)
        self.batches = make_batches(batch_size, 4, channels_last)
        self.steps = steps
        self.batch_size = batch_size
        self.channels_last = channels_last
        self.loss_fn = cross_entropy_loss()
        self.epoch = 0

    def bare(self, steps: int | None = None) -> float:
        """Forward + backward + optimiser step only; returns images/second."""
        steps = self.steps if steps is None else steps
        model, opt = self.model, self.opt
        start = time.perf_counter()
        for i in range(steps):
            x, y = self.batches[i % len(self.batches)]
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return steps * self.batch_size / (time.perf_counter() - start)

    def engine(self, steps: int | None = None) -> float:
        """The real ``train_one_epoch`` over the same batches; images/second from outside."""
        loader = FixedBatches(self.batches, self.steps if steps is None else steps)
        start = time.perf_counter()
        train_one_epoch(
            self.model,
            self.loss_fn,
            self.opt,
            self.sched,
            loader,
            torch.device("cpu"),
            self.epoch,
            amp=False,
            channels_last=self.channels_last,
            grad_clip=None,
            progress=False,
        )
        self.epoch += 1
        return len(loader) * self.batch_size / (time.perf_counter() - start)


def bench_model(
    model_name: str, batch_size: int, steps: int, windows: int, warmup: int
) -> dict[str, Any]:
    """Interleaved timed windows of bare(NHWC), engine(NHWC) and bare(NCHW)."""
    nhwc = Runner(model_name, batch_size, steps, channels_last=True)
    nchw = Runner(model_name, batch_size, steps, channels_last=False)
    for r in (nhwc, nchw):
        r.bare(warmup)
    nhwc.engine(warmup)
    samples: dict[str, list[float]] = {"bare_nhwc": [], "engine_nhwc": [], "bare_nchw": []}
    for w in range(windows):
        samples["bare_nhwc"].append(nhwc.bare())
        samples["engine_nhwc"].append(nhwc.engine())
        samples["bare_nchw"].append(nchw.bare())
        logger.info(
            "%s window %d/%d: %s",
            model_name,
            w + 1,
            windows,
            ", ".join(f"{k} {v[-1]:.0f}" for k, v in samples.items()),
        )
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {
        "model": model_name,
        "img_per_s_median": med,
        "img_per_s_windows": samples,
        "engine_overhead_pct": 100.0 * (1.0 - med["engine_nhwc"] / med["bare_nhwc"]),
        "channels_last_speedup": med["bare_nhwc"] / med["bare_nchw"],
    }


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def markdown(rows: list[dict[str, Any]], batch_size: int) -> str:
    lines = [
        f"| model (batch {batch_size}, CPU) | bare NHWC img/s | engine NHWC img/s | overhead "
        "| bare NCHW img/s | channels_last speed-up |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        m = r["img_per_s_median"]
        lines.append(
            f"| {r['model']} | {m['bare_nhwc']:.0f} | {m['engine_nhwc']:.0f} | "
            f"{r['engine_overhead_pct']:+.1f}% | {m['bare_nchw']:.0f} | "
            f"{r['channels_last_speedup']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--models", nargs="+", default=["cifar_resnet20", "cifar_resnet56"])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="optimiser steps per timed window")
    parser.add_argument("--windows", type=int, default=5, help="timed windows per variant")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per variant")
    parser.add_argument("--quick", action="store_true", help="3 windows of 3 steps, ResNet-20")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.windows, args.warmup = 3, 3, 3
        if args.models == parser.get_default("models"):
            args.models = ["cifar_resnet20"]
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    rows = [
        bench_model(name, args.batch_size, args.steps, args.windows, args.warmup)
        for name in args.models
    ]
    result = {
        "benchmark": "train_throughput",
        "device": "cpu",
        "batch_size": args.batch_size,
        "input": [3, 32, 32],
        "steps_per_window": args.steps,
        "windows": args.windows,
        "warmup_steps": args.warmup,
        "quick": args.quick,
        "machine": machine_info(),
        "results": rows,
        "target": "engine overhead <= 5%",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(rows, args.batch_size))
    print(f"\nwritten {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
