"""Torch-Pruning's coverage of the transformer lists: how many of the vision transformers that
bench_coverage.py's ``--transformers`` runs (torchvision's ViT, Swin and MaxViT; timm's
``TIMM_TRANSFORMERS``) Torch-Pruning can prune with head pruning, set up as its own ViT
examples set it up, so that the coverage table can show its count beside ours.

Per model, in its own subprocess (a crash or hang is that model's failure), one thread, random
weights, 10 classes, one image at the model's input side (``bench_coverage.input_side``):

1. **build**: ``timm.create_model(name, pretrained=False, num_classes=10)`` or
   ``torchvision.models.get_model(name, weights=None, num_classes=10)``, in eval mode; the
   reference output shape.
2. **pruner**: as examples/transformers/prune_timm_vit.py and examples/timm_models/
   prune_timm_models.py do: ``GroupMagnitudeImportance(p=2)``, ``pruning_ratio=0.5``, the
   classifier ignored (every Linear / conv with 10 outputs, and ``get_classifier()``'s
   modules), ``num_heads={qkv: num_heads}`` for every module with a ``qkv`` nn.Linear and an
   int ``num_heads`` (timm's Attention and its relatives, torchvision's Swin attention),
   ``prune_num_heads=True``, ``prune_head_dims=False``, ``head_pruning_ratio=0.5``. Torchvision's
   nn.MultiheadAttention is handled as examples/torchvision_models/torchvision_pruning.py does:
   in the channel groups (``out_channel_groups={mha: num_heads}``, the example's deprecated
   ``channel_groups``), not in ``num_heads``, so Torch-Pruning narrows its embedding per head
   and keeps the head count.
3. **step**: ``pruner.step()``.
4. **patch**: what the examples do after the step: every attention module's ``num_heads``
   from ``pruner.num_heads[qkv]``, its ``head_dim`` (qkv's outputs / 3 / heads) and
   ``attn_dim`` (heads x head_dim) where it has them; torchvision's VisionTransformer's
   ``hidden_dim`` from ``conv_proj``. The examples' replacement forward of timm's Attention is
   not needed: the installed timm reshapes by ``attn_dim``, not by the input's width.
5. **forward**: the pruned network on the example input.
6. **check**: its output has the reference shape and its parameter count went down.

A model passes when all six steps do. The record: status ok / failed, the failing step and
the error's first line (300 characters), parameters before / after, the attention modules'
total head count before / after and whether any head count changed, seconds. A pass with no
head count changed (nn.MultiheadAttention, or attention Torch-Pruning is not told of) pruned
channels only; the summary counts those apart.

    python bench/bench_tp_transformers.py [--models NAME ...] [--fresh] [--timeout S]
                                          [--results DIR]

Resumable: models already in DIR/tp-transformers.json (default bench/results) are skipped
(``--fresh`` redoes them). Writes DIR/tp-transformers.json and DIR/tp-transformers.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from bench_coverage import (  # noqa: E402
    TIMM_TRANSFORMERS,
    input_side,
    isolated,
    torchvision_models,
)

RESULTS = Path(__file__).parent / "results"
NUM_CLASSES = 10
RATIO = 0.5  # channel pruning ratio
HEAD_RATIO = 0.5  # head pruning ratio
STEPS = ("build", "pruner", "step", "patch", "forward", "check")


def all_models() -> list[str]:
    """torchvision's transformers, then timm's, with their prefixes."""
    return [f"torchvision:{n}" for n in torchvision_models(transformers=True)] + [
        f"timm:{n}" for n in TIMM_TRANSFORMERS
    ]


def tp_version() -> str:
    from importlib.metadata import version

    return version("torch-pruning")


def build(model: str) -> Any:
    """The network with random weights and 10 classes, in eval mode."""
    kind, name = model.split(":", 1)
    if kind == "timm":
        import timm

        net = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES)
    elif kind == "torchvision":
        import torchvision

        net = torchvision.models.get_model(name, weights=None, num_classes=NUM_CLASSES)
    else:
        raise ValueError(f"unknown prefix {kind!r} (timm: or torchvision:)")
    return net.eval()


def count_params(net: Any) -> int:
    return sum(p.numel() for p in net.parameters())


def classifier_layers(net: Any) -> list[Any]:
    """The output layers Torch-Pruning must keep: every Linear or conv with 10 outputs (as
    its torchvision example picks those with 1000) and timm's ``get_classifier()``."""
    from torch import nn

    found: list[Any] = [
        m
        for m in net.modules()
        if (isinstance(m, nn.Linear) and m.out_features == NUM_CLASSES)
        or (isinstance(m, nn.Conv2d) and m.out_channels == NUM_CLASSES)
    ]
    get = getattr(net, "get_classifier", None)
    head = get() if callable(get) else None
    if isinstance(head, nn.Module) and any(True for _ in head.parameters()):
        found.append(head)
    return found


def attention_modules(net: Any) -> dict[Any, Any]:
    """Attention module -> its qkv Linear, for every module with a ``qkv`` nn.Linear and an
    int ``num_heads`` (the examples' rule)."""
    from torch import nn

    return {
        m: m.qkv
        for m in net.modules()
        if isinstance(getattr(m, "qkv", None), nn.Linear)
        and isinstance(getattr(m, "num_heads", None), int)
    }


def mha_modules(net: Any) -> list[Any]:
    from torch import nn

    return [m for m in net.modules() if isinstance(m, nn.MultiheadAttention)]


def head_counts(attention: dict[Any, Any], mha: list[Any]) -> list[int]:
    """Every attention module's head count, in module order."""
    return [int(m.num_heads) for m in attention] + [int(m.num_heads) for m in mha]


def make_pruner(net: Any, x: Any, attention: dict[Any, Any], mha: list[Any]) -> Any:
    """Torch-Pruning's pruner, set up as its ViT examples set it up."""
    import torch_pruning as tp

    importance_cls = getattr(tp.importance, "GroupMagnitudeImportance", None)
    importance = (importance_cls or tp.importance.MagnitudeImportance)(p=2)
    pruner_cls = getattr(tp.pruner, "BasePruner", None) or tp.pruner.MetaPruner
    # Fresh dicts: BasePruner's defaults for these are shared, mutable ``dict()``s.
    return pruner_cls(
        net,
        x,
        importance=importance,
        pruning_ratio=RATIO,
        ignored_layers=classifier_layers(net),
        num_heads={qkv: int(m.num_heads) for m, qkv in attention.items()},
        out_channel_groups={m: int(m.num_heads) for m in mha},
        in_channel_groups={},
        prune_num_heads=True,
        prune_head_dims=False,
        head_pruning_ratio=HEAD_RATIO,
    )


def patch(net: Any, pruner: Any, attention: dict[Any, Any]) -> None:
    """The examples' fix-up after the step: the attributes forward reads."""
    for m, qkv in attention.items():
        heads = int(pruner.num_heads[qkv])
        head_dim = qkv.out_features // (3 * heads)
        m.num_heads = heads
        if isinstance(getattr(m, "head_dim", None), int):
            m.head_dim = head_dim
        if isinstance(getattr(m, "attn_dim", None), int):
            m.attn_dim = heads * head_dim
    conv_proj = getattr(net, "conv_proj", None)
    if isinstance(getattr(net, "hidden_dim", None), int) and conv_proj is not None:
        net.hidden_dim = conv_proj.out_channels  # torchvision's VisionTransformer


def run_one(model: str) -> dict[str, Any]:
    """Build, prune with head pruning, patch, forward, check: ok / failed with step and why."""
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    out: dict[str, Any] = {"model": model, "torch_pruning": tp_version()}
    t0 = time.perf_counter()
    step = "build"
    try:
        net = build(model)
        side = input_side(model)
        x = torch.randn(1, 3, side, side)
        with torch.no_grad():
            ref_shape = tuple(net(x).shape)
        attention, mha = attention_modules(net), mha_modules(net)
        out.update(
            input_side=side,
            params_before=count_params(net),
            attention_modules=len(attention),
            mha_modules=len(mha),
        )
        heads_before = head_counts(attention, mha)
        out["heads_before"] = sum(heads_before)
        step = "pruner"
        pruner = make_pruner(net, x, attention, mha)
        step = "step"
        pruner.step()
        step = "patch"
        patch(net, pruner, attention)
        out["params_after"] = count_params(net)
        heads_after = head_counts(attention, mha)
        out["heads_after"] = sum(heads_after)
        out["heads_changed"] = heads_after != heads_before
        step = "forward"
        with torch.no_grad():
            got = tuple(net(x).shape)
        step = "check"
        if got != ref_shape:
            raise RuntimeError(f"output shape {got}, not {ref_shape}")
        if not out["params_after"] < out["params_before"]:
            raise RuntimeError(f"parameters {out['params_after']}, not fewer")
        out["status"] = "ok"
    except Exception as err:  # noqa: BLE001  (the table records every failure)
        first = str(err).splitlines()[0] if str(err) else ""
        out.update(status="failed", step=step, error=f"{type(err).__name__}: {first}"[:300])
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def run_isolated(model: str, timeout: int) -> dict[str, Any]:
    """``run_one`` in a subprocess; a crash or a hang is that model's failure."""
    return isolated(__file__, model, timeout)


def params_ratio(r: dict[str, Any]) -> str:
    if "params_after" in r and r.get("params_before"):
        return f"{r['params_after'] / r['params_before']:.3f}"
    return ""


def heads_cell(r: dict[str, Any]) -> str:
    if "heads_changed" not in r:
        return ""
    if not r.get("heads_before"):
        return "no attention found"
    yes = "yes" if r["heads_changed"] else "no"
    return f"{yes} ({r['heads_before']} -> {r['heads_after']})"


def table(results: dict[str, dict[str, Any]]) -> str:
    head = ["model", "status", "step: why", "params ratio", "heads changed", "s"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        why = f"{r.get('step')}: {r.get('error', '')}" if r["status"] != "ok" else ""
        why = why.replace("|", "/").replace("\n", " ")
        rows.append(
            f"| {name} | {r['status']} | {why} | {params_ratio(r)} | {heads_cell(r)} | "
            f"{r['seconds']} |"
        )
    return "\n".join(rows)


def summary(results: dict[str, dict[str, Any]], version: str) -> str:
    ok = [r for r in results.values() if r["status"] == "ok"]
    heads = sum(bool(r.get("heads_changed")) for r in ok)
    return (
        f"Torch-Pruning {version}: {len(ok)} of {len(results)} prune with head pruning "
        f"({heads} of them with a head count changed; the rest pruned channels only)"
    )


DEFINITION = (
    "Pass: Torch-Pruning's pruner, set up as its ViT examples do (GroupMagnitudeImportance(p=2), "
    f"pruning_ratio={RATIO}, classifier ignored, num_heads of every module with a qkv Linear, "
    f"prune_num_heads=True, prune_head_dims=False, head_pruning_ratio={HEAD_RATIO}; "
    "nn.MultiheadAttention in the channel groups as its torchvision example does), "
    "step() completes, the attention attributes are patched as the examples patch them, and "
    "the pruned network's forward on one random image at the model's input side gives the "
    "reference output shape with fewer parameters. Random weights, 10 classes, one thread, one "
    "subprocess per model. See bench/bench_tp_transformers.py's docstring."
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--models", nargs="+", help="names with their prefix (timm:..., torchvision:...)"
    )
    ap.add_argument("--fresh", action="store_true", help="redo models already recorded")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per model")
    ap.add_argument(
        "--results",
        type=Path,
        default=RESULTS,
        help="folder of tp-transformers.json and tp-transformers.md",
    )
    ap.add_argument("--one", help=argparse.SUPPRESS)  # the subprocess entry
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one)))
        return
    models = args.models or all_models()
    folder: Path = args.results
    path = folder / "tp-transformers.json"
    data = json.loads(path.read_text()) if path.exists() else {"models": {}}
    results: dict[str, dict[str, Any]] = data["models"]
    version = tp_version()
    for i, model in enumerate(models):
        if model in results and not args.fresh:
            continue
        r = run_isolated(model, args.timeout)
        results[model] = r
        print(
            f"[{i + 1}/{len(models)}] {model}: {r['status']} "
            f"{r.get('step', '')} {r.get('error', '')[:120]} ({r['seconds']} s)",
            flush=True,
        )
        data.update(
            torch_pruning=version,
            pruning_ratio=RATIO,
            head_pruning_ratio=HEAD_RATIO,
            num_classes=NUM_CLASSES,
            steps=list(STEPS),
        )
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2) + "\n")
    folder.mkdir(parents=True, exist_ok=True)
    text = f"{DEFINITION}\n\n- {summary(results, version)}\n\n{table(results)}\n"
    (folder / "tp-transformers.md").write_text(text)
    print(summary(results, version))


if __name__ == "__main__":
    main()
