"""The pure cost model (`model_cost`) against published numbers and the built networks."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from conftest import random_shape
from tasprune.cost import model_cost, model_flops
from tasprune.errors import ShapeError
from tasprune.models import create_model, get_model_spec, list_models
from tasprune.models.traced import traced
from tasprune.shape import Shape

pytestmark = pytest.mark.usefixtures("fast_cpu")

MODELS = [m for m in list_models() if not m.startswith("vit")]  # CNNs; ViT: test_attention
INPUT_SIZES = [(1, 28, 28), (3, 32, 32), (3, 30, 30)]  # Fashion-MNIST, CIFAR, odd
NON_SQUARE = (3, 17, 23)
# Random shapes checked by default: >= 20 in total over all models (>= 2 per model); the slow
# tier adds four more per model.
FAST_PER_MODEL = max(2, -(-20 // len(MODELS)))
RANDOM_SEEDS = [
    *range(FAST_PER_MODEL),
    *(pytest.param(s, marks=pytest.mark.slow) for s in range(FAST_PER_MODEL, FAST_PER_MODEL + 4)),
]

# Unpruned CIFAR-10 MACs at 3x32x32 (TAS paper, Table 3 "FLOPs" of the baselines).
REFERENCE_MACS = {
    "cifar_resnet20": 40.8e6,
    "cifar_resnet32": 69.1e6,
    "cifar_resnet56": 125.75e6,
    "cifar_resnet110": 253.2e6,
    "cifar_resnet164": 247.7e6,
}


def extreme_shapes(name: str) -> dict[str, Shape]:
    spec = get_model_spec(name)
    full = spec.full_shape()
    ones_w = {k: spec.width_step(k) or v for k, v in full.widths.items()}  # fixed: full
    ones_d = dict.fromkeys(full.depths, 1)
    return {
        "full": full,
        "ones": Shape(widths=ones_w, depths=ones_d),
        "thin": Shape(widths=ones_w, depths=dict(full.depths)),
        "shallow": Shape(widths=dict(full.widths), depths=ones_d),
    }


def measured(name: str, shape: Shape, size: tuple[int, int, int], classes: int = 10):
    """(MACs from FlopCounterMode, parameter count) of the built network."""
    model = create_model(name, shape, num_classes=classes, in_channels=size[0]).eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.randn(1, *size))
    flops = counter.get_total_flops()
    assert flops % 2 == 0
    return flops // 2, sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(REFERENCE_MACS))
def test_reference_macs(name: str) -> None:
    macs, _ = model_cost(name, input_size=(3, 32, 32))
    ref = REFERENCE_MACS[name]
    assert abs(macs - ref) / ref < 0.005, f"{name}: {macs} vs {ref}"


# torchvision's published ImageNet numbers at 3x224x224, 1000 classes: (GMACs, params).
IMAGENET_REFERENCE = {
    "resnet18": (1.81e9, 11_689_512),
    "resnet34": (3.66e9, 21_797_672),
    "resnet50": (4.09e9, 25_557_032),
    "mobilenet_v2": (0.30e9, 3_504_872),
}


@pytest.mark.parametrize("name", sorted(IMAGENET_REFERENCE))
def test_imagenet_reference(name: str) -> None:
    if name not in MODELS:
        pytest.skip(f"{name} is not registered")
    macs, params = model_cost(name, input_size=(3, 224, 224), num_classes=1000)
    ref_macs, ref_params = IMAGENET_REFERENCE[name]
    assert abs(macs - ref_macs) / ref_macs < 0.005, f"{name}: {macs} vs {ref_macs}"
    assert params == ref_params


@pytest.mark.parametrize("name", MODELS)
def test_defaults(name: str) -> None:
    spec = get_model_spec(name)
    assert model_cost(name) == model_cost(name, spec.full_shape(), spec.default_input, 10)
    assert model_flops(name) == model_cost(name)[0]
    macs, params = model_cost(name)
    assert isinstance(macs, int) and isinstance(params, int)
    assert macs > 0 and params > 0


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("kind", ["full", "ones", "thin", "shallow"])
def test_cost_matches_built_network_extreme(name: str, kind: str) -> None:
    shape = extreme_shapes(name)[kind]
    for size in INPUT_SIZES:
        assert model_cost(name, shape, size) == measured(name, shape, size), (kind, size)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("seed", RANDOM_SEEDS)
def test_cost_matches_built_network_random(name: str, seed: int) -> None:
    shape = random_shape(name, seed)
    for size in INPUT_SIZES:
        assert model_cost(name, shape, size) == measured(name, shape, size), size


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("kind", ["full", "random"])
def test_cost_matches_built_network_non_square(name: str, kind: str) -> None:
    shape = get_model_spec(name).full_shape() if kind == "full" else random_shape(name, 40)
    assert model_cost(name, shape, NON_SQUARE) == measured(name, shape, NON_SQUARE)


@pytest.mark.parametrize("name", MODELS)
def test_cost_matches_with_other_num_classes(name: str) -> None:
    shape = random_shape(name, 100)
    assert model_cost(name, shape, (3, 32, 32), 100) == measured(name, shape, (3, 32, 32), 100)


def block_of(layer: str) -> str | None:
    """The block (``stage.index``, e.g. ``layer1.0``) a layer's name lies in, else None."""
    parts = layer.split(".")
    return ".".join(parts[:2]) if len(parts) >= 3 and parts[1].isdigit() else None


def inner_widths(name: str) -> list[str]:
    """Widths that do not feed a residual sum or the next block: every layer their channel
    group touches (the analysis' ``group_of``) lies inside one block."""
    tr = traced(name)
    touched: dict[str, set[str | None]] = {}
    for (layer, _), groups in tr.group_of.items():
        for g in groups:
            touched.setdefault(g, set()).add(block_of(layer))
    return [
        k
        for k in get_model_spec(name).full_shape().widths
        if len(touched[k]) == 1 and None not in touched[k] and get_model_spec(name).width_step(k)
    ]


def test_inner_widths_of_resnet20() -> None:
    """The helper itself: a basic block's first conv, never the residual stream's convs."""
    assert inner_widths("cifar_resnet20") == [
        f"layer{s}.{j}.conv1.conv" for s in (1, 2, 3) for j in range(3)
    ]


@pytest.mark.parametrize("name", MODELS)
def test_flops_monotone_in_inner_widths(name: str) -> None:
    """Shrinking a width inside a block never increases FLOPs or params (strictly for kept)."""
    tr = traced(name)
    step = get_model_spec(name).width_step
    inner = inner_widths(name)
    assert inner
    for shape in (get_model_spec(name).full_shape(), random_shape(name, 11)):
        base_f, base_p = model_cost(name, shape)
        for key in inner:
            w = shape.widths[key]
            if w == step(key):
                continue
            f, p = model_cost(name, shape.replace(widths={key: w - step(key)}))
            assert f <= base_f and p <= base_p, key
            stage, index = tr.where(key)
            if stage is None or index < shape.depths[stage]:
                assert f < base_f and p < base_p, key
            else:
                assert (f, p) == (base_f, base_p), f"{key} is in a dropped block"


def scaled(name: str, frac: float) -> Shape:
    """Every searchable width times ``frac`` (at least one step): residual streams stay equal."""
    spec = get_model_spec(name)
    full = spec.full_shape()
    widths = {}
    for k, v in full.widths.items():
        step = spec.width_step(k)
        widths[k] = v if step == 0 else max(step, int(v * frac) // step * step)
    return Shape(widths=widths, depths=dict(full.depths))


@pytest.mark.parametrize("name", MODELS)
def test_flops_monotone_uniform_shrink(name: str) -> None:
    """Shrinking every width by the same factor (the residual chains stay aligned) never
    increases FLOPs; neither does dropping a block when widths are uniform per stage."""
    full = get_model_spec(name).full_shape()
    prev = model_cost(name, full)
    for frac in (0.75, 0.5, 0.25, 0.0):
        shape = scaled(name, frac)
        model = create_model(name, shape)
        assert not any(getattr(m, "tasprune_optional", False) for m in model.modules()), frac
        cur = model_cost(name, shape)
        assert cur[0] < prev[0] and cur[1] < prev[1], frac
        prev = cur
    base = model_cost(name, full)
    for stage, depth in full.depths.items():
        if depth > 1:
            cur = model_cost(name, full.replace(depths={stage: depth - 1}))
            assert cur[0] < base[0] and cur[1] < base[1], stage


def test_narrower_block_output_pays_for_its_projections() -> None:
    """FLOPs are not monotone in a block's output width, by design: a block whose in/out widths
    differ gets a bare 1x1 projection shortcut (no BN), so 16 -> 15 on layer1.1's output adds
    a 16x15 projection to layer1.1 and a 15x16 one to layer1.2 (the search's cost model
    charges them too)."""
    name = "cifar_resnet20"
    full = get_model_spec(name).full_shape()
    shape = full.replace(widths={"layer1.1.conv2.conv": 15})
    before_f, before_p = model_cost(name, full)
    after_f, after_p = model_cost(name, shape)
    hw = 32 * 32
    shrunk = 16 * 1 * 9 * 2  # conv2 loses one output; layer1.2.conv1 one input
    projections = 16 * 15 + 15 * 16
    assert after_f == before_f - shrunk * hw + projections * hw
    assert after_p == before_p - shrunk - 2 + projections  # and conv2's BN one channel
    assert (after_f, after_p) == measured(name, shape, (3, 32, 32))


def test_shallower_stage_reads_its_last_kept_block() -> None:
    """A stage cut to depth d hands block d-1's output width to the next stage, which is
    what the cost charges: keeping layer1.0 alone at width 8 makes layer2.0 read 8 channels."""
    name = "cifar_resnet20"
    full = get_model_spec(name).full_shape()
    narrow = dict.fromkeys(["stem.conv", "layer1.0.conv2.conv"], 8)
    shape = full.replace(widths=narrow, depths={"layer1.0": 1})
    model = create_model(name, shape)
    assert model.get_submodule("layer2.0.conv1.conv").in_channels == 8
    assert model.get_submodule("layer2.0.shortcut.conv").in_channels == 8
    assert model_cost(name, shape) == measured(name, shape, (3, 32, 32))
    wide = shape.replace(widths={"layer1.2.conv2.conv": 4})  # in a skipped block: no effect
    assert model_cost(name, wide) == model_cost(name, shape)


@pytest.mark.parametrize("name", MODELS)
def test_num_classes_changes_only_classifier(name: str) -> None:
    for shape in (get_model_spec(name).full_shape(), random_shape(name, 21)):
        f1, p1 = model_cost(name, shape, (3, 32, 32), 1)
        f2, p2 = model_cost(name, shape, (3, 32, 32), 2)
        features = f2 - f1  # the classifier's input width
        assert features >= 1
        assert p2 - p1 == features + 1  # weight row + bias
        for k in (10, 100, 1000):
            fk, pk = model_cost(name, shape, (3, 32, 32), k)
            assert fk - f1 == (k - 1) * features
            assert pk - p1 == (k - 1) * (features + 1)
        model = create_model(name, shape)
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        assert len(linears) == 1 and linears[0].in_features == features


@pytest.mark.parametrize("name", MODELS)
def test_input_size_changes_flops_not_params(name: str) -> None:
    shape = random_shape(name, 31)
    f32, p32 = model_cost(name, shape, (3, 32, 32))
    f16, p16 = model_cost(name, shape, (3, 16, 16))
    assert p32 == p16
    assert f16 < f32
    f1, p1 = model_cost(name, shape, (1, 32, 32))
    assert f1 < f32
    stem = next(m for m in create_model(name, shape).modules() if isinstance(m, nn.Conv2d))
    kh, kw = stem.kernel_size
    assert p32 - p1 == 2 * kh * kw * stem.out_channels  # two fewer input channels of the stem


@pytest.mark.parametrize("name", MODELS)
def test_cost_rejects_invalid_shape(name: str) -> None:
    full = get_model_spec(name).full_shape()
    stage = next(iter(full.depths))
    with pytest.raises(ShapeError, match="Fix:"):
        model_cost(name, full.replace(depths={stage: 0}))
    with pytest.raises(ShapeError, match="Fix:"):
        model_cost(name, full.replace(widths={"no.such.conv": 1}))
