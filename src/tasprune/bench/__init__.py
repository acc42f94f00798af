"""Benchmark protocols: TAS against simple baselines at the same FLOPs, and measured speed-ups.

A protocol (``bench/protocols/*.yaml``) is a base recipe plus the methods to compare, the seeds
and the latency batch sizes. :func:`run_protocol` (``tasprune bench FILE``):

1. trains ONE teacher with the pipeline's teacher stage; it is reused as the KD teacher of every
   method and seed and as the network the L1 baseline prunes;
2. per seed, runs one TAS search with the recipe's settings (the seed seeds the search);
3. per seed and method, trains the student with the recipe's SAME distill settings (schedule,
   KD, init rule; the seed seeds the training): ``tas_kd`` (the searched shape, KD),
   ``tas_nokd`` (same shape, cross-entropy only), ``uniform_kd``, ``random_kd`` (shapes from
   :mod:`tasprune.baselines`, KD) and ``l1_kd`` (the L1-pruned teacher's weights as the init,
   KD);
4. measures every distinct network on the CPU: eager PyTorch and ONNX Runtime latency (median
   over interleaved rounds, so load bursts on a shared machine hit every network alike);
5. writes ``bench/results/<protocol>.json`` and ``.md``: top-1 (mean, std over seeds), exact
   MFLOPs and params, latencies, latency ratio vs the teacher and (latency ratio)/(FLOPs ratio),
   the targets with PASS/MISS, the machine and the wall time of every stage.

Layout of ``OUT_ROOT/<protocol>/`` (every step resumable; a rerun continues)::

    protocol.yaml            the resolved protocol and recipe (a different recipe is refused)
    timings.json             wall seconds of every finished step
    teacher/                 the pipeline's teacher stage (final.json = done)
    seed-S/search/           the TAS search of seed S (search_done.json = done)
    seed-S/METHOD/           the student (fit outputs, shape.json; result.json = done)
    measure/latency.json     latencies of every distinct network (+ its .onnx files)
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Sequence

import torch

from tasprune.bench.protocol import METHODS, TARGETS, Protocol, load_protocol
from tasprune.bench.render import format_markdown
from tasprune.bench.results import shape_agreement
from tasprune.bench.runner import machine_info, run_protocol
from tasprune.errors import ConfigError

__all__ = [
    "METHODS",
    "TARGETS",
    "Protocol",
    "format_markdown",
    "load_protocol",
    "machine_info",
    "main",
    "run_protocol",
    "shape_agreement",
]


def main(argv: Sequence[str] | None = None, prog: str = "tasprune bench") -> int:
    """``tasprune bench PROTOCOL [--seeds N] [--quick]``: parse the flags, run, print the
    table. Errors are raised (TaspruneError) for the tasprune CLI to print as one line."""
    args_list = list(argv or [])
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run a benchmark protocol: TAS vs baselines at the same FLOPs, "
        "with CPU latency.",
    )
    parser.add_argument("protocol", help="protocol YAML, e.g. bench/protocols/fmnist-r20.yaml")
    parser.add_argument("--seeds", type=int, default=None, help="use the first N seeds (N >= 2)")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: tiny data, 1 epoch per stage"
    )
    parser.add_argument("--out-root", default="runs/bench", help="folder of the run folders")
    parser.add_argument("--results-dir", default="bench/results", help="where JSON/MD go")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads for training"
    )
    args = parser.parse_args(args_list)
    command = f"{prog} " + shlex.join(args_list)
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads {args.threads} is not positive. Fix: use 1 or more")
        torch.set_num_threads(args.threads)
    result = run_protocol(
        args.protocol,
        args.out_root,
        seeds=args.seeds,
        quick=args.quick,
        results_dir=args.results_dir,
        progress=not args.no_progress,
        command=command,
    )
    print(format_markdown(result))
    return 0
