"""New projection shortcuts: identity or random init? The same TAS shapes, the same teacher,
search, distillation and schedule; only the init of the shortcuts the pruned network has and
its source lacks differs (`distill.new_shortcuts`). Uniform scaling beside them.

A block whose pruned input and output widths differ (the searched widths are per conv) gets a
1x1 projection shortcut where the unpruned network adds its input unchanged. The source
(teacher or supernet) has no weights for it, so it used to start at random: dozens of those in
a ResNet-56 replace the residual stream by random mixes of it. Per seed this runs, in the
protocol's run folder (resumable, shared with `tasprune bench`): the protocol's search, then
the TAS+KD student with `new_shortcuts: identity` and with `fresh` (RUN/shortcut-study/), a
search with residual widths tied per stage (`tie_residual`, no new projections) and its
student, the uniform student, and with --random the random in-band shape's student both ways.

    python bench/studies/bench_shortcuts.py bench/protocols/fmnist-r56.yaml --out-root runs/bench-win \\
        --threads 2 [--seeds 0 1 2] [--random]

Writes bench/results/shortcuts-<protocol>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from tasprune.bench.protocol import load_protocol
from tasprune.bench.runner import _Bench
from tasprune.cost import model_cost
from tasprune.models import create_model
from tasprune.models.ops import Projection
from tasprune.pipeline import load_supernet_state
from tasprune.shape import Shape
from tasprune.stages import StageContext, search_shape, train_student

RESULTS = Path(__file__).resolve().parents[1] / "results"


def _student(
    bench: _Bench,
    seed: int,
    method: str,
    shape: Shape,
    init: str,
    search: Path | None = None,
    ctx: StageContext | None = None,
) -> dict[str, Any]:
    """TAS+KD-style student of ``shape`` with ``new_shortcuts=init``, initialised from the
    supernet in ``search`` (default: the protocol's search of the seed); resumable."""
    folder = bench.root / "shortcut-study" / f"seed-{seed}" / f"{method}-{init}"
    result_file = folder / "result.json"
    if not result_file.is_file():
        r = bench.recipe
        tcfg = r.distill.train.model_copy(update={"seed": seed})
        cfg = r.distill.model_copy(update={"train": tcfg, "new_shortcuts": init})
        search = search or bench.root / f"seed-{seed}" / "search"
        supernet = load_supernet_state(search / "supernet.pt")
        folder.mkdir(parents=True, exist_ok=True)
        metrics = train_student(
            ctx or bench.ctx, folder, shape, bench.teacher, cfg=cfg, supernet_state=supernet
        )
        result = {"top1": metrics["top1"], "new_projections": _new_projections(bench, shape)}
        result_file.write_text(json.dumps(result) + "\n")
    out = dict(json.loads(result_file.read_text()))
    train = bench.data[0]
    flops, _ = model_cost(bench.recipe.model, shape, bench.input_size, train.num_classes)
    full, _ = model_cost(bench.recipe.model, None, bench.input_size, train.num_classes)
    out.update(flops_ratio=flops / full, depths=dict(shape.depths))
    return out


def _new_projections(bench: _Bench, shape: Shape) -> int:
    """Projection shortcuts of the pruned network that the unpruned one does not have."""
    train = bench.data[0]
    full = {n for n, m in bench.teacher.named_modules() if isinstance(m, Projection)}
    net = create_model(
        bench.recipe.model, shape, num_classes=train.num_classes, in_channels=train.in_channels
    )
    return sum(1 for n, m in net.named_modules() if isinstance(m, Projection) and n not in full)


def _stats(xs: list[float]) -> str:
    std = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.2f} ± {std:.2f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("protocol")
    ap.add_argument("--out-root", type=Path, default=Path("runs/bench"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument("--random", action="store_true", help="also the random in-band shapes")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    proto, recipe = load_protocol(args.protocol)
    bench = _Bench(proto, recipe, args.out_root / proto.name, progress=False)
    bench.prepare()
    bench.stage_teacher()
    seeds = args.seeds if args.seeds is not None else list(proto.seeds)
    rows: list[dict[str, Any]] = []
    for seed in seeds:
        bench.stage_search(seed)
        row: dict[str, Any] = {"seed": seed}
        tas = bench.method_shape("tas_kd", seed)
        for init in ("identity", "fresh"):
            row[f"tas-{init}"] = _student(bench, seed, "tas", tas, init)
        # residual widths tied per stage (`search.tie_residual`): no new projections at all
        tied_cfg = recipe.search.model_copy(update={"seed": seed, "tie_residual": True})
        tied_ctx = replace(bench.ctx, recipe=recipe.model_copy(update={"search": tied_cfg}))
        tied_dir = bench.root / "shortcut-study" / f"seed-{seed}" / "search-tied"
        tied = search_shape(tied_ctx, tied_dir, bench.teacher, tied_cfg).shape
        row["tas-tied"] = _student(bench, seed, "tas-tied", tied, "identity", tied_dir, tied_ctx)
        bench.stage_method("uniform_kd", seed)  # no new projections: the knob does not apply
        uni = json.loads((bench.root / f"seed-{seed}" / "uniform_kd" / "result.json").read_text())
        row["uniform"] = {
            "top1": uni["top1"],
            "new_projections": 0,
            "flops_ratio": uni["flops_ratio"],
            "depths": uni["shape"]["depths"],
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.random:
        for row in rows:
            shape = bench.method_shape("random_kd", row["seed"])
            for init in ("identity", "fresh"):
                row[f"random-{init}"] = _student(bench, row["seed"], "random", shape, init)
            print(json.dumps(row), flush=True)
    teacher = json.loads((bench.root / "teacher" / "final.json").read_text())["metrics"]
    variants = [k for k in rows[0] if k != "seed"]
    out = {
        "protocol": proto.name,
        "command": "python " + " ".join(sys.argv),
        "teacher_top1": teacher.get("top1"),
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"shortcuts-{proto.name}.json").write_text(json.dumps(out, indent=1) + "\n")
    lines = [
        f"# {proto.name}: new projection shortcuts as identities or at random",
        "",
        f"Command: `{out['command']}`; teacher {teacher.get('top1')}%.",
        "",
        "| student | top-1 % (mean ± std) | per seed | new projections per seed | "
        "FLOPs ratio per seed | depths per seed |",
        "|---|---|---|---|---|---|",
    ]
    for v in variants:
        done = [r for r in rows if v in r]
        per = ", ".join(f"{r[v]['top1']:.2f}" for r in done)
        proj = ", ".join(str(r[v]["new_projections"]) for r in done)
        fl = ", ".join(f"{r[v]['flops_ratio']:.3f}" for r in done)
        dep = "; ".join("/".join(str(d) for d in r[v]["depths"].values()) for r in done)
        top = _stats([r[v]["top1"] for r in done])
        lines.append(f"| {v} | {top} | {per} | {proj} | {fl} | {dep} |")
    (RESULTS / f"shortcuts-{proto.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
