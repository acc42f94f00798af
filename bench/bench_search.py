"""Search-iteration cost: one TAS iteration (weight step + architecture step) / one plain step.

With ``arch_every=k`` an iteration is k weight steps and one architecture step, timed against
k plain steps (the ratio per weight step, the architecture step at its amortised cost); with
``arch_step=joint`` it is one step that updates both.

Same batch size, same machine, same process; timing windows of the two are interleaved and the
ratio of their medians is reported, so machine noise hits both alike. Peak memory (max RSS on
CPU, max allocated on CUDA) is measured in a fresh subprocess per mode.

    python bench/bench_search.py [--models cifar_resnet20 cifar_resnet56] [--batch-size 128]
    python bench/bench_search.py --device cuda --models resnet18 --batch-size 64  # a GPU
    python bench/bench_search.py --models tasprune:cifar_resnet20 \
        "tasprune:cifar_resnet20@align=cwi,candidate_affine=true"  # search-space options

A model may carry search-space options after ``@`` (SearchConfig fields, ``key=value``
separated by commas), so variants are timed in one run.

Writes bench/results/search_cost.json and prints a markdown table. On CUDA both steps run as
the engine trains there (bf16 autocast, cuDNN autotuning; the search's ``amp`` default), and
the memory columns are the peak allocated (and reserved) CUDA memory of each mode.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml

from tasprune.epoch import autocast
from tasprune.models import create_model, get_model_spec
from tasprune.search import SearchConfig, SuperNet
from tasprune.search.step import SearchStepper, make_optimizers

RESULTS = Path(__file__).parent / "results"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def input_size(model: str) -> tuple[int, int, int]:
    """The model's default input: 3x32x32 for the CIFAR families, 3x64x64 for traced ones."""
    return get_model_spec(model).default_input


def prepare(device: torch.device) -> None:
    """On CUDA, cuDNN autotuning as the engine sets it for a non-deterministic run."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def make_plain(
    model: str, batch: int, device: torch.device, size: tuple[int, int, int] | None = None
) -> Any:
    size = size or input_size(model)
    net = create_model(model, in_channels=size[0]).to(device)
    net = net.to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    x = torch.randn(batch, *size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)

    def step() -> None:
        with autocast(device, True):  # bf16 on CUDA, as the engine's amp default; CPU: none
            logits = net(x)
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def make_search(
    model: str,
    batch: int,
    device: torch.device,
    size: tuple[int, int, int] | None = None,
    **space: Any,
) -> Any:
    cfg = SearchConfig(epochs=1, batch_size=batch, **space)
    size = size or input_size(model)
    net = SuperNet(model, in_channels=size[0], input_size=size[1:], options=cfg.space())
    net = net.to(device)
    net = net.to(memory_format=torch.channels_last).train()
    net.generator = torch.Generator().manual_seed(0)
    w_opt, _, a_opt = make_optimizers(net, cfg, steps_per_epoch=1000)
    stepper = SearchStepper(net, w_opt, None, a_opt, cfg)
    cl = torch.channels_last
    xa = torch.randn(batch, *size, device=device).contiguous(memory_format=cl)
    xb = torch.randn(batch, *size, device=device).contiguous(memory_format=cl)
    ya = torch.randint(0, 10, (batch,), device=device)
    yb = torch.randint(0, 10, (batch,), device=device)

    every = 1 if cfg.arch_step == "joint" else cfg.arch_every

    def step() -> None:
        """One cycle: ``every`` weight steps on split A, the first with the architecture step
        (joint: one step of both); timed against ``every`` plain steps."""
        for i in range(every):
            stepper.step(xa, ya, *((xb, yb) if i == 0 else (None, None)))

    step.weight_steps = every  # type: ignore[attr-defined]
    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(step: Any, n: int, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    sync(device)
    return (time.perf_counter() - t0) / n


def peak_memory(
    mode: str,
    model: str,
    batch: int,
    device: str,
    steps: int,
    threads: int,
    size: tuple[int, int, int] | None = None,
) -> dict[str, float]:
    """Memory (MiB) of ``steps`` steps of one mode, in a fresh process.

    CPU: the process's peak resident set during the steps (``VmHWM`` after resetting it with
    ``/proc/self/clear_refs`` once the net, optimiser and batch exist and one warm-up step ran)
    and the resident set before them; the difference is what the steps add. CUDA: max
    allocated (and ``peak_reserved_mib``: the caching allocator's peak reservation). Import-time
    memory (torch's libraries) is excluded from the peak this way.
    """
    here = str(Path(__file__).parent)
    make = "make_plain" if mode == "plain" else "make_search"
    code = f"""
import sys, torch
sys.path.insert(0, {here!r})
import bench_search as b
torch.set_num_threads({threads})
d = torch.device({device!r})
b.prepare(d)
s = b.{make}({model!r}, {batch}, d, {size!r})
s()
def status(key):
    for line in open('/proc/self/status'):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
if d.type == 'cuda':
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() / 2**20
else:
    open('/proc/self/clear_refs', 'w').write('5')
    base = status('VmRSS:')
for _ in range({steps}):
    s()
peak = torch.cuda.max_memory_allocated() / 2**20 if d.type == 'cuda' else status('VmHWM:')
reserved = torch.cuda.max_memory_reserved() / 2**20 if d.type == 'cuda' else 0.0
print(base, peak, reserved)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    base, peak, reserved = (float(v) for v in out.strip().splitlines()[-1].split())
    result = {"resident_before_mib": base, "peak_mib": peak, "added_mib": peak - base}
    if device.startswith("cuda"):
        result["peak_reserved_mib"] = reserved
    return result


def _options(space: dict[str, Any] | None) -> str:
    return " (" + ", ".join(f"{k}={v}" for k, v in space.items()) + ")" if space else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["cifar_resnet20", "cifar_resnet56"])
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--windows", type=int, default=7, help="timed windows per mode")
    ap.add_argument("--steps", type=int, default=3, help="steps per timed window")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument(
        "--input-size",
        nargs=3,
        type=int,
        default=None,
        metavar=("C", "H", "W"),
        help="input image size (default: the model's own, e.g. 3 224 224 for resnet18)",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "search_cost.json"))
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    prepare(device)
    size = tuple(args.input_size) if args.input_size else None
    rows = []
    for entry in args.models:
        model, _, opts = entry.partition("@")
        space = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in opts.split(",") if o)}
        plain = make_plain(model, args.batch_size, device, size)
        srch = make_search(model, args.batch_size, device, size, **space)
        for _ in range(2):  # warm-up
            plain()
            srch()
        tp, ts = [], []
        for _ in range(args.windows):
            tp.append(timed(plain, args.steps, device))
            ts.append(timed(srch, args.steps, device))
        row: dict[str, Any] = {
            "model": model,
            "space": space,
            "batch": args.batch_size,
            "input": list(size or input_size(model)),
            "plain_step_ms": 1e3 * statistics.median(tp),
            "search_iter_ms": 1e3 * statistics.median(ts),
        }
        # Per weight step: an architecture step every k weight steps counts at 1/k.
        row["weight_steps_per_iter"] = srch.weight_steps
        row["ratio"] = row["search_iter_ms"] / (srch.weight_steps * row["plain_step_ms"])
        if not args.no_memory:
            threads = torch.get_num_threads()
            plain_mem = peak_memory("plain", model, args.batch_size, args.device, 3, threads, size)
            search_mem = peak_memory(
                "search", model, args.batch_size, args.device, 3, threads, size
            )
            row["plain_memory"] = plain_mem
            row["search_memory"] = search_mem
            row["plain_peak_mib"] = plain_mem["peak_mib"]
            row["search_peak_mib"] = search_mem["peak_mib"]
            row["search_over_plain_added_memory"] = search_mem["added_mib"] / max(
                plain_mem["added_mib"], 1e-9
            )
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {
        "benchmark": "search iteration / plain training step",
        "device": args.device,
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        **(
            {"gpu": torch.cuda.get_device_name(device), "amp": "bf16 autocast, both steps"}
            if device.type == "cuda"
            else {}
        ),
        "windows": args.windows,
        "steps_per_window": args.steps,
        "rows": rows,
        "reference_ratio": {"cifar_resnet20": 3.4, "cifar_resnet56": 4.2},
        "memory_note": "CPU: peak resident set (VmHWM, reset after set-up and one warm-up "
        "step) of a fresh process over 3 steps, incl. the Python runtime and torch's libraries "
        "(~0.9 GiB); compare search with plain. added_mib (peak - resident before the steps) "
        "is near 0 when the warm-up step already reserved the memory",
    }
    if device.type == "cuda":
        result["memory_note"] = (
            "CUDA: max allocated (peak_mib) and max reserved (peak_reserved_mib) over 3 steps "
            "of a fresh process, the statistics reset after set-up and one warm-up step"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    peak = "peak CUDA allocated" if device.type == "cuda" else "peak RSS"
    lines = [
        "| model | batch | threads | plain step (ms) | search iteration (ms) | ratio | "
        f"{peak} MiB plain / search | search - plain (MiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mem = f"{r.get('plain_peak_mib', 0):.0f} / {r.get('search_peak_mib', 0):.0f}"
        added = "-"
        if "plain_memory" in r:
            added = f"{r['plain_memory']['added_mib']:.0f} / {r['search_memory']['added_mib']:.0f}"
        lines.append(
            f"| {r['model']}{_options(r.get('space'))} | {r['batch']} | {result['threads']} | {r['plain_step_ms']:.0f} | "
            f"{r['search_iter_ms']:.0f} | {r['ratio']:.2f}x | {mem} | {added} |"
        )
    table = "\n".join(lines) + "\n"
    Path(args.out).with_suffix(".md").write_text(table)
    print("\n" + table)


if __name__ == "__main__":
    main()
