"""The shipped ImageNet ResNets and MobileNetV2: exact cost, torchvision parity, the search
space their graph gives (width keys, residual groups, projections) and searchability.

A shipped name is a plain network traced like any other (`tasprune.models.traced`). Cost
checks build networks on the meta device (shapes only, no memory, no init), so even the
224x224 references are counted in milliseconds by `FlopCounterMode`.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from conftest import needs_fashion_mnist, one_hot, random_shape
from tasprune.cost import model_cost
from tasprune.data import ArrayDataset, stratified_split
from tasprune.datasets import load_dataset
from tasprune.models import create_model, get_model_spec
from tasprune.models.layers import Projection, shortcut
from tasprune.models.torchvision_compat import (
    load_torchvision_checkpoint,
    state_dict_from_torchvision,
)
from tasprune.models.traced import traced
from tasprune.search import SearchConfig, SpaceOptions, SuperNet, search
from tasprune.search.traced import candidate_affine_layers
from tasprune.shape import Shape

pytestmark = pytest.mark.usefixtures("fast_cpu")

FAMILIES = ["resnet18", "resnet50", "mobilenet_v2"]

# torchvision's models at 3x224x224, 1000 classes: MACs as commonly quoted.
REFERENCE_MACS = {
    "resnet18": 1.82e9,
    "resnet34": 3.67e9,
    "resnet50": 4.11e9,
    "mobilenet_v2": 300.8e6,
}

# How the supernet mixes widths: the default (zero-padding, one residual width per stream),
# one width per block output (the inserted projections stay identities in the supernet) and
# the paper's (channel-wise interpolation, one BN affine per candidate, untied).
SPACES = {
    "default": SpaceOptions(),
    "untied": SpaceOptions(tie_residual=False),
    "paper": SpaceOptions(tie_residual=False, align="cwi", candidate_affine=True),
}


def counted(model_fn, size: tuple[int, int, int]) -> tuple[int, int]:
    """(MACs by FlopCounterMode, parameter count) of the module ``model_fn()`` builds on meta."""
    with torch.device("meta"):
        model = model_fn().eval()
        x = torch.empty(1, *size)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    flops = counter.get_total_flops()
    assert flops % 2 == 0
    return flops // 2, sum(p.numel() for p in model.parameters())


def randomise_bn(model: nn.Module) -> None:
    """Random BN statistics and affines (and per-candidate affines, where there are)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                assert m.running_mean is not None and m.running_var is not None
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                if m.affine:
                    m.weight.normal_()
                    m.bias.normal_()
            for cand in ("cand_weight", "cand_bias"):
                if isinstance(getattr(m, cand, None), nn.Parameter):
                    getattr(m, cand).normal_()


def bare_projections(model: nn.Module) -> dict[str, nn.Conv2d]:
    """The 1x1 convs a pruned network has where a block's input and output widths differ."""
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and getattr(m, "tasprune_optional", False)
    }


# ------------------------------------------------------------------------------ exact cost


@pytest.mark.parametrize("name", sorted(REFERENCE_MACS))
def test_reference_macs_and_torchvision_parity_at_224(name: str) -> None:
    macs, params = model_cost(name, input_size=(3, 224, 224), num_classes=1000)
    ref = REFERENCE_MACS[name]
    assert abs(macs - ref) / ref < 0.01, f"{name}: {macs} vs {ref}"
    # Same MACs and parameters as torchvision's own model, and as our built network.
    tv = getattr(torchvision.models, name)
    assert counted(lambda: tv(weights=None), (3, 224, 224)) == (macs, params)
    ours = counted(lambda: create_model(name, num_classes=1000), (3, 224, 224))
    assert ours == (macs, params)
    assert get_model_spec(name).default_input == (3, 224, 224)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("size", [(3, 32, 32), (1, 28, 28), (3, 17, 23)])
def test_exact_cost_matches_built_network(name: str, size: tuple[int, int, int]) -> None:
    full = get_model_spec(name).full_shape()
    shapes = [full, *(random_shape(name, seed) for seed in range(3))]
    projections = 0
    for shape in shapes:
        with torch.device("meta"):
            model = create_model(name, shape, in_channels=size[0])
        assert model_cost(name, shape, size) == counted(lambda m=model: m, size), shape
        projections += len(bare_projections(model))
    assert projections > 0  # the random shapes' inserted projections are costed too


def test_strided_projection_costs_as_pool_plus_conv() -> None:
    """The strided 1x1 downsample reads every other pixel but costs the same MACs."""
    for hw in ((8, 8), (7, 9)):
        x_size = (16, *hw)
        strided = counted(lambda: Projection(16, 32, 2, pool=False), x_size)
        pooled = counted(lambda: Projection(16, 32, 2, pool=True), x_size)
        assert strided == pooled
    proj = Projection(4, 6, 2, pool=False)
    assert isinstance(proj.pool, nn.Identity) and proj.conv.stride == (2, 2)
    assert proj(torch.randn(1, 4, 7, 9)).shape == (1, 6, 4, 5)
    avg = Projection(4, 6, 2, pool=True)
    assert isinstance(avg.pool, nn.AvgPool2d) and avg.conv.stride == (1, 1)
    assert avg(torch.randn(1, 4, 7, 9)).shape == (1, 6, 4, 5)
    # The network's own shortcuts: identity unless the block changes width or resolution.
    assert isinstance(shortcut(8, 8, 1), nn.Identity)
    assert isinstance(shortcut(8, 16, 1), Projection)
    assert isinstance(shortcut(8, 8, 2), Projection)


def test_structure_follows_torchvision() -> None:
    r50 = create_model("resnet50", num_classes=1000)
    assert r50.get_submodule("layer1.0.shortcut.conv").stride == (1, 1)  # 64 -> 256
    assert r50.get_submodule("layer2.0.conv2.conv").stride == (2, 2)  # stride on the 3x3
    assert r50.get_submodule("layer2.0.shortcut.conv").stride == (2, 2)
    assert isinstance(r50.get_submodule("layer2.1.shortcut"), nn.Identity)
    r18 = create_model("resnet18")
    assert isinstance(r18.get_submodule("layer1.0.shortcut"), nn.Identity)  # 64 -> 64
    mb = create_model("mobilenet_v2")
    assert not hasattr(mb.get_submodule("stage1.0"), "expand")  # t = 1: no expansion
    assert not hasattr(mb.get_submodule("stage2.0"), "shortcut")  # never residual
    assert isinstance(mb.get_submodule("stage2.1.shortcut"), nn.Identity)
    # The unpruned networks keep none of the projections tasprune inserts for the search.
    for model in (r50, r18, mb):
        assert not bare_projections(model)
    # A depthwise conv is no width of its own: it follows the group of the conv before it.
    tr = traced("mobilenet_v2")
    full = get_model_spec("mobilenet_v2").full_shape()
    dws = [n for n, m in mb.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert len(dws) == 17
    for dw in dws:
        conv = mb.get_submodule(dw)
        assert conv.groups == conv.in_channels == conv.out_channels
        assert dw not in full.widths
        block = dw.removesuffix(".dw.conv")
        follows = (
            f"{block}.expand.conv" if hasattr(mb.get_submodule(block), "expand") else "stem.conv"
        )
        assert tr.group_of[(dw, True)] == [follows], dw
        assert conv.out_channels == full.widths[follows]


def test_width_and_depth_keys() -> None:
    """Widths are keyed by the first conv writing each group, depths by a stage's first block."""
    r20 = get_model_spec("cifar_resnet20").full_shape()
    convs = [f"layer{s}.{j}.conv{k}.conv" for s in (1, 2, 3) for j in range(3) for k in (1, 2)]
    assert list(r20.widths) == ["stem.conv", *convs]
    assert r20.widths["stem.conv"] == 16
    assert [r20.widths[f"layer{s}.1.conv2.conv"] for s in (1, 2, 3)] == [16, 32, 64]
    assert r20.depths == {"layer1.0": 3, "layer2.0": 3, "layer3.0": 3}
    r18 = get_model_spec("resnet18").full_shape()
    convs = [f"layer{s}.{j}.conv{k}.conv" for s in (1, 2, 3, 4) for j in range(2) for k in (1, 2)]
    assert list(r18.widths) == ["stem.conv", *convs]
    assert r18.depths == {f"layer{s}.0": 2 for s in (1, 2, 3, 4)}
    mb = get_model_spec("mobilenet_v2").full_shape()
    assert len(mb.widths) == 35
    assert list(mb.widths)[:3] == ["stem.conv", "stage1.0.project.conv", "stage2.0.expand.conv"]
    assert list(mb.widths)[-1] == "head.conv" and mb.widths["head.conv"] == 1280
    assert mb.widths["stage4.2.expand.conv"] == 384 and mb.widths["stage4.2.project.conv"] == 64
    assert mb.depths == {"stage2.0": 2, "stage3.0": 3, "stage4.0": 4, "stage5.0": 3, "stage6.0": 3}
    stage = traced("mobilenet_v2").stages["stage4.0"]
    assert stage.container == "stage4" and stage.blocks == [f"stage4.{j}" for j in range(4)]


def test_pruned_mobilenet_keeps_residuals_with_projection() -> None:
    full = get_model_spec("mobilenet_v2").full_shape()
    shape = full.replace(widths={"stage3.1.project.conv": 20, "stage3.1.expand.conv": 100})
    model = create_model("mobilenet_v2", shape).eval()
    # Where a residual block's input and output widths differ, a bare 1x1 conv (no BN).
    assert set(bare_projections(model)) == {"stage3.1.shortcut", "stage3.2.shortcut"}
    for block, (cin, cout) in (("stage3.1", (32, 20)), ("stage3.2", (20, 32))):
        proj = model.get_submodule(f"{block}.shortcut")
        assert type(proj) is nn.Conv2d and proj.kernel_size == (1, 1) and proj.bias is None
        assert (proj.in_channels, proj.out_channels) == (cin, cout)
        # Built from scratch it starts as the identity on the channels both sides keep.
        assert torch.equal(proj.weight[:, :, 0, 0], torch.eye(cout, cin))
    assert model.get_submodule("stage3.1.dw.conv").out_channels == 100
    assert model.get_submodule("stage3.1.project.conv").in_channels == 100
    assert model.get_submodule("stage3.2.expand.conv").in_channels == 20
    assert not hasattr(model.get_submodule("stage3.0"), "shortcut")
    assert isinstance(model.get_submodule("stage4.1.shortcut"), nn.Identity)  # widths equal
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    shallow = create_model("mobilenet_v2", full.replace(depths={"stage4.0": 1}))
    stage4 = list(shallow.get_submodule("stage4").children())
    assert len(stage4) == 4 and not isinstance(stage4[0], nn.Identity)
    assert all(isinstance(b, nn.Identity) for b in stage4[1:])
    assert not bare_projections(shallow)


def test_residual_groups() -> None:
    r18 = get_model_spec("resnet18").residual_groups()
    r50 = get_model_spec("resnet50").residual_groups()
    mb = get_model_spec("mobilenet_v2").residual_groups()
    r20 = get_model_spec("cifar_resnet20").residual_groups()
    assert r18[0] == ["stem.conv", "layer1.0.conv2.conv", "layer1.1.conv2.conv"]
    assert len(r18) == 4 and r18[3] == ["layer4.0.conv2.conv", "layer4.1.conv2.conv"]
    # resnet50's layer1.0 projects 64 -> 256: the stem is a stream of its own.
    assert r50[0] == ["layer1.0.conv3.conv", "layer1.1.conv3.conv", "layer1.2.conv3.conv"]
    assert len(r50) == 4 and r50[3] == [f"layer4.{j}.conv3.conv" for j in range(3)]
    assert mb == [
        [f"stage{k}.{j}.project.conv" for j in range(n)]
        for k, n in ((2, 2), (3, 3), (4, 4), (5, 3), (6, 3))
    ]
    assert r20 == [
        ["stem.conv", *(f"layer1.{j}.conv2.conv" for j in range(3))],
        *([f"layer{s}.{j}.conv2.conv" for j in range(3)] for s in (2, 3)),
    ]
    # In the space itself each block's output is its own group: the inserted projection of
    # layer1.1 reads layer1.0's output and writes layer1.1's; the strided projection of
    # layer2.0 writes the group of layer2.0's last conv.
    tr = traced("cifar_resnet20")
    assert tr.group_of[("layer1.1.shortcut", False)] == ["layer1.0.conv2.conv"]
    assert tr.group_of[("layer1.1.shortcut", True)] == ["layer1.1.conv2.conv"]
    assert tr.group_of[("layer2.0.shortcut.conv", True)] == ["layer2.0.conv2.conv"]
    assert tr.group_of[("layer2.0.shortcut.conv", False)] == ["layer1.2.conv2.conv"]


# ------------------------------------------------------------------------------ torchvision


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenet_v2"])
def test_torchvision_checkpoint_gives_identical_logits(name: str, tmp_path) -> None:
    torch.manual_seed(0)
    tv = getattr(torchvision.models, name)(weights=None, num_classes=5)
    randomise_bn(tv)
    tv.eval()
    path = tmp_path / f"{name}.pth"
    torch.save(tv.state_dict(), path)
    ours = create_model(name, num_classes=5).eval()
    ours.load_state_dict(load_torchvision_checkpoint(path, name))  # strict: every key
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ours(x), tv(x))


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_torchvision_checkpoint_warm_starts_the_supernet(name: str) -> None:
    """As a teacher: the supernet at full width (its inserted projections identities)
    computes torchvision's logits."""
    torch.manual_seed(0)
    tv = getattr(torchvision.models, name)(weights=None, num_classes=5)
    randomise_bn(tv)
    tv.eval()
    net = SuperNet(name, num_classes=5, input_size=(64, 64), options=SPACES["untied"]).eval()
    net.load_plain_weights(state_dict_from_torchvision(tv.state_dict(), name))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), net.fixed(net.full_shape):
        out = net(x)
    with torch.no_grad():
        torch.testing.assert_close(out, tv(x), rtol=1e-4, atol=1e-4)


def test_torchvision_mapping_refuses_other_architectures(tmp_path) -> None:
    from tasprune.errors import CheckpointError, ConfigError

    sd = torchvision.models.resnet18(weights=None).state_dict()
    with pytest.raises(CheckpointError, match="Fix:"):
        state_dict_from_torchvision(sd, "mobilenet_v2")
    with pytest.raises(ConfigError, match="Fix:"):
        state_dict_from_torchvision(sd, "cifar_resnet20")
    with pytest.raises(CheckpointError, match="Fix:"):
        load_torchvision_checkpoint(tmp_path / "missing.pth", "resnet18")
    wrapped = {"model": {f"module.{k}": v for k, v in sd.items()}}
    torch.save(wrapped, tmp_path / "ddp.pth")
    renamed = load_torchvision_checkpoint(tmp_path / "ddp.pth", "resnet18")
    assert set(renamed) == set(create_model("resnet18", num_classes=1000).state_dict())


# ------------------------------------------------------------------------------ search


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("tie", [False, True])
def test_expected_cost_equals_exact_on_one_hot(name: str, tie: bool) -> None:
    rng = random.Random(0)
    net = SuperNet(name, in_channels=1, input_size=(28, 28), options=SpaceOptions(tie_residual=tie))
    projections = 0
    for _ in range(4):
        one_hot(net, rng)
        exp_flops, exp_params = net.expected_cost()
        flops, params = round(float(exp_flops.detach())), round(float(exp_params.detach()))
        shape = net.derive()
        assert (flops, params) == net.shape_cost(shape)
        with torch.device("meta"):
            projections += len(bare_projections(create_model(name, shape)))
    assert (projections > 0) == (not tie)  # untied shapes' projections are expected too


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("space", sorted(SPACES))
def test_full_width_sample_reproduces_plain_network(name: str, space: str) -> None:
    torch.manual_seed(0)
    plain = create_model(name, num_classes=10, in_channels=1).eval()
    randomise_bn(plain)
    net = SuperNet(name, in_channels=1, input_size=(28, 28), options=SPACES[space]).eval()
    assert bool(candidate_affine_layers(net.net)) == SPACES[space].candidate_affine
    net.load_plain_weights(plain.state_dict())
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad(), net.fixed(net.full_shape):
        out = net(x)
    with torch.no_grad():
        torch.testing.assert_close(out, plain(x), rtol=1e-4, atol=1e-4)


def candidate_shape(net: SuperNet, untied: bool) -> Shape:
    """A shape of the space with narrower widths and shallower stages. Tied: the same
    candidate index everywhere; untied: the index varies from width to width, so residual
    blocks get different input and output widths (projections)."""
    widths = {}
    for i, name in enumerate(net.full_shape.widths):
        cands = net.width_of[name].candidates
        widths[name] = cands[(3 + i % 4) if untied else 3]
    depths = {s: c.candidates[len(c.candidates) // 2] for s, c in net.depth_of.items()}
    return Shape(widths=widths, depths=depths)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("space", sorted(SPACES))
def test_sub_network_transfers_to_pruned_network(name: str, space: str) -> None:
    """A candidate shape of the supernet equals the plain pruned net built from its weights."""
    torch.manual_seed(1)
    opts = SPACES[space]
    net = SuperNet(name, in_channels=1, input_size=(28, 28), options=opts).eval()
    randomise_bn(net)
    shape = candidate_shape(net, untied=not opts.tie_residual)
    pruned = create_model(name, shape, in_channels=1).eval()
    # Tied widths keep every residual block's widths equal: no projection; untied ones not.
    assert bool(bare_projections(pruned)) == (not opts.tie_residual)
    state = net.plain_state_dict(shape)
    assert set(state) == set(pruned.state_dict())
    pruned.load_state_dict(state)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad(), net.fixed(shape):
        out = net(x)
    with torch.no_grad():
        ref = pruned(x)
    assert ref.abs().max() > 1e-3  # not a degenerate comparison of zeros
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("tie", [False, True])
def test_gradients_reach_every_width_and_depth_logit(name: str, tie: bool) -> None:
    torch.manual_seed(0)
    opts = SpaceOptions(tie_residual=tie)
    net = SuperNet(name, in_channels=1, input_size=(28, 28), options=opts).train()
    y = torch.randint(0, 10, (8,))
    F.cross_entropy(net(torch.randn(8, 1, 28, 28)), y).backward()
    assert net.width_logits and net.depth_logits
    expected = len({c.name for c in net.width_of.values() if c.searchable})
    assert len(net.width_logits) == expected
    if not tie:  # one choice per width key
        assert expected == len(net.full_shape.widths)
    for key, p in [*net.width_logits.items(), *net.depth_logits.items()]:
        assert p.grad is not None and torch.isfinite(p.grad).all(), key
        assert p.grad.abs().sum() > 0, f"{key} got no gradient"


def _fashion_subset(split: str, n: int) -> ArrayDataset:
    data = load_dataset("fashion-mnist", split)
    idx, _ = stratified_split(data.labels, n / len(data), seed=0)
    return data.subset(idx)


@needs_fashion_mnist
@pytest.mark.parametrize("name", [pytest.param("resnet18", marks=pytest.mark.slow), "mobilenet_v2"])
def test_tiny_real_search_then_distil(name: str, tmp_path) -> None:
    """Search on 320 Fashion-MNIST images, build the shape, distil it for one epoch."""
    from tasprune.config import DistillConfig, TrainConfig
    from tasprune.distill import distill

    train, test = _fashion_subset("train", 320), _fashion_subset("test", 100)
    cfg = SearchConfig(
        flops_ratio=0.6, epochs=1, batch_size=32, arch_lr=0.05, valid_batches=1, seed=0
    )
    result = search(
        name, train, cfg, tmp_path / "search", progress=False, augment={"crop_padding": 2}
    )
    shape = result.shape
    assert shape != get_model_spec(name).full_shape()
    size = (1, 28, 28)
    pruned = create_model(name, shape, num_classes=10, in_channels=1)
    assert counted(lambda: create_model(name, shape, in_channels=1), size) == (
        result.flops,
        result.params,
    )
    assert model_cost(name, shape, size) == (result.flops, result.params)
    assert sum(p.numel() for p in pruned.parameters()) == result.params
    saved, meta = Shape.load(tmp_path / "search" / "shape.json")
    assert saved == shape and meta["model"] == name

    teacher = create_model(name, num_classes=10, in_channels=1)
    supernet_state = torch.load(tmp_path / "search" / "supernet.pt", weights_only=True)["model"]
    dcfg = DistillConfig(init="supernet", train=TrainConfig(epochs=1, batch_size=32, lr=0.05))
    metrics = distill(
        name,
        shape,
        teacher,
        train,
        test,
        dcfg,
        tmp_path / "student",
        supernet_state=supernet_state,
        space=cfg.space(),
        device="cpu",
        progress=False,
        augment={"crop_padding": 2},
    )
    assert metrics["flops"] == result.flops and metrics["epochs"] == 1
    assert 0.0 <= metrics["top1"] <= 100.0
