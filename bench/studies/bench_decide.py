"""Do the searches decide? Final entropy and seed agreement of TAS searches on a protocol's
data and converged teacher (fmnist-r20 by default), over the architecture optimiser's learning rate and
weight decay, the epochs and the Gumbel temperature schedule.

Per (arch_lr, arch_weight_decay, tau_max:tau_min, epochs, seed): one search warm-started from
the converged teacher (``--teacher``: a model.pt trained with the protocol's teacher recipe),
the protocol's other search settings (and its weight decay and tau schedule unless given). The
table gives the last epoch's mean / max normalised entropy (1 = uniform), the FLOPs ratio of
the kept shape and where it came from, and per setting the agreement of the seeds' shapes
(fraction of width and depth choices with the same value). The issue's goal: mean entropy
<= 0.3 with the seeds agreeing.

    python bench/studies/bench_decide.py [--arch-lrs 0.05 0.15 0.5] [--arch-wds 0 1e-3] [--taus 5:0.1]
        [--epochs 10] [--seeds 0 1] [--protocol YAML] [--teacher PATH] [--name decide]

Resumable (each search resumes in runs/decide/...). Writes bench/results/NAME.json / .md.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path
from typing import Any

import torch

from tasprune.bench import load_protocol
from tasprune.checkpoint import load_model_checkpoint
from tasprune.errors import ConfigError
from tasprune.pipeline import load_run_data
from tasprune.shape import Shape
from tasprune.stages import StageContext, search_shape

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"
TEACHER = ROOT / "runs" / "cache" / "teacher-fmnist-r20-converged" / "model.pt"


def tau_pair(text: str) -> tuple[float, float]:
    """``"5:0.1"`` -> (tau_max, tau_min)."""
    try:
        hi, lo = (float(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--taus wants MAX:MIN such as 5:0.1, got {text!r}"
        ) from None
    return hi, lo


def agreement(shapes: list[Shape]) -> float:
    """Fraction of choices on which every seed's shape has the same value."""
    keys = [("w", k) for k in shapes[0].widths] + [("d", k) for k in shapes[0].depths]
    same = 0
    for part, k in keys:
        values = {(s.widths if part == "w" else s.depths)[k] for s in shapes}
        same += len(values) == 1
    return same / len(keys)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch-lrs", type=float, nargs="+", default=[0.05, 0.15, 0.5])
    ap.add_argument("--arch-wds", type=float, nargs="+", help="default: the protocol's")
    ap.add_argument("--taus", type=tau_pair, nargs="+", help="MAX:MIN; default: the protocol's")
    ap.add_argument("--epochs", type=int, nargs="+", default=[10])
    ap.add_argument("--teacher", type=Path, default=TEACHER)
    ap.add_argument(
        "--protocol",
        type=Path,
        default=ROOT / "bench" / "protocols" / "fmnist-r20.yaml",
        help="the protocol whose data and search settings are used (fmnist-r20 or -f30)",
    )
    ap.add_argument("--name", default="decide", help="results file stem in bench/results/")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "decide")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = ap.parse_args()
    if not args.teacher.is_file():
        raise SystemExit(
            f"error: teacher {args.teacher} does not exist. Fix: pass --teacher with the model.pt "
            "of a teacher trained with the protocol's teacher recipe"
        )
    try:
        protocol, recipe = load_protocol(args.protocol)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    torch.set_num_threads(args.threads)
    base = recipe.search
    wds = args.arch_wds or [base.arch_weight_decay]
    taus = args.taus or [(base.tau_max, base.tau_min)]
    data = load_run_data(recipe)
    teacher, _ = load_model_checkpoint(args.teacher)
    ctx = StageContext(recipe, data, torch.device("cpu"), progress=False)
    rows: list[dict[str, Any]] = []
    grid = itertools.product(args.arch_lrs, wds, taus, args.epochs)
    for lr, wd, (tau_max, tau_min), epochs in grid:
        shapes = []
        for seed in args.seeds:
            update = {"arch_lr": lr, "arch_weight_decay": wd, "tau_max": tau_max}
            update |= {"tau_min": tau_min, "epochs": epochs, "seed": seed}
            cfg = base.model_copy(update=update)
            # at the protocol's weight decay and tau schedule the folder keeps its old name
            own = (wd, tau_max, tau_min) == (base.arch_weight_decay, base.tau_max, base.tau_min)
            extra = "" if own else f"-wd{wd}-t{tau_max}:{tau_min}"
            out = args.out / f"lr{lr}{extra}-e{epochs}-s{seed}"
            result = search_shape(ctx, out, ctx.ordered(teacher), cfg)
            last = json.loads((out / "history.jsonl").read_text().splitlines()[-1])
            info = json.loads((out / "shape.json").read_text())
            shapes.append(result.shape)
            rows.append(
                {
                    "protocol": protocol.name,
                    "arch_lr": lr,
                    "arch_weight_decay": wd,
                    "tau_max": tau_max,
                    "tau_min": tau_min,
                    "epochs": epochs,
                    "seed": seed,
                    "entropy_mean": last["entropy_mean"],
                    "entropy_max": last["entropy_max"],
                    "flops_ratio": result.flops_ratio,
                    "source": info.get("source"),
                    "valid_top1": last["valid_top1"],
                    "shape": result.shape.to_dict(),
                }
            )
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "shape"}), flush=True)
        for r in rows[-len(args.seeds) :]:
            r["seed_agreement"] = agreement(shapes)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    lines = [
        "| arch_lr | arch wd | tau | epochs | seed | entropy mean | entropy max | FLOPs ratio | "
        "kept | valid top-1 | seed agreement |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['arch_lr']} | {r['arch_weight_decay']:g} | {r['tau_max']:g} -> "
            f"{r['tau_min']:g} | {r['epochs']} | {r['seed']} | {r['entropy_mean']:.3f} | "
            f"{r['entropy_max']:.3f} | {r['flops_ratio']:.3f} | {r['source']} | "
            f"{r['valid_top1']:.2f} | {r['seed_agreement']:.2f} |"
        )
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
