"""Before/after of a change on a protocol's TAS arms: two results JSONs of `tasprune bench`
(the same protocol and teacher), one table with the rule of the issues: the after-mean passes
when it is within max(2 x combined std, 0.3 points) of the before-mean.

    python bench/compare_runs.py BEFORE.json AFTER.json --name fmnist-r20 --out bench/results/one-mechanism-fmnist-r20

Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any


def compare(before: dict[str, Any], after: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for method in before["methods"]:
        if method not in after["methods"]:
            continue
        b, a = before["methods"][method], after["methods"][method]
        combined = math.sqrt(b["top1_std"] ** 2 + a["top1_std"] ** 2)
        allowed = max(2 * combined, 0.3)
        diff = a["top1_mean"] - b["top1_mean"]
        rows.append(
            {
                "method": method,
                "before_mean": b["top1_mean"],
                "before_std": b["top1_std"],
                "after_mean": a["top1_mean"],
                "after_std": a["top1_std"],
                "diff": diff,
                "allowed": allowed,
                "pass": diff >= -allowed,
                "within_noise": abs(diff) <= allowed,
                "before_flops_ratio": b["flops_ratio_mean"],
                "after_flops_ratio": a["flops_ratio_mean"],
                "before_per_seed": b["top1_per_seed"],
                "after_per_seed": a["top1_per_seed"],
            }
        )
    return rows


def render(
    name: str, before: dict[str, Any], after: dict[str, Any], rows: list[dict[str, Any]]
) -> str:
    lines = [
        f"# {name}: before / after",
        "",
        f"Before: `{before.get('command', '?')}` (teacher {before['teacher'].get('top1', '?')}%).",
        f"After: `{after.get('command', '?')}` (teacher {after['teacher'].get('top1', '?')}%).",
        "",
        "Pass: the after-mean is not below the before-mean by more than max(2 x combined std, "
        "0.3 points).",
        "",
        "| method | before top-1 | after top-1 | after - before | allowed | FLOPs ratio before / after | |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['before_mean']:.2f} +- {r['before_std']:.2f} | "
            f"{r['after_mean']:.2f} +- {r['after_std']:.2f} | {r['diff']:+.2f} | {r['allowed']:.2f} | "
            f"{r['before_flops_ratio']:.3f} / {r['after_flops_ratio']:.3f} | "
            f"{'PASS' if r['pass'] else 'MISS'} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--name", required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    before, after = json.loads(args.before.read_text()), json.loads(args.after.read_text())
    rows = compare(before, after)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(
        json.dumps(
            {"name": args.name, "before": str(args.before), "after": str(args.after), "rows": rows},
            indent=2,
        )
        + "\n"
    )
    args.out.with_suffix(".md").write_text(render(args.name, before, after, rows))
    print(render(args.name, before, after, rows))


if __name__ == "__main__":
    main()
