"""`TrainConfig.compile`: torch.compile'd training gives the eager result (CPU inductor)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tasprune.config import TrainConfig
from tasprune.engine import fit


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


@pytest.mark.slow
def test_compiled_training_matches_eager() -> None:
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(64, 1, 8, 8), torch.randint(0, 3, (64,)))
    loader = DataLoader(data, batch_size=16)
    compiled, eager = _net(), _net()
    cfg = {"epochs": 2, "lr": 0.05, "channels_last": "off"}
    fit(compiled, loader, loader, TrainConfig(**cfg, compile=True), None, progress=False)
    fit(eager, loader, loader, TrainConfig(**cfg), None, progress=False)
    moved = max(
        (p - q).abs().max().item()
        for p, q in zip(compiled.parameters(), _net().parameters(), strict=True)
    )
    assert moved > 1e-3  # training happened
    for p, q in zip(compiled.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
