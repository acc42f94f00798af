"""Prune your own trained network to half its FLOPs inside your own training loop.

Everything here is the user's code: the model class, the data, the loss, the optimiser and
the loops. tasprune supplies `tasprune.TAS` (the searchable network and the architecture step),
`tasprune.Distiller` (a KD loss term) and `tasprune.prune` (a saved shape applied to a freshly
built original).

    python examples/own_loop.py                       # ~4 min on one CPU thread
    python examples/own_loop.py --images 1000 --epochs 1 --out /tmp/own-loop   # under a minute

Steps: train a small CNN on Fashion-MNIST (standing in for the model you already have), search
a shape at 0.5 of its FLOPs in a hand-written loop (weight steps on one half of the training
images, architecture steps on the other), prune it, fine-tune the pruned network with a simple
distillation loss, then save the shape and weights, rebuild from a fresh original and check
that the outputs are the same.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import tasprune
from tasprune.datasets import load_dataset


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: Tensor) -> Tensor:
        return (x + self.bn2(self.conv2(self.bn1(self.conv1(x)).relu()))).relu()


class SmallNet(nn.Module):
    """The user's own network: any nn.Module would do."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        )
        self.stage1 = nn.Sequential(Block(width), Block(width), Block(width))
        self.down = nn.Sequential(
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
        )
        self.stage2 = nn.Sequential(Block(2 * width), Block(2 * width), Block(2 * width))
        self.head = nn.Linear(2 * width, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stage1(self.stem(x).relu())
        x = self.stage2(self.down(x).relu())
        return self.head(x.mean((2, 3)))


def batches(x: Tensor, y: Tensor, size: int, seed: int) -> list[tuple[Tensor, Tensor]]:
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return [(x[order[i : i + size]], y[order[i : i + size]]) for i in range(0, len(x), size)]


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    with torch.no_grad():
        hits = sum(
            int((model(x[i : i + 500]).argmax(1) == y[i : i + 500]).sum())
            for i in range(0, len(x), 500)
        )
    return 100.0 * hits / len(x)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--images", type=int, default=6000, help="training images used")
    ap.add_argument("--epochs", type=int, default=3, help="epochs of each phase")
    ap.add_argument("--out", type=Path, default=Path("runs/own-loop"))
    args = ap.parse_args()
    torch.manual_seed(0)
    train, test = load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "test")
    x, y = train.images[: args.images].float() / 255, train.labels[: args.images]
    xt, yt = test.images[:2000].float() / 255, test.labels[:2000]

    # 1. The model you already have (trained here so that the example stands alone).
    model = SmallNet()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for epoch in range(args.epochs):
        model.train()
        for xb, yb in batches(x, y, 128, epoch):
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
    print(f"trained model: {accuracy(model, xt, yt):.2f}% on 2000 test images")

    # 2. The search, in your loop: weight steps on split A, architecture steps on split B.
    half = len(x) // 2
    tas = tasprune.TAS(model, x[:1], epochs=args.epochs, flops_ratio=0.5, arch_lr=0.15)
    net = tas.model  # your network, searchable; the architecture logits are not in it
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    for epoch in range(args.epochs):
        net.train()
        split_a = batches(x[:half], y[:half], 64, 10 + epoch)
        split_b = batches(x[half:], y[half:], 64, 20 + epoch)
        for (xa, ya), (xb, yb) in zip(split_a, split_b, strict=False):
            loss = F.cross_entropy(net(xa), ya)
            opt.zero_grad()
            loss.backward()
            opt.step()
            tas.arch_step(lambda xb=xb, yb=yb: F.cross_entropy(net(xb), yb))
        row = tas.end_epoch()
        print(
            f"search epoch {epoch + 1}: FLOPs ratio {row['flops_ratio']:.3f}, entropy {row['entropy_mean']:.2f}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    shape = tas.save_shape(args.out / "shape.json")

    # 3. The physically smaller network (an instance of SmallNet), fine-tuned by distillation
    #    from the model (tasprune.Distiller: soft targets on the output, features of stage2).
    student = tas.prune(shape)
    kd = tasprune.Distiller(
        model, student, outputs={"": "soft"}, features=["stage2"], example_inputs=x[:2]
    )
    opt = torch.optim.AdamW([*student.parameters(), *kd.parameters()], lr=1e-3)
    for epoch in range(args.epochs):
        student.train()
        for xb, yb in batches(x, y, 128, 30 + epoch):
            logits = student(xb)
            loss = 0.1 * F.cross_entropy(logits, yb) + 0.9 * kd(xb, logits)
            opt.zero_grad()
            loss.backward()
            opt.step()
    full = tasprune.model_cost(tas.name)[0]
    pruned = tasprune.model_cost(tas.name, shape)[0]
    print(f"pruned model: {accuracy(student, xt, yt):.2f}% at {pruned / full:.3f} of the FLOPs")

    # 4. Saved without pickling (shape.json + state dict), rebuilt from a fresh original.
    torch.save(student.state_dict(), args.out / "student.pt")
    again = tasprune.prune(SmallNet(), args.out / "shape.json", example_inputs=x[:1])
    again.load_state_dict(torch.load(args.out / "student.pt", weights_only=True))
    same = torch.equal(again.eval()(xt[:100]), student.eval()(xt[:100]))
    print(f"rebuilt from a fresh SmallNet: outputs {'equal' if same else 'DIFFER'}")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
