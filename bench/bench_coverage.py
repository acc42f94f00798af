"""Coverage of the traced path: every torchvision classification CNN and a fixed list of timm
CNN families, each through the whole mechanism on a small input.

Per model: build -> channel groups and depth stages from the traced graph -> SuperNet -> two
search iterations (weight + architecture step on random data) -> derive at FLOPs ratio 0.5
(projected into the band) -> physical prune -> forward -> counted FLOPs (torch.utils.
flop_counter) equal to the prediction and inside the band -> ONNX export with the ONNX Runtime
parity check. Each model runs in its own subprocess (a crash or hang is that model's failure).

    python bench/bench_coverage.py [--only torchvision|timm] [--models NAME ...] [--fresh]

Resumable: models already in bench/results/coverage.json are skipped (``--fresh`` redoes
them). Writes coverage.json and coverage.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
RATIO = 0.5
SIDE = 64
# Excluded by rule: transformers (ViT, Swin, MaxViT: no conv channel groups to search) and
# networks over 200 M parameters at 10 classes (time, and ONNX's 2 GB limit): regnet_y_128gf.
# The list is torchvision.models.list_models(module=torchvision.models) of torchvision 0.29.1
# minus those: 67 networks.
TRANSFORMER_PREFIXES = ("vit_", "swin_", "swin3d", "maxvit_")
TOO_LARGE = ("regnet_y_128gf",)
# The timm list: the smallest variant of each CNN family (fixed before the first run).
TIMM = [
    "resnet18",
    "resnet18d",
    "resnet26t",
    "resnet50d",
    "resnext26ts",
    "seresnext26d_32x4d",
    "wide_resnet50_2",
    "resnetv2_50",
    "resnetrs50",
    "res2net50_14w_8s",
    "res2next50",
    "resnest14d",
    "skresnet18",
    "eca_resnet33ts",
    "gcresnet33ts",
    "regnetx_002",
    "regnety_002",
    "regnetz_b16",
    "efficientnet_b0",
    "efficientnet_lite0",
    "efficientnetv2_rw_t",
    "tf_efficientnetv2_b0",
    "mobilenetv2_050",
    "mobilenetv3_small_050",
    "mobilenetv3_large_100",
    "mobilenetv4_conv_small",
    "mnasnet_small",
    "mixnet_s",
    "fbnetc_100",
    "spnasnet_100",
    "tinynet_e",
    "lcnet_050",
    "ghostnet_050",
    "ghostnetv2_100",
    "hardcorenas_a",
    "semnasnet_050",
    "densenet121",
    "dla34",
    "dpn48b",
    "convnext_atto",
    "convnextv2_atto",
    "cspresnet50",
    "cspdarknet53",
    "cs3darknet_s",
    "darknet53",
    "nf_resnet26",
    "rexnet_100",
    "hrnet_w18_small",
    "selecsls42b",
    "vovnet39a",
    "ese_vovnet19b_dw",
    "gernet_s",
    "repvgg_a0",
    "inception_v3",
    "xception41",
    "mobileone_s0",
    "repghostnet_050",
    "hgnet_tiny",
    "hgnetv2_b0",
    "vgg11_bn",
    "fastvit_t8",
    "efficientvit_b0",
    "tresnet_m",
    "dm_nfnet_f0",
]


def torchvision_models() -> list[str]:
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    return [
        n for n in sorted(names) if not n.startswith(TRANSFORMER_PREFIXES) and n not in TOO_LARGE
    ]


def run_one(model: str) -> dict[str, Any]:
    """The whole mechanism on one model; the first failing step and why."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from tasprune.config import SearchConfig
    from tasprune.models import create_model
    from tasprune.models.traced import min_side, traced
    from tasprune.search.supernet import SuperNet

    torch.set_num_threads(1)
    torch.manual_seed(0)
    out: dict[str, Any] = {"model": model}
    side = max(SIDE, min_side(model))
    if model.split(":", 1)[1].startswith(("vgg", "alexnet")):
        side = 224  # ONNX's adaptive average pool needs the 7x7 grid to divide the feature map
    step = "build"
    t0 = time.perf_counter()
    try:
        tr = traced(model)
        step = "groups"
        out["width_choices"] = len(tr.searchable_groups())
        out["fixed_widths"] = len(tr.groups) - len(tr.searchable_groups())
        out["depth_choices"] = len(tr.stages)
        step = "supernet"
        cfg = SearchConfig(epochs=1, batch_size=8, flops_ratio=RATIO)
        net = SuperNet(
            model, num_classes=10, in_channels=3, input_size=(side, side), options=cfg.space()
        )
        net.train()
        w_opt = torch.optim.SGD(net.weight_parameters(), lr=0.01, momentum=0.9)
        a_opt = torch.optim.Adam(net.arch_parameters(), lr=0.05)
        budget = cfg.budget
        step = "search"
        for _ in range(2):
            x, y = torch.randn(8, 3, side, side), torch.randint(0, 10, (8,))
            w_opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            w_opt.step()
            a_opt.zero_grad()
            flops, _ = net.expected_cost()
            hard, _ = net.argmax_cost()
            loss = F.cross_entropy(net(x), y) + budget.loss(flops, hard, net.full_flops, 2.0)
            loss.backward()
            a_opt.step()
        step = "derive"
        shape = net.project(net.derive(), budget)
        predicted, params = net.shape_cost(shape)
        out["flops_ratio"] = predicted / net.full_flops
        step = "prune"
        pruned = create_model(model, shape, num_classes=10, in_channels=3).eval()
        step = "forward"
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            logits = pruned(torch.randn(2, 3, side, side))
        if tuple(logits.shape) != (2, 10):
            raise RuntimeError(f"output shape {tuple(logits.shape)}, not (2, 10)")
        step = "flops"
        counted = counter.get_total_flops() // 4  # 2 FLOPs per MAC, batch of 2
        out["counted_equals_predicted"] = counted == predicted
        out["params_equal"] = sum(p.numel() for p in pruned.parameters()) == params
        if counted != predicted:
            raise RuntimeError(f"counted {counted} MACs, predicted {predicted}")
        if not budget.contains(predicted, net.full_flops):
            raise RuntimeError(f"FLOPs ratio {predicted / net.full_flops:.3f} outside the band")
        step = "onnx"
        onnx_parity(pruned, side)
        out["status"] = "ok"
    except Exception as err:  # noqa: BLE001  (the table records every failure)
        first = str(err).splitlines()[0] if str(err) else ""
        out.update(status="failed", step=step, error=f"{type(err).__name__}: {first[:300]}")
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def onnx_parity(model: Any, side: int) -> None:
    import tempfile

    import numpy as np
    import onnxruntime as ort
    import torch

    x = torch.rand(2, 3, side, side)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        torch.onnx.export(model, (x,), str(path), input_names=["x"], dynamo=False)
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = sess.run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        ref = model(x).numpy()
    diff = float(np.abs(got - ref).max())
    if diff > 1e-4 * max(1.0, float(np.abs(ref).max())):
        raise RuntimeError(f"ONNX Runtime differs from PyTorch by {diff:.3g}")


def table(results: dict[str, dict[str, Any]]) -> str:
    rows = [
        "| model | status | width choices | depth choices | FLOPs ratio | s | failed step: why |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        ratio = f"{r['flops_ratio']:.3f}" if "flops_ratio" in r else ""
        why = f"{r.get('step')}: {r.get('error', '')}" if r["status"] != "ok" else ""
        rows.append(
            f"| {name} | {r['status']} | {r.get('width_choices', '')} | "
            f"{r.get('depth_choices', '')} | {ratio} | {r['seconds']} | {why.replace('|', '/')} |"
        )
    return "\n".join(rows)


def summary(results: dict[str, dict[str, Any]]) -> str:
    lines = []
    for kind in ("torchvision", "timm"):
        rs = [r for n, r in results.items() if n.startswith(kind + ":")]
        ok = sum(r["status"] == "ok" for r in rs)
        lines.append(f"- {kind}: {ok} of {len(rs)} pass every step")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["torchvision", "timm"])
    ap.add_argument("--models", nargs="+", help="names with their prefix (torchvision:...)")
    ap.add_argument("--fresh", action="store_true", help="redo models already recorded")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per model")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # the subprocess entry
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one)))
        return
    models = args.models or (
        ([] if args.only == "timm" else [f"torchvision:{n}" for n in torchvision_models()])
        + ([] if args.only == "torchvision" else [f"timm:{n}" for n in TIMM])
    )
    path = RESULTS / "coverage.json"
    data = json.loads(path.read_text()) if path.exists() else {"models": {}}
    results: dict[str, dict[str, Any]] = data["models"]
    for i, model in enumerate(models):
        if model in results and not args.fresh:
            continue
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(
                [sys.executable, __file__, "--one", model],
                capture_output=True,
                text=True,
                timeout=args.timeout,
                env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
            )
            last = proc.stdout.strip().splitlines()[-1:] if proc.stdout.strip() else []
            r = (
                json.loads(last[0])
                if last
                else {
                    "model": model,
                    "status": "failed",
                    "step": "process",
                    "error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300],
                }
            )
        except subprocess.TimeoutExpired:
            r = {
                "model": model,
                "status": "failed",
                "step": "timeout",
                "error": f"over {args.timeout} s",
            }
        r.setdefault("seconds", round(time.perf_counter() - t0, 1))
        results[model] = r
        print(
            f"[{i + 1}/{len(models)}] {model}: {r['status']} "
            f"{r.get('step', '')} {r.get('error', '')[:120]} ({r['seconds']} s)",
            flush=True,
        )
        data.update(ratio=RATIO, input_side=SIDE, torch_pruning_metapruner_anchor="61 of 65")
        RESULTS.mkdir(exist_ok=True)
        path.write_text(json.dumps(data, indent=2) + "\n")
    (RESULTS / "coverage.md").write_text(summary(results) + "\n\n" + table(results) + "\n")
    print(summary(results))


if __name__ == "__main__":
    main()
