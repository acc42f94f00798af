"""The analysis from a module instance and example inputs: nothing assumes a classifier (what
keeps its width is derived from the outputs), the pruned network is an instance of the user's
class with the same output structure, its counted FLOPs are the predicted ones, it reproduces
the original at the full shape, and it survives save -> load in a fresh process. Also the
whole-run bugs: a module's state version metadata survives checkpoints. Transformers:
tests/test_attention.py."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import tasprune
from conftest import needs_fashion_mnist
from tasprune.checkpoint import load_model_checkpoint, save_checkpoint
from tasprune.cost import model_cost
from tasprune.errors import ConfigError
from tasprune.models import create_model
from tasprune.models.traced import register_module, traced
from tasprune.shape import Shape
from tasprune.weights import portable_state
from user_nets import TinyNet, TwoHeads

pytestmark = pytest.mark.usefixtures("fast_cpu")


def _half(name: str) -> Shape:
    tr = traced(name)
    widths = {n: max(g.multiple, g.full // 2) for n, g in tr.searchable_groups().items()}
    depths = {s: max(1, len(st.blocks) - 1) for s, st in tr.stages.items()}
    return tr.full_shape().replace(widths=widths, depths=depths)


def _flat(out: object) -> list[torch.Tensor]:
    from torch.utils._pytree import tree_flatten

    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


def test_outputs_keep_their_width_and_nothing_else_is_assumed() -> None:
    torch.manual_seed(0)
    net = TwoHeads().eval()
    x = torch.randn(2, 1, 32, 32)
    name = register_module(net, x)
    tr = traced(name)
    assert tr.outputs == {"box", "score"}  # both heads, found from the dict/list outputs
    assert "neck.0" in tr.groups and tr.groups["neck.0"].fixed is None  # feeds both heads
    assert len(tr.stages) == 1 and len(next(iter(tr.stages.values())).blocks) == 3
    shape = _half(name)
    pruned = create_model(name, shape)
    assert type(pruned) is TwoHeads
    with torch.no_grad():
        ref, got = net(x), pruned.eval()(x)
    assert set(got) == {"boxes", "scores"} and isinstance(got["scores"], list)
    assert [t.shape for t in _flat(got)] == [t.shape for t in _flat(ref)]
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        pruned(x[:1])
    assert fc.get_total_flops() // 2 == model_cost(name, shape)[0]
    assert model_cost(name, shape)[0] < model_cost(name)[0]


def test_the_full_shape_reproduces_the_trained_instance() -> None:
    torch.manual_seed(1)
    net = TwoHeads()
    for m in net.modules():  # trained-looking statistics, so a wrong copy shows
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    net.eval()
    x = torch.randn(3, 1, 32, 32)
    full = tasprune.prune(net, traced(register_module(net, x)).full_shape(), example_inputs=x)
    with torch.no_grad():
        for a, b in zip(_flat(net(x)), _flat(full.eval()(x)), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # and pruning keeps the leading channels' weights of the instance it was given
    half = tasprune.prune(net, _half(register_module(net, x)), example_inputs=x)
    torch.testing.assert_close(half.stem[0].weight, net.stem[0].weight[:8])


def test_ignore_keeps_the_named_modules_width() -> None:
    net = TwoHeads()
    x = torch.randn(1, 1, 32, 32)
    assert traced(register_module(net, x)).groups["neck.0"].fixed is None
    tr = traced(register_module(net, x, ignore=["neck"]))
    assert "neck.0" not in tr.searchable_groups()
    with pytest.raises(ConfigError, match="not a sub-module"):
        register_module(net, x, ignore=["nek"])


def test_a_shape_of_another_network_is_refused_before_anything_changes(tmp_path: Path) -> None:
    x = torch.randn(1, 1, 32, 32)
    shape = _half(register_module(TwoHeads(), x))
    shape.save(tmp_path / "shape.json", model=register_module(TwoHeads(), x))
    other = TwoHeads(width=8)
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ConfigError, match="searched for module:TwoHeads"):
        tasprune.prune(other, tmp_path / "shape.json", example_inputs=x)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_state_version_metadata_survives_the_checkpoint(tmp_path: Path) -> None:
    """MNASNet reads its state version when loading; a plain dict copy used to drop it."""
    net = create_model("torchvision:mnasnet0_5", num_classes=10, in_channels=1)
    assert getattr(portable_state(net), "_metadata", None) is not None
    meta = {
        "model": "torchvision:mnasnet0_5",
        "shape": net_shape("torchvision:mnasnet0_5"),
        "num_classes": 10,
        "in_channels": 1,
    }
    # a state without the metadata, as files of earlier versions hold
    plain = {k: v.clone() for k, v in net.state_dict().items()}
    save_checkpoint(tmp_path / "model.pt", {"model": plain, "meta": meta})
    loaded, _ = load_model_checkpoint(tmp_path / "model.pt")
    assert all(
        torch.equal(a, b)
        for a, b in zip(net.state_dict().values(), loaded.state_dict().values(), strict=True)
    )


def net_shape(name: str) -> dict:
    return traced(name).full_shape().to_dict()


@needs_fashion_mnist
@pytest.mark.slow
def test_an_instance_trains_saves_and_loads_in_a_fresh_process(tmp_path: Path) -> None:
    from tasprune.data import stratified_split
    from tasprune.datasets import load_dataset

    train = load_dataset("fashion-mnist", "train")
    test = load_dataset("fashion-mnist", "test")
    train = train.subset(stratified_split(train.labels, 300 / len(train), seed=0)[0])
    test = test.subset(stratified_split(test.labels, 200 / len(test), seed=0)[0])
    torch.manual_seed(0)
    mine = TinyNet(10, 1)
    shape = _half(register_module(mine, torch.zeros(1, 1, 28, 28)))
    cfg = {"epochs": 1, "batch_size": 64, "lr": 0.05}
    tasprune.train(mine, train, test, cfg, tmp_path / "fit", shape=shape, progress=False)
    model = tasprune.load(tmp_path / "fit", model=TinyNet(10, 1))
    assert type(model.net) is TinyNet
    images = test.images[:8]
    with torch.no_grad():
        want = model(images)
    torch.save(images, tmp_path / "x.pt")
    code = (
        "import sys, torch, tasprune; sys.path.insert(0, 'tests');"
        "from user_nets import TinyNet;"
        f"m = tasprune.load({str(tmp_path / 'fit')!r}, model=TinyNet(10, 1));"
        f"x = torch.load({str(tmp_path / 'x.pt')!r});"
        f"torch.save(m(x), {str(tmp_path / 'y.pt')!r})"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), want, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="not from this module"):
        tasprune.load(tmp_path / "fit", model=TinyNet(10, 3))


def test_a_pruned_model_is_rebuilt_from_shape_and_weights_in_one_call(tmp_path: Path) -> None:
    """Saved without pickling (shape.json + the pruned state dict), re-applied to a freshly
    built original with one call, equal outputs; weights of another shape are refused."""
    torch.manual_seed(0)
    x = torch.randn(2, 1, 32, 32)
    model = TwoHeads()
    name = register_module(model, x)
    shape = _half(name)
    shape.save(tmp_path / "shape.json", model=name)
    small = tasprune.prune(model, shape, example_inputs=x)
    with torch.no_grad():
        for p in small.parameters():
            p.add_(0.1)  # "fine-tuned": weights no original holds
    torch.save(small.state_dict(), tmp_path / "student.pt")
    fresh = TwoHeads()
    weights = torch.load(tmp_path / "student.pt", weights_only=True)
    rebuilt = tasprune.prune(fresh, tmp_path / "shape.json", example_inputs=x, pruned_state=weights)
    assert type(rebuilt) is TwoHeads
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x)["boxes"], small.eval()(x)["boxes"])
    with pytest.raises(ConfigError, match="pruned_state does not fit"):
        tasprune.prune(
            fresh, tmp_path / "shape.json", example_inputs=x, pruned_state=model.state_dict()
        )


class _GroupNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.g1 = nn.Conv2d(3, 64, 3, padding=1), nn.GroupNorm(8, 64)
        self.c2, self.g2 = nn.Conv2d(64, 48, 3, padding=1), nn.GroupNorm(4, 48)
        self.out = nn.Conv2d(48, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.g2(self.c2(self.g1(self.c1(x)).relu())).relu())


def test_group_norm_widths_keep_whole_groups() -> None:
    """A GroupNorm's channels are searched in whole groups (steps of its channels per
    group), its group count follows, so the kept channels are normalised exactly as in the
    unpruned network; the pruned network costs what is predicted."""
    torch.manual_seed(0)
    model, x = _GroupNormNet().eval(), torch.randn(2, 3, 16, 16)
    name = register_module(model, x)
    groups = traced(name).searchable_groups()
    assert {n: g.multiple for n, g in groups.items()} == {"c1": 8, "c2": 12}
    shape = traced(name).full_shape().replace(widths={"c1": 24, "c2": 36})
    small = tasprune.prune(model, shape, example_inputs=x).eval()
    assert (small.g1.num_groups, small.g1.num_channels) == (3, 24)
    assert (small.g2.num_groups, small.g2.num_channels) == (3, 36)
    with torch.no_grad():
        assert torch.allclose(small.g1(small.c1(x)), model.g1(model.c1(x))[:, :24], atol=1e-5)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        small(x)
    assert fc.get_total_flops() // 2 == model_cost(name, shape)[0] * 2  # two images


class _SharedHead(nn.Module):
    """A trunk and one head conv applied to two pyramid levels (as detection heads are)."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(32, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU())
        self.head = nn.Conv2d(32, 6, 3, padding=1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        p3 = self.trunk(x)
        return [self.head(p3), self.head(self.down(p3))]


def test_a_layer_called_on_several_levels_costs_every_call() -> None:
    torch.manual_seed(0)
    model, x = _SharedHead().eval(), torch.randn(1, 3, 16, 16)
    name = register_module(model, x)
    shape = _half(name)
    small = tasprune.prune(model, shape, example_inputs=x).eval()
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        small(x)
    head_macs = 6 * 16 * 9 * (16 * 16 + 8 * 8)  # both levels, the pruned 16 input channels
    assert model_cost(name, shape)[0] == fc.get_total_flops() // 2 > head_macs
