"""The mixing options of the traced width mixture (the paper's): channel-wise interpolation and
one BatchNorm affine per candidate. At a fixed shape the searchable network is the pruned
network (with the chosen candidate's affine handed on); with several candidates the mixture is
the hand-computed one; gradients reach the per-candidate affines and every logit."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import assert_supernet_is_pruned
from tasprune.config import SpaceOptions
from tasprune.models import create_model
from tasprune.search.choice import Choice, align_matrix
from tasprune.search.supernet import SuperNet
from tasprune.search.traced import candidate_affine_layers, mix_widths

pytestmark = pytest.mark.usefixtures("fast_cpu")


def align_channels(x: torch.Tensor, dst: int, mode: str) -> torch.Tensor:
    """Reference: N,C,H,W features mapped onto ``dst`` channels by `align_matrix`."""
    m = align_matrix(x.shape[1], dst, mode, x.device, x.dtype)
    return torch.einsum("dc,nchw->ndhw", m, x)


SIDE = 32
OPTIONS = [
    SpaceOptions(align="cwi"),
    SpaceOptions(candidate_affine=True),
    SpaceOptions(align="cwi", candidate_affine=True),
]


def _perturb(net: nn.Module) -> None:
    """Trained-looking BatchNorm statistics and affines, so a wrong copy shows."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 1.5)
                if hasattr(m, "cand_weight"):
                    m.cand_weight.uniform_(0.5, 1.5)
                    m.cand_bias.uniform_(-0.2, 0.2)


@pytest.mark.parametrize("opts", OPTIONS, ids=["cwi", "affine", "cwi+affine"])
@pytest.mark.parametrize("model", ["tasprune:cifar_resnet20", "torchvision:mobilenet_v3_small"])
def test_at_a_shape_the_options_compute_the_pruned_network(model: str, opts: SpaceOptions) -> None:
    torch.manual_seed(0)
    net = SuperNet(model, in_channels=3, input_size=(SIDE, SIDE), options=opts).eval()
    _perturb(net.net)
    if opts.candidate_affine:
        assert candidate_affine_layers(net.net)
    shape = net.sample(random.Random(f"{model}-5"))
    student = create_model(model, shape).eval()
    assert_supernet_is_pruned(net, shape, student, SIDE)


def _choice(weights: list[float]) -> Choice:
    c = Choice("g", "width", [3, 5, 8], "g")
    c.selected = [(0, 3, torch.tensor(weights[0])), (1, 5, torch.tensor(weights[1]))]
    return c


def test_zero_padding_mixture_is_the_mask_mixture() -> None:
    y = torch.randn(2, 8, 4, 4)
    got = mix_widths(y, _choice([0.3, 0.7]), "pad")
    mask = 0.3 * (torch.arange(8) < 3).float() + 0.7 * (torch.arange(8) < 5).float()
    assert torch.allclose(got, y * mask.view(1, 8, 1, 1), atol=1e-6)


def test_channel_wise_interpolation_matches_hand_computation() -> None:
    y = torch.randn(2, 8, 4, 4)
    got = mix_widths(y, _choice([0.3, 0.7]), "cwi")
    want = 0.3 * align_channels(y[:, :3], 5, "cwi") + 0.7 * y[:, :5]
    assert torch.allclose(got[:, :5], want, atol=1e-6)
    assert torch.equal(got[:, 5:], torch.zeros_like(got[:, 5:]))
    w, b = torch.rand(3, 8) + 0.5, torch.randn(3, 8)
    got = mix_widths(y, _choice([0.3, 0.7]), "cwi", w, b)
    narrow = y[:, :3] * w[0, :3].view(1, 3, 1, 1) + b[0, :3].view(1, 3, 1, 1)
    wide = y[:, :5] * w[1, :5].view(1, 5, 1, 1) + b[1, :5].view(1, 5, 1, 1)
    want = 0.3 * align_channels(narrow, 5, "cwi") + 0.7 * wide
    assert torch.allclose(got[:, :5], want, atol=1e-5)


def test_gradients_reach_the_candidate_affines_and_every_logit() -> None:
    opts = SpaceOptions(align="cwi", candidate_affine=True)
    net = SuperNet("tasprune:cifar_resnet20", input_size=(SIDE, SIDE), options=opts).train()
    net.generator = torch.Generator().manual_seed(0)
    y = net(torch.randn(4, 3, SIDE, SIDE))
    flops, _ = net.expected_cost()
    (F.cross_entropy(y, torch.randint(0, 10, (4,))) + flops / net.full_flops).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.arch_parameters())
    bns = candidate_affine_layers(net.net)
    assert all(bn.cand_weight.grad is not None for bn in bns.values())


def test_a_warm_start_gives_every_candidate_the_teachers_affine() -> None:
    opts = SpaceOptions(candidate_affine=True)
    teacher = create_model("tasprune:cifar_resnet20")
    _perturb(teacher)
    with torch.no_grad():
        for m in teacher.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
    net = SuperNet("tasprune:cifar_resnet20", options=opts)
    net.load_plain_weights(teacher.state_dict())
    for name, bn in candidate_affine_layers(net.net).items():
        own = teacher.get_submodule(name)
        assert torch.equal(bn.cand_weight, own.weight.detach().expand_as(bn.cand_weight))
