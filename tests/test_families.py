"""ImageNet ResNets and MobileNetV2: exact cost, torchvision parity, and searchability.

Cost checks build networks on the meta device (shapes only, no memory, no init), so even the
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

from conftest import random_shape
from tasprune.cost import model_cost
from tasprune.data import ArrayDataset, stratified_split
from tasprune.datasets import load_dataset
from tasprune.models import create_model, get_model_spec
from tasprune.models.torchvision_compat import (
    load_torchvision_checkpoint,
    state_dict_from_torchvision,
)
from tasprune.search import SearchConfig, SpaceOptions, SuperNet, search
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


def one_hot(net: SuperNet, rng: random.Random) -> None:
    with torch.no_grad():
        for c in net.all_choices():
            logits = net.logits_of(c)
            if logits is not None:
                logits.fill_(-1e4)
                logits[rng.randrange(len(c.candidates))] = 1e4


def randomise_bn(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                assert m.running_mean is not None and m.running_var is not None
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                if m.affine:
                    m.weight.normal_()
                    m.bias.normal_()


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
    for shape in shapes:
        built = counted(lambda s=shape: create_model(name, s, in_channels=size[0]), size)
        assert model_cost(name, shape, size) == built, shape


def test_strided_projection_costs_as_pool_plus_conv() -> None:
    """The strided 1x1 downsample reads every other pixel but costs the same MACs."""
    from tasprune.models.ops import Projection

    for hw in ((8, 8), (7, 9)):
        x_size = (16, *hw)
        strided = counted(lambda: Projection(16, 32, 2, pool=False), x_size)
        pooled = counted(lambda: Projection(16, 32, 2, pool=True), x_size)
        assert strided == pooled
    proj = Projection(4, 6, 2, pool=False)
    assert isinstance(proj.pool, nn.Identity) and proj.conv.stride == (2, 2)
    assert proj(torch.randn(1, 4, 7, 9)).shape == (1, 6, 4, 5)


def test_structure_follows_torchvision() -> None:
    r50 = create_model("resnet50", num_classes=1000)
    assert r50.get_submodule("layer1.0.shortcut.conv").stride == (1, 1)  # 64 -> 256
    assert r50.get_submodule("layer2.0.conv2.conv").stride == (2, 2)  # stride on the 3x3
    assert r50.get_submodule("layer2.0.shortcut.conv").stride == (2, 2)
    assert isinstance(r50.get_submodule("layer2.1.shortcut"), nn.Identity)
    r18 = create_model("resnet18")
    assert isinstance(r18.get_submodule("layer1.0.shortcut"), nn.Identity)  # 64 -> 64
    mb = create_model("mobilenet_v2")
    spec = get_model_spec("mobilenet_v2")
    assert not hasattr(mb.get_submodule("stage1.0"), "expand")  # t = 1: no expansion
    assert not hasattr(mb.get_submodule("stage2.0"), "shortcut")  # never residual
    assert isinstance(mb.get_submodule("stage2.1.shortcut"), nn.Identity)
    assert spec.tied_widths is not None
    for dw, follows in spec.tied_widths().items():
        conv = mb.get_submodule(f"{dw}.conv")
        assert conv.groups == conv.in_channels == conv.out_channels
        assert conv.out_channels == spec.full_shape().widths[follows]


def test_pruned_mobilenet_keeps_residuals_with_projection() -> None:
    full = get_model_spec("mobilenet_v2").full_shape()
    shape = full.replace(widths={"stage3.1.project": 20, "stage3.1.expand": 100})
    model = create_model("mobilenet_v2", shape)
    assert has_conv(model.get_submodule("stage3.1.shortcut"))  # 32 -> 20
    assert has_conv(model.get_submodule("stage3.2.shortcut"))  # 20 -> 32
    assert model.get_submodule("stage3.1.dw.conv").out_channels == 100
    assert not hasattr(model.get_submodule("stage3.0"), "shortcut")
    shallow = full.replace(depths={"stage4": 1})
    assert len(create_model("mobilenet_v2", shallow).get_submodule("stage4")) == 1


def has_conv(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in module.modules())


def test_residual_groups() -> None:
    r18 = get_model_spec("resnet18").residual_groups
    r50 = get_model_spec("resnet50").residual_groups
    mb = get_model_spec("mobilenet_v2").residual_groups
    assert r18 is not None and r50 is not None and mb is not None
    assert r18()[0] == ["stem", "layer1.0.conv2", "layer1.1.conv2"]
    assert r50()[0] == ["layer1.0.conv3", "layer1.1.conv3", "layer1.2.conv3"]
    assert len(r50()) == 4 and r50()[3] == [f"layer4.{j}.conv3" for j in range(3)]
    assert mb() == [
        [f"stage{k}.{j}.project" for j in range(n)]
        for k, n in ((2, 2), (3, 3), (4, 4), (5, 3), (6, 3))
    ]


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
    for _ in range(4):
        one_hot(net, rng)
        exp_flops, exp_params = net.expected_cost()
        flops, params = round(float(exp_flops.detach())), round(float(exp_params.detach()))
        assert (flops, params) == net.shape_cost(net.derive())


@pytest.mark.parametrize("name", FAMILIES)
def test_full_width_sample_reproduces_plain_network(name: str) -> None:
    torch.manual_seed(0)
    plain = create_model(name, num_classes=10, in_channels=1).eval()
    randomise_bn(plain)
    net = SuperNet(name, in_channels=1, input_size=(28, 28)).eval()
    net.load_plain_weights(plain.state_dict())
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad(), net.fixed(net.full_shape):
        out = net(x)
    with torch.no_grad():
        torch.testing.assert_close(out, plain(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", FAMILIES)
def test_sub_network_transfers_to_pruned_network(name: str) -> None:
    """A candidate shape of the supernet equals the plain pruned net built from its weights."""
    torch.manual_seed(1)
    net = SuperNet(name, in_channels=1, input_size=(28, 28)).eval()
    randomise_bn(net)
    with torch.no_grad():
        for m in net.modules():
            if hasattr(m, "cand_weight"):
                m.cand_weight.normal_()
                m.cand_bias.normal_()
    # The same candidate index everywhere keeps residual widths equal (no extra projections).
    shape = Shape(
        widths={n: net.width_of[n].candidates[3] for n in net.full_shape.widths},
        depths={s: c.candidates[len(c.candidates) // 2] for s, c in net.depth_of.items()},
    )
    pruned = create_model(name, shape, in_channels=1).eval()
    state = net.plain_state_dict(shape)
    assert set(state) == set(pruned.state_dict())
    pruned.load_state_dict(state)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad(), net.fixed(shape):
        out = net(x)
    with torch.no_grad():
        torch.testing.assert_close(out, pruned(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", FAMILIES)
def test_gradients_reach_every_width_and_depth_logit(name: str) -> None:
    torch.manual_seed(0)
    net = SuperNet(name, in_channels=1, input_size=(28, 28)).train()
    y = torch.randint(0, 10, (8,))
    F.cross_entropy(net(torch.randn(8, 1, 28, 28)), y).backward()
    assert net.width_logits and net.depth_logits
    for key, p in [*net.width_logits.items(), *net.depth_logits.items()]:
        assert p.grad is not None and torch.isfinite(p.grad).all(), key
        assert p.grad.abs().sum() > 0, f"{key} got no gradient"


def _fashion_subset(split: str, n: int) -> ArrayDataset:
    data = load_dataset("fashion-mnist", split)
    idx, _ = stratified_split(data.labels, n / len(data), seed=0)
    return data.subset(idx)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
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
