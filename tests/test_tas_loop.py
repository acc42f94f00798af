"""TAS in the user's own loop (`tasprune.TAS`): the architecture logits are out of the model
the user trains, saves and copies; the user's optimiser steps the weights and `arch_step` the
logits only; the kept shape is in the band; the pruned network is an instance of the user's
class computing what the searched network computes at that shape; the search resumes; any
output structure and loss work."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import tasprune
from conftest import needs_fashion_mnist
from tasprune.cost import model_cost
from tasprune.errors import BudgetError, ConfigError
from user_nets import KeptBoxes, TinyNet, TwoHeads

pytestmark = pytest.mark.usefixtures("fast_cpu")


def _fmnist(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    from tasprune.data import stratified_split
    from tasprune.datasets import load_dataset

    data = load_dataset("fashion-mnist", "train")
    data = data.subset(stratified_split(data.labels, n / len(data), seed=0)[0])
    return data.images.float() / 255, data.labels


def _search(epochs: int = 2, **settings: object) -> tuple[tasprune.TAS, list[dict], list[float]]:
    x, y = _fmnist(256)
    torch.manual_seed(0)
    model = TinyNet(10, 1)
    rows: list[dict] = []
    tas = tasprune.TAS(
        model, x[:2], epochs=epochs, flops_ratio=0.5, arch_lr=0.2, callback=rows.append, **settings
    )
    net = tas.model
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(epochs):
        for i in range(0, 256, 64):
            xa, ya = x[i : i + 32], y[i : i + 32]
            xb, yb = x[i + 32 : i + 64], y[i + 32 : i + 64]
            loss = F.cross_entropy(net(xa), ya)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(tas.arch_step(lambda xb=xb, yb=yb: F.cross_entropy(net(xb), yb))["loss"])
        tas.end_epoch()
    return tas, rows, losses


@needs_fashion_mnist
def test_the_users_loop_searches_and_prunes() -> None:
    tas, rows, _ = _search(epochs=2)
    net = tas.model
    arch = {id(p) for p in tas.arch}
    assert arch and not any(id(p) in arch for p in net.parameters())
    assert not any("logit" in k for k in net.state_dict())
    assert not any(id(p) in arch for p in copy.deepcopy(net).parameters())
    assert [r["epoch"] for r in rows] == [0, 1]
    assert {"flops_ratio", "params_ratio", "entropy_mean", "tau", "in_band"} <= set(rows[0])
    assert rows[1]["tau"] < rows[0]["tau"]
    shape = tas.shape()
    ratio = model_cost(tas.name, shape)[0] / model_cost(tas.name)[0]
    assert 0.45 - 1e-9 <= ratio <= 0.5 + 1e-9
    small = tas.prune()
    assert type(small) is TinyNet
    x = torch.rand(3, 1, 28, 28)
    net.eval()
    small.eval()
    with torch.no_grad(), tas.supernet.fixed(shape):
        tas.supernet.training = False
        want = tas.supernet.net(x)
    with torch.no_grad():
        got = small(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        small(x[:1])
    assert fc.get_total_flops() // 2 == model_cost(tas.name, shape)[0]


@needs_fashion_mnist
def test_arch_step_moves_the_logits_and_leaves_the_weight_gradients() -> None:
    x, y = _fmnist(64)
    tas = tasprune.TAS(TinyNet(10, 1), x[:1], epochs=3, flops_ratio=0.5, arch_lr=0.2)
    net = tas.model
    before = [p.detach().clone() for p in tas.arch]
    weights = [p.detach().clone() for p in net.parameters()]
    tas.arch_step(lambda: F.cross_entropy(net(x[:32]), y[:32]))
    assert any(not torch.equal(a, p) for a, p in zip(before, tas.arch, strict=True))
    assert all(p.grad is None for p in net.parameters())
    assert all(torch.equal(a, p) for a, p in zip(weights, net.parameters(), strict=True))
    # a weight step with the user's optimiser over model.parameters() leaves the logits
    logits = [p.detach().clone() for p in tas.arch]
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    F.cross_entropy(net(x[:32]), y[:32]).backward()
    opt.step()
    assert all(torch.equal(a, p) for a, p in zip(logits, tas.arch, strict=True))


@needs_fashion_mnist
def test_the_search_resumes_from_its_state() -> None:
    tas, _, _ = _search(epochs=2)
    state = tas.state_dict()
    again = tasprune.TAS(TinyNet(10, 1), torch.zeros(1, 1, 28, 28), epochs=2, flops_ratio=0.5)
    again.load_state_dict(state)
    assert again.epoch == 2 and again.shape() == tas.shape()
    for a, b in zip(tas.arch, again.arch, strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ConfigError, match="does not fit"):
        tasprune.TAS(TwoHeads(), torch.zeros(1, 1, 32, 32), epochs=2).load_state_dict(state)


def test_any_output_structure_with_the_users_own_loss() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 1, 32, 32)
    tas = tasprune.TAS(TwoHeads(), x[:1], epochs=1, flops_ratio=0.6, arch_lr=0.2)
    net = tas.model

    def loss_fn(out: dict) -> torch.Tensor:  # a detector-like loss on a dict with a list
        return out["boxes"].pow(2).mean() + out["scores"][0].abs().mean()

    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    for _ in range(3):
        loss = loss_fn(net(x[:4]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        tas.arch_step(lambda: loss_fn(net(x[4:])))
    tas.end_epoch()
    small = tas.prune()
    assert type(small) is TwoHeads
    out = small.eval()(x[:2])
    assert out["boxes"].shape == (2, 4, 16, 16) and out["scores"][0].shape == (2, 3, 16, 16)


def test_outputs_whose_sizes_depend_on_the_data_search_the_same_groups() -> None:
    """A detector's kept boxes are as many as score above a threshold, so a pruned copy
    returns another number of them: the analysis still searches every group the same network
    without that post-processing searches (the layers producing the outputs keep their shapes),
    and the pruned network runs."""
    from tasprune.models.traced import traced

    torch.manual_seed(0)
    x = torch.randn(2, 1, 32, 32)
    plain, kept = TwoHeads(), KeptBoxes()
    kept.load_state_dict(plain.state_dict())
    searched = {}
    for net in (plain, kept):
        tas = tasprune.TAS(net, x, epochs=1, flops_ratio=0.6)
        groups = traced(tas.name).groups
        searched[type(net)] = sorted(n for n, g in groups.items() if g.fixed is None)
    assert searched[KeptBoxes] == searched[TwoHeads] and searched[TwoHeads]
    small = tas.prune().eval()
    with torch.no_grad():
        full, pruned = kept.eval()(x)["boxes"].shape[0], small(x)["boxes"].shape[0]
    assert full != pruned  # the check the analysis makes would have failed on the shapes


def test_bad_use_is_one_clear_error() -> None:
    x = torch.zeros(1, 1, 28, 28)
    with pytest.raises(ConfigError, match="epochs"):
        tasprune.TAS(TinyNet(10, 1), x, flops_ratio=0.5)
    with pytest.raises(BudgetError):
        tasprune.TAS(TinyNet(10, 1), x, epochs=1, flops_ratio=0.015, tolerance=0.005)
    tas = tasprune.TAS(TinyNet(10, 1), x, epochs=1)
    with pytest.raises(ConfigError, match="not a scalar loss"):
        tas.arch_step(lambda: tas.model(x))


@pytest.mark.slow
def test_a_torchvision_detector_searches_in_train_mode_on_its_loss_dict() -> None:
    """SSDlite traced the way it trains: example inputs (images, targets), a loss dict as its
    output. The class and box convs of its head keep their widths (they feed the outputs),
    the user's loss is the sum of the dict, and the pruned network is an SSD whose
    detections (eval mode) and losses (train mode) have the original's structure, costing
    what the analysis predicts per image."""
    from torchvision.models.detection import ssdlite320_mobilenet_v3_large

    torch.manual_seed(0)
    model = ssdlite320_mobilenet_v3_large(num_classes=4, weights=None, weights_backbone=None)
    model.transform.min_size, model.transform.max_size = (64,), 64
    model.transform.fixed_size = (64, 64)
    images = [torch.rand(3, 64, 64) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([1])}] * 2
    tas = tasprune.TAS(model.train(), (images, targets), epochs=1, flops_ratio=0.5, arch_lr=0.2)
    from tasprune.models.traced import traced

    heads_kinds = ("classification", "regression")
    heads = [f"head.{k}_head.module_list.{i}.1" for k in heads_kinds for i in range(6)]
    tr = traced(tas.name)
    assert set(heads) <= tr.outputs
    # the feature maps the heads read are searched (the class convs' walks into the loss,
    # index by index, are never taken: they keep their widths anyway)
    reads = [(f"head.{k}_head.module_list.{i}.0.0", True) for k in heads_kinds for i in range(6)]
    assert all(r in tr.group_of for r in reads)  # depthwise: its channels are what it reads
    assert all(tr.groups[g].fixed is None for r in reads for g in tr.group_of[r])
    net = tas.model
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    for _ in range(2):
        loss = sum(net(images, targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        tas.arch_step(lambda: sum(net(images, targets).values()))
    tas.end_epoch()
    small = tas.prune()
    assert type(small) is type(model)
    convs = dict(small.named_modules())
    original = dict(model.named_modules())
    assert all(convs[h].out_channels == original[h].out_channels for h in heads)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    assert set(small.train()(images, targets)) == {"bbox_regression", "classification"}
    detections = small.eval()([images[0]])
    assert set(detections[0]) == {"boxes", "scores", "labels"}
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        small.eval()([images[0]])
    predicted = model_cost(tas.name, tas.shape())[0]
    assert fc.get_total_flops() // 2 == predicted


def test_the_joint_step_in_the_users_loop() -> None:
    """arch_step="joint": one forward per batch; the user's loss plus tas.budget_loss(), one
    backward, the user's optimiser steps the weights and tas.step() the logits (which the
    user's optimiser does not hold); the search ends in the band. Misuse is one line."""
    x, y = _fmnist(256)
    torch.manual_seed(0)
    tas = tasprune.TAS(
        TinyNet(10, 1), x[:2], epochs=2, flops_ratio=0.5, arch_lr=0.2, arch_step="joint"
    )
    net = tas.model
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not any(id(p) in held for p in tas.arch)
    before = [p.detach().clone() for p in tas.arch]
    for _ in range(2):
        for i in range(0, 256, 32):
            loss = F.cross_entropy(net(x[i : i + 32]), y[i : i + 32]) + tas.budget_loss()
            opt.zero_grad()
            loss.backward()
            opt.step()
            tas.step()
        row = tas.end_epoch()
    assert any(not torch.equal(a, b) for a, b in zip(before, tas.arch, strict=True))
    assert all(p.grad is None for p in tas.arch)
    assert row["flops_ratio"] < 0.8  # the budget term moved the most probable shape down
    with pytest.raises(ConfigError, match="no gradients"):
        tas.step()
    plain = tasprune.TAS(TinyNet(10, 1), x[:2], epochs=1, flops_ratio=0.5)
    with pytest.raises(ConfigError, match="joint"):
        plain.budget_loss()


def test_only_searches_the_named_submodules() -> None:
    """``only=["trunk"]``: the widths written inside the trunk and its run of blocks are
    searched; the neck keeps its width and the stem its (the stream it writes is read outside
    the trunk too); ``only=["neck"]`` keeps the trunk's depth. A name that is not a
    sub-module is one clear error."""
    from tasprune.models.traced import traced

    x = torch.randn(2, 1, 32, 32)
    model = TwoHeads()
    trunk = traced(tasprune.TAS(model, x, epochs=1, flops_ratio=0.8, only=["trunk"]).name)
    searched = {n for n, g in trunk.groups.items() if g.fixed is None}
    assert searched and all(n.startswith("trunk.") for n in searched)
    assert list(trunk.stages) == ["trunk.0"]
    neck = traced(tasprune.TAS(model, x, epochs=1, flops_ratio=0.98, only=["neck"]).name)
    assert {n for n, g in neck.groups.items() if g.fixed is None} == {"neck.0"}
    assert not neck.stages
    with pytest.raises(ConfigError, match="only= names 'nek'.*did you mean neck"):
        tasprune.TAS(model, x, epochs=1, only=["nek"])
