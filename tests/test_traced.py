"""Traced models (torchvision:NAME, timm:NAME): groups from the graph, cost equal to the count
of the physically pruned network, the searchable network equal to it at a fixed shape, save ->
load, ONNX, and a short `tasprune run`."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from conftest import assert_supernet_is_pruned, needs_fashion_mnist
from tasprune.config import SpaceOptions
from tasprune.cost import model_cost
from tasprune.errors import ConfigError
from tasprune.models import create_model, get_model_spec
from tasprune.models.traced import traced
from tasprune.search.space import choice_widths, depth_candidates
from tasprune.search.supernet import SuperNet
from tasprune.shape import Shape

pytestmark = pytest.mark.usefixtures("fast_cpu")

BN_MODELS = [
    "torchvision:resnet18",
    "torchvision:mobilenet_v3_small",
    "torchvision:efficientnet_b0",
    "torchvision:regnet_x_400mf",
    "torchvision:densenet121",
    "torchvision:shufflenet_v2_x0_5",
    "timm:resnet18",
    "timm:mobilenetv3_small_050",
    "timm:regnetx_002",
]
LN_MODELS = ["timm:convnext_atto"]  # LayerNorm: searched approximately (see docs/design.md)
SIDE = 32


def candidate_shape(model: str, seed: int) -> Shape:
    """A random shape of the model's search space (every width a candidate)."""
    rng = random.Random(f"{model}-{seed}")
    spec = get_model_spec(model)
    full = spec.full_shape()
    opts = SpaceOptions()
    return Shape(
        widths={n: rng.choice(choice_widths(spec, n, w, opts)) for n, w in full.widths.items()},
        depths={s: rng.choice(depth_candidates(d)) for s, d in full.depths.items()},
    )


def counted(net: torch.nn.Module, side: int = SIDE) -> tuple[int, int, tuple[int, ...]]:
    """(MACs counted by torch.utils.flop_counter, params, output shape) of one image."""
    net.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        y = net(torch.randn(1, 3, side, side))
    return counter.get_total_flops() // 2, sum(p.numel() for p in net.parameters()), y.shape


def test_resnet18_groups_and_stages() -> None:
    """4 residual streams (stem + each downsampling) + 8 inner widths; one stage per layer."""
    tr = traced("torchvision:resnet18")
    assert len(tr.groups) == 12
    assert all(g.fixed is None for g in tr.groups.values())
    entries = [g for sites in tr.masks.values() for g, _, mix in sites if mix]
    residual = [g for g in tr.groups.values() if entries.count(g.name) > 1]
    assert sorted(g.full for g in residual) == [64, 128, 256, 512]
    assert {s: len(st.blocks) for s, st in tr.stages.items()} == {
        "layer1.0": 2,
        "layer2.0": 2,
        "layer3.0": 2,
        "layer4.0": 2,
    }


def test_shufflenet_is_searched_inside_its_blocks() -> None:
    """The channel shuffle defeats the whole-network graph: the widths inside each block are
    searched, those crossing the shuffle keep theirs."""
    tr = traced("torchvision:shufflenet_v2_x0_5")
    assert len(tr.searchable_groups()) >= 12
    assert all(g.scope for g in tr.groups.values())


def test_ops_the_graph_cannot_follow_leave_their_groups_unsearched() -> None:
    """GhostNet slices its concatenation: the groups mapped through the slice are fixed with
    the reason, the others are searched, and the cost stays exact."""
    model = "timm:ghostnet_050"
    tr = traced(model)
    fixed = [g for g in tr.groups.values() if g.fixed]
    assert fixed and all("channel slice" in str(g.fixed) for g in fixed)
    assert len(tr.searchable_groups()) >= 10
    shape = candidate_shape(model, 0)
    assert counted(create_model(model, shape))[:2] == model_cost(model, shape, (3, SIDE, SIDE), 10)


def test_grouped_convs_keep_whole_groups() -> None:
    """RegNet's group convs tie their input and output and step by the group width."""
    tr = traced("torchvision:regnet_x_400mf")
    stepped = [g for g in tr.groups.values() if g.multiple > 1]
    assert stepped and all(g.multiple == 16 for g in stepped)
    spec = get_model_spec("torchvision:regnet_x_400mf")
    for g in stepped:
        assert all(c % 16 == 0 for c in choice_widths(spec, g.name, g.full, SpaceOptions()))


@pytest.mark.parametrize("model", BN_MODELS + LN_MODELS)
def test_prediction_equals_count_of_the_pruned_network(model: str) -> None:
    for seed in range(2):
        shape = candidate_shape(model, seed)
        flops, params = model_cost(model, shape, (3, SIDE, SIDE), 10)
        macs, n, out = counted(create_model(model, shape, num_classes=10, in_channels=3))
        assert (macs, n, tuple(out)) == (flops, params, (1, 10))


@pytest.mark.parametrize("model", BN_MODELS[:3] + ["timm:regnetx_002"])
def test_expected_cost_is_exact_at_one_hot(model: str) -> None:
    torch.manual_seed(0)
    net = SuperNet(model, num_classes=10, in_channels=3, input_size=(SIDE, SIDE))
    with torch.no_grad():
        for p in net.arch_parameters():
            p.copy_(F.one_hot(torch.randint(p.numel(), ()), p.numel()).float() * 50)
    flops, params = (v.detach() for v in net.expected_cost())
    exact = model_cost(model, net.derive(), (3, SIDE, SIDE), 10)
    assert float(flops) == pytest.approx(exact[0], rel=1e-9)
    assert float(params) == pytest.approx(exact[1], rel=1e-9)
    assert tuple(int(v) for v in net.argmax_cost()) == exact


@pytest.mark.parametrize("model", BN_MODELS)
def test_supernet_at_a_shape_computes_the_pruned_network(model: str) -> None:
    """Width masks + depth mixture at one-hot == the physically smaller network, and the
    weights it hands on (plain_state_dict) are that network's."""
    torch.manual_seed(0)
    net = SuperNet(model, num_classes=10, in_channels=3, input_size=(SIDE, SIDE)).eval()
    shape = candidate_shape(model, 3)
    student = create_model(model, shape, num_classes=10, in_channels=3).eval()
    assert_supernet_is_pruned(net, shape, student, SIDE)


def test_search_gradients_reach_every_logit() -> None:
    net = SuperNet("torchvision:mobilenet_v3_small", input_size=(SIDE, SIDE)).train()
    net.generator = torch.Generator().manual_seed(0)
    y = net(torch.randn(4, 3, SIDE, SIDE))
    flops, _ = net.expected_cost()
    (F.cross_entropy(y, torch.randint(0, 10, (4,))) + flops / net.full_flops).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.arch_parameters())


def test_teacher_weights_carry_into_the_pruned_network() -> None:
    """A student initialised from the teacher is the teacher with channels removed: at the
    full shape it is the teacher itself."""
    model = "torchvision:resnet18"
    teacher = create_model(model).eval()
    spec = get_model_spec(model)
    full = spec.full_shape()
    assert spec.transfer is not None
    same = create_model(model, full).eval()
    same.load_state_dict(spec.transfer(teacher.state_dict(), full, 10, 3))
    x = torch.randn(2, 3, SIDE, SIDE)
    with torch.no_grad():
        assert torch.equal(same(x), teacher(x))


def test_first_conv_and_classifier_adapt_to_the_data() -> None:
    net = create_model("torchvision:resnet18", num_classes=7, in_channels=1).eval()
    with torch.no_grad():
        assert net(torch.randn(2, 1, 28, 28)).shape == (2, 7)
    timm_net = create_model("timm:resnet18", num_classes=7, in_channels=1).eval()
    with torch.no_grad():
        assert timm_net(torch.randn(2, 1, 28, 28)).shape == (2, 7)


def test_unknown_names_suggest_close_matches() -> None:
    with pytest.raises(ConfigError, match="torchvision:resnet18"):
        get_model_spec("torchvision:resnet81")
    with pytest.raises(ConfigError, match="timm:"):
        get_model_spec("timm:efficientnet_b00")


def test_too_small_an_input_is_one_clear_line() -> None:
    with pytest.raises(ConfigError, match="does not run on a 3x8x8 input.*Fix"):
        model_cost("torchvision:googlenet", None, (3, 8, 8), 10)


def test_pruned_network_exports_to_onnx(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    model = "torchvision:mobilenet_v3_small"
    net = create_model(model, candidate_shape(model, 1)).eval()
    x = torch.rand(2, 3, SIDE, SIDE)
    path = tmp_path / "m.onnx"
    torch.onnx.export(net, (x,), str(path), input_names=["x"], dynamo=False)
    got = ort.InferenceSession(str(path)).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        ref = net(x).numpy()
    assert abs(got - ref).max() < 1e-4


@pytest.mark.slow
@needs_fashion_mnist
def test_tasprune_run_on_a_torchvision_model(tmp_path: Path) -> None:
    """teacher -> search -> distill -> report -> export on torchvision:resnet18; the saved
    student loads by name + shape (no pickled module) and predicts raw images."""
    recipe = tmp_path / "tv.yaml"
    recipe.write_text(
        "model: torchvision:resnet18\ndevice: cpu\n"
        "data: {name: fashion-mnist, train_subset: 256, test_subset: 128}\n"
        "teacher: {train: {epochs: 2, batch_size: 64, lr: 0.05}}\n"
        "search: {epochs: 2, batch_size: 64, valid_batches: 1}\n"
        "distill: {train: {epochs: 2, batch_size: 64, lr: 0.05}}\n"
        "report: {latency_batches: [1], latency_repeats: 1, int8: false}\n"
    )
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TASPRUNE_NO_PROGRESS": "1"}
    cmd = [sys.executable, "-m", "tasprune.cli", "run", str(recipe), "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    shape = json.loads((out / "search" / "shape.json").read_text())
    assert report["pruned"]["flops"] == shape["flops"] < report["teacher"]["flops"]
    import tasprune

    loaded = tasprune.load(out / "student" / "model.pt")
    raw = torch.rand(3, 1, 28, 28)  # images in [0, 1], as the contract says
    with torch.no_grad():
        assert loaded(raw).shape == (3, 10)
    onnx = tmp_path / "student.onnx"
    cmd = [sys.executable, "-m", "tasprune.cli", "export", str(out / "student" / "model.pt")]
    r = subprocess.run(
        [*cmd, "--format", "onnx", "--out", str(onnx)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert onnx.is_file()


def test_weights_of_the_original_architecture_are_loaded_then_adapted(tmp_path: Path) -> None:
    import torchvision

    from tasprune.models.traced import from_weights

    original = torchvision.models.resnet18()
    path = tmp_path / "r18.pth"
    torch.save(original.state_dict(), path)
    net = from_weights("torchvision:resnet18", str(path), num_classes=7, in_channels=1)
    assert torch.equal(net.layer1[0].conv1.weight, original.layer1[0].conv1.weight)
    assert torch.allclose(net.conv1.weight[:, 0], original.conv1.weight.mean(1))
    assert net.fc.out_features == 7
    with torch.no_grad():
        assert net.eval()(torch.rand(2, 1, 28, 28)).shape == (2, 7)


def test_weights_of_another_architecture_are_refused_before_writing(tmp_path: Path) -> None:
    import torchvision

    path = tmp_path / "r34.pth"
    torch.save(torchvision.models.resnet34().state_dict(), path)
    out = tmp_path / "t"
    cmd = [sys.executable, "-m", "tasprune.cli", "train", "--model", "torchvision:resnet18"]
    cmd += ["--weights", str(path), "--epochs", "1", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert "does not fit torchvision:resnet18" in r.stderr and "Fix:" in r.stderr
    assert not out.exists()


def test_a_users_own_module_through_its_factory() -> None:
    """A factory is named by its import path; the network is searched like any other and
    `tasprune.prune` gives the pruned module with the unpruned weights' kept channels."""
    import tasprune
    from tasprune.models.traced import source_name
    from user_nets import tiny_net

    name = source_name(tiny_net)
    assert name == "py:user_nets:tiny_net"
    tr = traced(name)
    assert len(tr.groups) == 4  # the residual stream + one inner width per block
    assert {s: len(st.blocks) for s, st in tr.stages.items()} == {"blocks.0": 3}
    full = tiny_net().eval()
    shape = candidate_shape(name, 0).replace(depths={"blocks.0": 3})
    pruned = tasprune.prune(tiny_net, shape, state=full.state_dict()).eval()
    assert counted(pruned)[:2] == model_cost(name, shape, (3, 32, 32), 10)
    same = tasprune.prune(tiny_net, tr.full_shape(), state=full.state_dict()).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(same(x), full(x))


def test_a_factory_that_cannot_be_imported_is_refused() -> None:
    from tasprune.models.traced import source_name

    with pytest.raises(ConfigError, match="not an importable factory"):
        source_name(lambda num_classes, in_channels: None)
    with pytest.raises(ConfigError, match="cannot import the factory"):
        get_model_spec("py:no_such_module:f")


def test_a_shipped_family_traced_costs_what_its_own_cost_function_says() -> None:
    """tasprune:cifar_resnet20 (the family's plain network, traced) finds the family's space:
    one output width per block (10) + 9 inner widths, tied into 3 streams + 9 by default, 3
    stages of 3, and the same cost."""
    tr = traced("tasprune:cifar_resnet20")
    assert len(tr.groups) == 19
    assert len(SuperNet("tasprune:cifar_resnet20").width_choices) == 12
    assert sorted(len(st.blocks) for st in tr.stages.values()) == [3, 3, 3]
    size = (3, 32, 32)
    assert model_cost("tasprune:cifar_resnet20", None, size) == model_cost(
        "cifar_resnet20", None, size
    )


class _ClassToken(torch.nn.Module):
    """A learned token expanded per image and handed to a module with the patch tokens, as
    CaiT's class-attention blocks take it."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(1, 16, 3, stride=2)
        self.token = torch.nn.Parameter(torch.zeros(1, 1, 16))
        self.mix = _Mix()
        self.head = torch.nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.stem(x).flatten(2).transpose(1, 2)
        cls = self.mix(tokens, self.token.expand(x.shape[0], -1, -1))
        return self.head(cls[:, 0])


class _Mix(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(16, 16)

    def forward(self, tokens: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        return cls + self.fc(tokens).mean(1, keepdim=True)


def test_a_parameter_expanded_into_a_module_is_counted() -> None:
    # Under no_grad a view of a parameter still requires grad, without a grad_fn; the FLOP
    # counter's module tracker failed on it as a module's input.
    from tasprune.models.traced import register_module

    net = _ClassToken()
    tr = traced(register_module(net, torch.zeros(1, 1, 28, 28)))
    assert "stem" in tr.groups and tr.groups["stem"].fixed is None
    assert all(p.requires_grad for p in net.parameters())
