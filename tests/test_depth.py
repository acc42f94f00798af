"""Depth choices wherever the blocks sit: an ``nn.Sequential``, a ``ModuleList`` the forward
loops over, a module whose forward calls its children in turn (torchvision's FPN backbone).
A run ends where a block's output is read by more than the next block (YOLO's C2f
concatenates every block's output: no run). The searched network at a shape computes what
the pruned one does, costs what the analysis predicts, and a copy of the searched network
(an EMA) runs its own blocks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

import tasprune
from tasprune.cost import model_cost
from tasprune.models.depth import Skip
from tasprune.models.traced import traced
from tasprune.shape import Shape

pytestmark = pytest.mark.usefixtures("fast_cpu")


def _cbn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


class Res(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.a, self.b = _cbn(c, c), _cbn(c, c)

    def forward(self, x: Tensor, gate: Tensor | None = None) -> Tensor:
        y = self.b(self.a(x))
        if gate is not None:
            y = y * gate
        return x + y


class ListNet(nn.Module):
    """A stem, then a downsampling block and three residual blocks in a ModuleList."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _cbn(3, 8)
        self.blocks = nn.ModuleList([_cbn(8, 16, 2), Res(16), Res(16), Res(16)])
        self.head = nn.Linear(16, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean((2, 3)))


class GatedNet(ListNet):
    """The blocks are called with a second argument."""

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        gate = torch.ones(())
        x = self.blocks[0](x)
        for block in self.blocks[1:]:
            x = block(x, gate)
        return self.head(x.mean((2, 3)))


class TapNet(ListNet):
    """The second block's output is also an output: two runs, split there."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.stem(x)
        taps = []
        for block in self.blocks:
            x = block(x)
            taps.append(x)
        return self.head(x.mean((2, 3))), taps[1].mean((2, 3))


class ConcatNet(nn.Module):
    """Every block's output is concatenated, as in YOLO's C2f: no run of blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _cbn(3, 8)
        self.m = nn.ModuleList([Res(8), Res(8), Res(8)])
        self.fuse = _cbn(32, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        ys = [self.stem(x)]
        ys.extend(m(ys[-1]) for m in self.m)
        return self.head(self.fuse(torch.cat(ys, 1)).mean((2, 3)))


X = torch.randn(2, 3, 16, 16)


def _stages(model: nn.Module) -> tuple[tasprune.TAS, dict[str, int]]:
    tas = tasprune.TAS(model, X, epochs=1, flops_ratio=0.7)
    return tas, {n: len(st.blocks) for n, st in traced(tas.name).stages.items()}


def test_blocks_in_a_module_list_its_forward_loops_over_are_a_depth_choice() -> None:
    torch.manual_seed(0)
    _, found = _stages(ListNet())
    assert found == {"blocks.0": 4}  # the downsampling block first, then the residual run
    _, found = _stages(TapNet())
    assert found == {"blocks.0": 2, "blocks.2": 2}  # the tapped output ends the first run
    tas, found = _stages(ConcatNet())
    assert found == {"m.0": 3}  # concatenated blocks: a depth choice of its own kind
    stage = traced(tas.name).stages["m.0"]
    assert stage.consumer == "fuse.0" and stage.segments == [(8, 8), (16, 8), (24, 8)]


def _at(tas: tasprune.TAS, depth: int) -> Shape:
    tr = traced(tas.name)
    widths = {n: max(g.multiple, g.full // 2) for n, g in tr.searchable_groups().items()}
    depths = {n: min(depth, len(st.blocks)) for n, st in tr.stages.items()}
    return tr.full_shape().replace(widths=widths, depths=depths)


def _outputs(y: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return y if isinstance(y, tuple) else (y,)


@pytest.mark.parametrize("cls", [ListNet, GatedNet, TapNet, ConcatNet])
@pytest.mark.parametrize("depth", [1, 3])
def test_searched_equals_pruned_and_costs_what_is_predicted(cls: type, depth: int) -> None:
    torch.manual_seed(0)
    tas = tasprune.TAS(cls(), X, epochs=1, flops_ratio=0.7)
    shape = _at(tas, depth)
    tas.supernet.eval()
    with torch.no_grad(), tas.supernet.fixed(shape):
        want = _outputs(tas.supernet.net(X))
    small = tasprune.prune(cls(), shape, example_inputs=X).eval()
    small.load_state_dict(tas.supernet.plain_state_dict(shape))
    assert type(small) is cls
    if cls is ConcatNet:  # the dropped blocks leave the list, their segments the conv
        assert len(small.m) == depth
        assert small.fuse[0].in_channels == small.stem[0].out_channels * (1 + depth)
    dropped = [] if cls is ConcatNet else [m for m in small.blocks[depth:] if type(m) is not Res]
    if cls not in (TapNet, ConcatNet):
        assert len(dropped) == 4 - depth
        assert all(type(m) is (Skip if cls is GatedNet else nn.Identity) for m in dropped)
    with torch.no_grad():
        got = _outputs(small(X))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        small(X[:1])
    assert fc.get_total_flops() // 2 == model_cost(tas.name, shape)[0]


def test_a_copy_of_the_searched_network_runs_its_own_blocks() -> None:
    """An EMA copy (deepcopy) of the searchable model mixes depths through its own blocks,
    not the original's."""
    torch.manual_seed(0)
    tas = tasprune.TAS(ListNet(), X, epochs=1, flops_ratio=0.7)
    net = tas.model.eval()
    twin = copy.deepcopy(net)
    with torch.no_grad():
        before = net(X)
        twin.blocks[2].b[1].weight.zero_()  # the block adds nothing now
        twin.blocks[2].b[1].bias.zero_()
        assert torch.equal(net(X), before)
        assert not torch.allclose(twin(X), before)


@pytest.mark.slow
def test_an_fpn_backbone_searches_the_depth_of_its_stages() -> None:
    """torchvision's FPN backbone calls MobileNetV3's blocks from its own forward (an
    IntermediateLayerGetter): runs between the returned feature maps are depth choices."""
    from torchvision.models.detection.backbone_utils import mobilenet_backbone

    torch.manual_seed(0)
    model = mobilenet_backbone(
        backbone_name="mobilenet_v3_large", weights=None, fpn=True, trainable_layers=6
    )
    x = torch.randn(1, 3, 64, 64)
    tas = tasprune.TAS(model.eval(), x, epochs=1, flops_ratio=0.6)
    stages = traced(tas.name).stages
    assert len(stages) >= 4 and all(n.startswith("body.") for n in stages)
    shape = _at(tas, 1)
    small = tasprune.prune(copy.deepcopy(model), shape, example_inputs=x).eval()
    with torch.no_grad():
        full, got = model(x), small(x)
    assert list(got) == list(full) and all(got[k].shape == full[k].shape for k in full)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        small(x)
    assert fc.get_total_flops() // 2 == model_cost(tas.name, shape)[0]


def test_the_forward_reaches_the_depth_logits_of_concatenated_blocks() -> None:
    """Sampled depths weigh each block's segment where the conv reads it: the task loss
    alone (no budget) gives the stage's logits a gradient."""
    torch.manual_seed(0)
    tas = tasprune.TAS(ConcatNet(), X, epochs=1, flops_ratio=0.7)
    net = tas.supernet.train()
    net.generator = torch.Generator().manual_seed(0)
    logits = net.logits_of(net.depth_of["m.0"])
    assert logits is not None
    logits.requires_grad_(True)  # as in an architecture step
    net(X).square().mean().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
