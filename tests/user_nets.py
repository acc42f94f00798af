"""A user's own network, importable by the tests (tests/ is on sys.path): what
``py:user_nets:tiny_net`` names."""

from __future__ import annotations

from torch import Tensor, nn


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn1(self.conv1(x)).relu()
        return (x + self.bn2(self.conv2(y))).relu()


class TinyNet(nn.Module):
    def __init__(self, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.blocks = nn.Sequential(Block(16), Block(16), Block(16))
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(self.stem(x).relu())
        return self.head(x.mean((2, 3)))


def tiny_net(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return TinyNet(num_classes, in_channels)


class PlainNet(nn.Module):
    """Three convs and a head, no residual block: width choices, no depth choice."""

    def __init__(self, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 8, 3, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
        )
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).mean((2, 3)))


def plain_net(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return PlainNet(num_classes, in_channels)


class TwoHeads(nn.Module):
    """A detector-like network a user holds as an instance: a residual trunk and two heads
    (boxes and scores) returned in a dict, with a list inside; no classifier anywhere."""

    def __init__(self, in_channels: int = 1, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width)
        )
        self.trunk = nn.Sequential(Block(width), Block(width), Block(width))
        self.neck = nn.Sequential(
            nn.Conv2d(width, 24, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(24), nn.ReLU()
        )
        self.box = nn.Conv2d(24, 4, 1)
        self.score = nn.Conv2d(24, 3, 1)

    def forward(self, x: Tensor) -> dict[str, object]:
        f = self.neck(self.trunk(self.stem(x).relu()))
        return {"boxes": self.box(f), "scores": [self.score(f)]}


class KeptBoxes(TwoHeads):
    """TwoHeads whose eval output keeps only the boxes scoring above the mean, as a detector's
    post-processing does: how many come out depends on the weights and the data."""

    def forward(self, x: Tensor) -> dict[str, object]:  # type: ignore[override]
        out = super().forward(x)
        if self.training:
            return out
        boxes = out["boxes"].permute(0, 2, 3, 1).reshape(-1, 4)  # type: ignore[union-attr]
        scores = out["scores"][0][:, 0].flatten()  # type: ignore[index]
        keep = scores > scores.mean()
        return {"boxes": boxes[keep], "scores": scores[keep]}
