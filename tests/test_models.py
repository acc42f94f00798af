"""Checks every registered model (timm style: new models get these checks for free)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import random_shape
from tasprune.errors import ConfigError, ShapeError
from tasprune.models import create_model, get_model_spec, list_models
from tasprune.shape import Shape

pytestmark = pytest.mark.usefixtures("fast_cpu")

MODELS = list_models()
TINY = (3, 16, 16)  # small enough for ResNet-164 on CPU, still downsamples twice


def ones_shape(name: str) -> Shape:
    """Every width 1, every depth 1: the smallest point of the space."""
    full = get_model_spec(name).full_shape()
    return Shape(widths=dict.fromkeys(full.widths, 1), depths=dict.fromkeys(full.depths, 1))


def block_of(key: str, shape: Shape) -> tuple[str, int] | None:
    """(stage, index) of the block a conv name belongs to, or None for convs outside stages."""
    parts = key.split(".")
    if len(parts) >= 3 and parts[0] in shape.depths and parts[1].isdigit():
        return parts[0], int(parts[1])
    return None


def is_kept(key: str, shape: Shape) -> bool:
    block = block_of(key, shape)
    return block is None or block[1] < shape.depths[block[0]]


def test_registry_lists_models() -> None:
    assert sorted(MODELS) == MODELS
    for name in ("cifar_resnet20", "cifar_resnet32", "cifar_resnet56"):
        assert name in MODELS
    for name in ("cifar_resnet110", "cifar_resnet164"):
        assert name in MODELS


@pytest.mark.parametrize("name", MODELS)
def test_spec_is_consistent(name: str) -> None:
    spec = get_model_spec(name)
    assert spec.name == name
    full = spec.full_shape()
    assert full.widths and full.depths
    assert all(isinstance(v, int) and v >= 1 for v in full.widths.values())
    assert all(isinstance(v, int) and v >= 1 for v in full.depths.values())
    full.validate_against(full, name)
    assert len(spec.default_input) == 3


def test_unknown_model_raises_config_error_listing_known_names() -> None:
    with pytest.raises(ConfigError) as info:
        create_model("no_such_model")
    msg = str(info.value)
    assert "no_such_model" in msg
    assert "Fix:" in msg
    for name in MODELS:
        assert name in msg
    with pytest.raises(ConfigError):
        get_model_spec("resnet20")  # close but not a registered name


@pytest.mark.parametrize("name", MODELS)
def test_residual_groups_share_a_width(name: str) -> None:
    groups = get_model_spec(name).residual_groups
    if groups is None:
        pytest.skip(f"{name} declares no residual groups")
    full = get_model_spec(name).full_shape()
    for group in groups():
        assert group and all(k in full.widths for k in group), group
        assert len({full.widths[k] for k in group}) == 1, group


@pytest.mark.parametrize("name", MODELS)
def test_forward_full_shape(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=7).eval()
    with torch.no_grad():
        out = model(torch.randn(2, *TINY))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", MODELS)
def test_backward_gives_finite_grads_everywhere(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name).train()
    x = torch.randn(4, *TINY)
    y = torch.tensor([0, 1, 2, 3])
    loss = nn.functional.cross_entropy(model(x), y)
    assert torch.isfinite(loss)
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("name", MODELS)
def test_single_channel_28x28(name: str) -> None:
    """Fashion-MNIST: 1x28x28 inputs, in_channels=1."""
    torch.manual_seed(0)
    model = create_model(name, in_channels=1, num_classes=10).eval()
    stem_convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.in_channels == 1]
    assert stem_convs, "no conv takes the single input channel"
    with torch.no_grad():
        out = model(torch.randn(3, 1, 28, 28))
    assert out.shape == (3, 10)
    assert torch.isfinite(out).all()
    with pytest.raises(RuntimeError):
        model(torch.randn(1, 3, 28, 28))  # three channels into a one-channel stem


def tied_widths(name: str) -> dict[str, str]:
    """Convs the Shape does not list (e.g. depthwise) -> the Shape width they follow."""
    tied = get_model_spec(name).tied_widths
    return tied() if tied is not None else {}


def check_structure(name: str, model: nn.Module, shape: Shape) -> None:
    modules = dict(model.named_modules())
    for stage, depth in shape.depths.items():
        assert len(list(model.get_submodule(stage).children())) == depth, stage
    searchable = set()
    for key, width in shape.widths.items():
        conv = modules.get(f"{key}.conv")
        if is_kept(key, shape):
            assert isinstance(conv, nn.Conv2d), f"{key}.conv missing"
            assert conv.out_channels == width, f"{key}: {conv.out_channels} != {width}"
            searchable.add(f"{key}.conv")
        else:
            assert conv is None, f"{key} is beyond its stage's depth but was built"
    for key, follows in tied_widths(name).items():
        conv = modules.get(f"{key}.conv")
        if is_kept(key, shape):
            assert isinstance(conv, nn.Conv2d), f"{key}.conv missing"
            assert conv.out_channels == shape.widths[follows], f"{key} should follow {follows}"
            searchable.add(f"{key}.conv")
        else:
            assert conv is None, f"{key} is beyond its stage's depth but was built"
    for mname, m in modules.items():
        if isinstance(m, nn.Conv2d) and "shortcut" not in mname.split("."):
            assert mname in searchable, f"conv {mname} is not described by the shape"


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("seed", [0, 1])
def test_random_shape_builds_to_shape(name: str, seed: int) -> None:
    shape = random_shape(name, seed)
    torch.manual_seed(seed)
    model = create_model(name, shape).eval()
    check_structure(name, model, shape)
    with torch.no_grad():
        out = model(torch.randn(2, *TINY))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", MODELS)
def test_extreme_shapes_build(name: str) -> None:
    full = get_model_spec(name).full_shape()
    shallow = Shape(widths=dict(full.widths), depths=dict.fromkeys(full.depths, 1))
    thin = Shape(widths=dict.fromkeys(full.widths, 1), depths=dict(full.depths))
    for shape in (ones_shape(name), shallow, thin):
        model = create_model(name, shape).eval()
        check_structure(name, model, shape)
        with torch.no_grad():
            out = model(torch.randn(1, 3, 8, 8))
        assert out.shape == (1, 10)
        assert torch.isfinite(out).all()


def is_identity(module: nn.Module) -> bool:
    return isinstance(module, nn.Identity)


def has_conv(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in module.modules())


def probe_input(name: str) -> tuple[int, int, int]:
    """An input that stays above 1x1 through every stride (so strides change the shape)."""
    c, h, w = get_model_spec(name).default_input
    return c, min(h, 64), min(w, 64)


def block_io(
    model: nn.Module, blocks: list[nn.Module], x: torch.Tensor
) -> dict[int, tuple[torch.Size, torch.Size]]:
    """id(block) -> (input shape, output shape) seen in one forward of ``x``."""
    io: dict[int, tuple[torch.Size, torch.Size]] = {}

    def hook(m: nn.Module, args: tuple, out: torch.Tensor) -> None:
        io[id(m)] = (args[0].shape, out.shape)

    handles = [b.register_forward_hook(hook) for b in blocks]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return io


@pytest.mark.parametrize("name", MODELS)
def test_projection_shortcut_iff_width_or_resolution_changes(name: str) -> None:
    shapes = [get_model_spec(name).full_shape(), ones_shape(name), random_shape(name, 7)]
    seen = {"projection": 0, "identity": 0}
    for shape in shapes:
        model = create_model(name, shape).eval()
        blocks = [
            b
            for stage in shape.depths
            for b in model.get_submodule(stage).children()
            if hasattr(b, "shortcut")
        ]
        io = block_io(model, blocks, torch.randn(1, *probe_input(name)))
        for b in blocks:
            x_shape, y_shape = io[id(b)]
            if x_shape != y_shape:  # width or resolution changes
                assert has_conv(b.shortcut), f"{x_shape}->{y_shape} needs a projection"
                seen["projection"] += 1
            else:
                assert is_identity(b.shortcut), f"{x_shape}->{y_shape} should be identity"
                seen["identity"] += 1
    if not any(seen.values()):
        pytest.skip(f"{name} has no residual blocks with a shortcut")
    assert seen["identity"] > 0, seen
    assert seen["projection"] > 0, seen


def test_width_change_at_stride_1_gets_projection() -> None:
    """ResNet-20 layer1.1: 16 -> 12 at stride 1 must project; layer1.2 12 -> 16 too."""
    name = "cifar_resnet20"
    full = get_model_spec(name).full_shape()
    shape = full.replace(widths={"layer1.1.conv2": 12})
    model = create_model(name, shape)
    assert has_conv(model.get_submodule("layer1.1.shortcut"))
    assert has_conv(model.get_submodule("layer1.2.shortcut"))
    assert model.get_submodule("layer1.1.shortcut.conv").in_channels == 16
    assert model.get_submodule("layer1.1.shortcut.conv").out_channels == 12
    assert is_identity(model.get_submodule("layer1.0.shortcut"))  # 16 -> 16 at stride 1
    assert has_conv(model.get_submodule("layer2.0.shortcut"))  # stride 2


@pytest.mark.parametrize("name", MODELS)
def test_state_dict_round_trip(name: str) -> None:
    shape = random_shape(name, 3)
    torch.manual_seed(0)
    src = create_model(name, shape).train()
    with torch.no_grad():
        for _ in range(2):  # move the BN running statistics away from their init
            src(torch.randn(4, *TINY))
    src.eval()
    torch.manual_seed(1)
    dst = create_model(name, shape).eval()
    x = torch.randn(2, *TINY)
    with torch.no_grad():
        assert not torch.equal(src(x), dst(x))
        dst.load_state_dict(src.state_dict())  # strict: same keys and sizes
        assert torch.equal(src(x), dst(x))


@pytest.mark.parametrize("name", MODELS)
def test_invalid_shape_rejected_by_create_model(name: str) -> None:
    full = get_model_spec(name).full_shape()
    key = next(iter(full.widths))
    with pytest.raises(ShapeError, match="Fix:"):
        create_model(name, full.replace(widths={key: 0}))
    with pytest.raises(ShapeError, match="Fix:"):
        create_model(name, full.replace(widths={key: full.widths[key] + 1}))
