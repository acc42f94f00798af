"""Independent residual widths in the one traced mechanism (the paper's space) for networks
whose blocks declare a replaceable identity shortcut (the shipped ResNets and MobileNetV2):
the shortcut becomes an identity 1x1 projection, each block's output its own width choice,
tied back into one choice per stream by default. On random shapes of both spaces the counted
FLOPs equal the prediction, the searchable network at a shape is the pruned network (which has
a projection exactly where a block changes width), expected cost is exact at one-hot, and the
unpruned network is the original one (no projection)."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from conftest import assert_supernet_is_pruned
from tasprune.config import SpaceOptions
from tasprune.cost import model_cost
from tasprune.models import create_model
from tasprune.models.traced import residual_groups, traced
from tasprune.search.supernet import SuperNet

pytestmark = pytest.mark.usefixtures("fast_cpu")

MODELS = {"tasprune:cifar_resnet20": 32, "tasprune:mobilenet_v2": 64}


def _projections(net: nn.Module) -> list[tuple[int, int]]:
    return [
        (m.in_channels, m.out_channels)
        for n, m in net.named_modules()
        if n.endswith("shortcut") and isinstance(m, nn.Conv2d)
    ]


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "per-block"])
@pytest.mark.parametrize("model", list(MODELS))
def test_both_spaces_cost_and_compute_the_pruned_network(model: str, tie: bool) -> None:
    side = MODELS[model]
    torch.manual_seed(0)
    net = SuperNet(model, input_size=(side, side), options=SpaceOptions(tie_residual=tie)).eval()
    tied = len(net.width_choices) < len(traced(model).groups)
    assert tied == tie
    rng = random.Random(f"{model}-{tie}")
    projections = 0
    for _ in range(3):
        shape = net.sample(rng)
        pruned = create_model(model, shape).eval()
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            pruned(torch.randn(1, 3, side, side))
        assert fc.get_total_flops() // 2 == model_cost(model, shape, (3, side, side), 10)[0]
        projections += sum(1 for a, b in _projections(pruned) if a != b)
        assert_supernet_is_pruned(net, shape, pruned, side)
    if not tie:
        assert projections > 0  # per-block widths did create projections somewhere
    with torch.no_grad():
        for p in net.arch_parameters():
            p.copy_(F.one_hot(torch.randint(p.numel(), ()), p.numel()).float() * 50)
    flops, params = (float(v) for v in net.expected_cost())
    exact = model_cost(model, net.derive(), (3, side, side), 10)
    assert round(flops) == exact[0] and round(params) == exact[1]


def test_the_unpruned_network_is_the_original() -> None:
    model = "tasprune:cifar_resnet20"
    full = create_model(model)
    assert not any(
        isinstance(m, nn.Conv2d) for n, m in full.named_modules() if n.endswith(".1.shortcut")
    )
    assert [len(g) for g in residual_groups(model)] == [4, 3, 3]  # stem joins layer1's stream
    # every stream's blocks are one choice when tied
    net = SuperNet(model, options=SpaceOptions(tie_residual=True))
    assert sum(len(c.members) > 1 for c in net.width_choices.values()) == 3
