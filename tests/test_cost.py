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
from tasprune.shape import Shape

pytestmark = pytest.mark.usefixtures("fast_cpu")

MODELS = list_models()
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
    full = get_model_spec(name).full_shape()
    ones_w = dict.fromkeys(full.widths, 1)
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


def inner_widths(shape: Shape) -> list[str]:
    """Widths that do not feed a residual sum: every conv of a block except its last one."""
    keys = list(shape.widths)
    last_of_block: dict[str, str] = {}
    for key in keys:
        parts = key.split(".")
        if len(parts) >= 3 and parts[0] in shape.depths and parts[1].isdigit():
            last_of_block[".".join(parts[:2])] = key
    chain = set(last_of_block.values())
    return [
        k
        for k in keys
        if k not in chain and ".".join(k.split(".")[:2]) in last_of_block  # inside a block
    ]


@pytest.mark.parametrize("name", MODELS)
def test_flops_monotone_in_inner_widths(name: str) -> None:
    """Shrinking a width inside a block never increases FLOPs or params (strictly for kept)."""
    for shape in (get_model_spec(name).full_shape(), random_shape(name, 11)):
        inner = inner_widths(shape)
        assert inner
        base_f, base_p = model_cost(name, shape)
        for key in inner:
            w = shape.widths[key]
            if w == 1:
                continue
            f, p = model_cost(name, shape.replace(widths={key: w - 1}))
            assert f <= base_f and p <= base_p, key
            stage, index = key.split(".")[:2]
            if int(index) < shape.depths[stage]:
                assert f < base_f and p < base_p, key
            else:
                assert (f, p) == (base_f, base_p), f"{key} is in a dropped block"


@pytest.mark.parametrize("name", MODELS)
def test_flops_monotone_uniform_shrink(name: str) -> None:
    """Shrinking every width by the same factor (the residual chains stay aligned) never
    increases FLOPs; neither does dropping a block when widths are uniform per stage."""
    full = get_model_spec(name).full_shape()
    prev = model_cost(name, full)
    for frac in (0.75, 0.5, 0.25, 0.0):
        shape = Shape(
            widths={k: max(1, int(v * frac)) for k, v in full.widths.items()},
            depths=dict(full.depths),
        )
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
    differ gets a 1x1 projection shortcut, so 16 -> 15 on layer1.1.conv2 adds a 16x15 projection
    to layer1.1 and a 15x16 one to layer1.2 (the search's cost model charges them too)."""
    name = "cifar_resnet20"
    full = get_model_spec(name).full_shape()
    before = model_flops(name, full)
    after = model_flops(name, full.replace(widths={"layer1.1.conv2": 15}))
    hw = 32 * 32
    shrunk_convs = (16 * 1 * 9 * hw) * 2  # conv2 loses one output; layer1.2.conv1 one input
    projections = (16 * 15 + 15 * 16) * hw
    assert after == before - shrunk_convs + projections


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
