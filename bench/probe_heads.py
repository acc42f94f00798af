"""Which attention heads the analysis searches, model by model: the analysis alone (no
search, prune, FLOPs, ONNX or checkpoint check: `bench_coverage.py` runs those), each model in
its own process with a time limit, one JSON line per model.

    python bench/probe_heads.py                              # the timm transformer list
    python bench/probe_heads.py --models timm:deit_tiny_patch16_224 --out /tmp/probe.jsonl
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def probe(model: str) -> dict[str, object]:
    """The analysis of ``model``: its width, depth and head choices and what keeps heads."""
    import torch
    from bench_coverage import heads_status

    from tasprune.models.traced import traced

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    try:
        tr = traced(model)
    except Exception as err:  # noqa: BLE001  (the table records every refusal)
        return {"model": model, "ok": False, "error": f"{type(err).__name__}: {err}"[:300]}
    attention, missing = heads_status(tr)
    why: dict[str, int] = {}
    for reason in missing.values():
        why[reason] = why.get(reason, 0) + 1
    return {
        "model": model,
        "ok": True,
        "widths": len(tr.searchable_groups()),
        "depths": len(tr.stages),
        "attention": len(attention),
        "heads_searched": len(attention) - len(missing),
        "why": why,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    from bench_coverage import TIMM_TRANSFORMERS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=[f"timm:{n}" for n in TIMM_TRANSFORMERS])
    ap.add_argument("--timeout", type=int, default=600, help="seconds per model")
    ap.add_argument("--out", type=Path, default=None, help="append the JSON lines here too")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # the subprocess entry
    args = ap.parse_args()
    if args.one:
        print(json.dumps(probe(args.one)))
        return
    for model in args.models:
        cmd = [sys.executable, __file__, "--one", model]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            lines = done.stdout.strip().splitlines()
            line = lines[-1] if lines else json.dumps({"model": model, "ok": False})
        except subprocess.TimeoutExpired:
            line = json.dumps({"model": model, "ok": False, "error": f"over {args.timeout} s"})
        print(line, flush=True)
        if args.out is not None:
            with args.out.open("a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
