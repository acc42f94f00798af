"""Which heads to keep: an importance per head measured one-shot on the converged ViT teacher.

The search keeps the first k heads of each attention module, so the order the heads are put
in before it decides which heads a width choice keeps. This study prunes the committed
``fmnist-vit`` teacher (6 blocks of 4 heads) to k heads in every block without fine-tuning,
with the heads ordered by each criterion, and scores it on the Fashion-MNIST test set:

- ``trained``: the order the heads were trained in (no ordering);
- ``l1``: the mean absolute weight of the head's q/k/v rows and output-projection columns
  (what ``teacher.order`` does to heads, whatever the channel criterion);
- ``taylor``: a first-order score, sum over those weights of |w x dL/dw| on 8 training
  batches of 128 (cross-entropy);
- ``random``: 5 random orders (their mean and spread), the reference a criterion must beat.

    python bench/studies/bench_head_order.py [--teacher bench/teachers/fmnist-vit.pt]

Writes bench/results/head-order.json and head-order.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from tasprune.api import load
from tasprune.datasets import load_dataset
from tasprune.epoch import evaluate
from tasprune.models.attention import find_attention, permute_heads, prune_heads

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"


def head_weights(net: nn.Module, att: Any, h: int) -> list[torch.Tensor]:
    """The weights of head ``h`` (q, k and v rows, output-projection columns), as views."""
    out = net.get_submodule(att.out).weight
    rows = [
        net.get_submodule(layer).weight[att.part_rows(i, [h])]
        for i, (layer, _) in enumerate(att.rows)
    ]
    return [*rows, out[:, att.out_columns([h])]]


@torch.no_grad()
def l1_scores(net: nn.Module) -> list[list[float]]:
    return [
        [sum(float(w.abs().mean()) for w in head_weights(net, att, h)) for h in range(att.heads)]
        for att in find_attention(net)[0]
    ]


def taylor_scores(net: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> list[list[float]]:
    net.zero_grad()
    for i in range(0, len(images), 128):
        F.cross_entropy(net(images[i : i + 128]), labels[i : i + 128]).backward()
    scores = []
    for att in find_attention(net)[0]:
        per_head = []
        for h in range(att.heads):
            total = 0.0
            for i, (layer, _) in enumerate(att.rows):
                p = net.get_submodule(layer).weight
                idx = att.part_rows(i, [h])
                total += float((p[idx] * p.grad[idx]).abs().sum())
            p = net.get_submodule(att.out).weight
            cols = att.out_columns([h])
            total += float((p[:, cols] * p.grad[:, cols]).abs().sum())
            per_head.append(total)
        scores.append(per_head)
    net.zero_grad()
    return scores


def pruned_accuracy(
    net: nn.Module, orders: list[list[int]], keep: int, x: torch.Tensor, y: torch.Tensor
) -> float:
    """Top-1 % of ``net`` with its heads in ``orders`` and the first ``keep`` of each kept."""
    small = copy.deepcopy(net)
    for att, order in zip(find_attention(small)[0], orders, strict=True):
        permute_heads(small, att, order)
    for att in find_attention(small)[0]:
        prune_heads(small, att, keep * att.unit)
    batches = [(x[i : i + 500], y[i : i + 500]) for i in range(0, len(x), 500)]
    return evaluate(small, batches, torch.device("cpu"))["top1"]


def ranked(scores: list[list[float]]) -> list[list[int]]:
    return [sorted(range(len(s)), key=lambda h: -s[h]) for s in scores]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default=str(ROOT / "bench" / "teachers" / "fmnist-vit.pt"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    wrapped = load(args.teacher)
    net = wrapped.net.eval()
    test = load_dataset("fashion-mnist", "test")
    train = load_dataset("fashion-mnist", "train")
    x = wrapped.preprocess(test.images)
    y = test.labels
    pick = torch.randperm(len(train.labels), generator=torch.Generator().manual_seed(0))[:1024]
    xt, yt = wrapped.preprocess(train.images[pick]), train.labels[pick]
    heads = [att.heads for att in find_attention(net)[0]]
    orders = {
        "trained": [list(range(h)) for h in heads],
        "l1": ranked(l1_scores(net)),
        "taylor": ranked(taylor_scores(net, xt, yt)),
    }
    gen = torch.Generator().manual_seed(1)
    randoms = [[torch.randperm(h, generator=gen).tolist() for h in heads] for _ in range(5)]
    rows = []
    full = pruned_accuracy(net, orders["trained"], max(heads), x, y)
    for keep in range(1, max(heads)):
        row: dict[str, Any] = {"keep": keep}
        for name, order in orders.items():
            row[name] = pruned_accuracy(net, order, keep, x, y)
        accs = [pruned_accuracy(net, order, keep, x, y) for order in randoms]
        row["random_mean"], row["random_std"] = statistics.mean(accs), statistics.stdev(accs)
        print(json.dumps(row), flush=True)
        rows.append(row)
    out = {"teacher": args.teacher, "full": full, "heads": heads, "orders": orders, "rows": rows}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "head-order.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [
        f"# Head ordering, one-shot on {Path(args.teacher).name} ({full:.2f}% unpruned)",
        "",
        "| heads kept per block | trained order | L1 | Taylor | random (5 orders) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['keep']} of {max(heads)} | {r['trained']:.2f} | {r['l1']:.2f} | "
            f"{r['taylor']:.2f} | {r['random_mean']:.2f} +- {r['random_std']:.2f} |"
        )
    (args.results / "head-order.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
