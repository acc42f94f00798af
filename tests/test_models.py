"""Checks every shipped model (timm style: new models get these checks for free).

A shipped name is a plain network traced like any other: its width keys are the first conv
(module order) writing each channel group, its depth keys a stage's first block, and blocks
that declare ``tasprune_shortcut`` get a bare 1x1 projection only where a pruned shape gives
them different input and output widths. `traced(name)` is the analysis the structure checks
read the expected widths from.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import random_shape
from tasprune.errors import ConfigError, ShapeError
from tasprune.models import create_model, get_model_spec, list_models
from tasprune.models.layers import Projection
from tasprune.models.traced import Traced, traced
from tasprune.models.zoo import shipped
from tasprune.shape import Shape

pytestmark = pytest.mark.usefixtures("fast_cpu")

MODELS = [m for m in list_models() if not m.startswith("vit")]  # CNNs; ViT: test_attention
TINY = (3, 16, 16)  # small enough for ResNet-164 on CPU, still downsamples twice


def ones_shape(name: str) -> Shape:
    """Every searchable width at its smallest step, every depth 1: the smallest point."""
    spec = get_model_spec(name)
    full = spec.full_shape()
    widths = {k: spec.width_step(k) or v for k, v in full.widths.items()}
    return Shape(widths=widths, depths=dict.fromkeys(full.depths, 1))


def is_kept(tr: Traced, layer: str, shape: Shape) -> bool:
    """Is ``layer`` in the network of ``shape`` (not inside a block its stage skips)?"""
    stage, index = tr.where(layer)
    return stage is None or index < shape.depths[stage]


def group_widths(tr: Traced, shape: Shape) -> dict[str, int]:
    """The width of every channel group in the network of ``shape``: the shape's, except that
    what follows a shallower stage reads its last kept block's output."""
    widths = dict(shape.widths)
    for stage, outputs in tr.stage_outputs.items():
        widths[outputs[-1]] = shape.widths[outputs[shape.depths[stage] - 1]]
    return widths


def is_identity(module: nn.Module) -> bool:
    return isinstance(module, nn.Identity)


def has_conv(module: nn.Module) -> bool:
    """A block with a layer of its own (a conv, or a transformer block's linears)."""
    return any(isinstance(m, (nn.Conv2d, nn.Linear)) for m in module.modules())


def is_bare_projection(module: nn.Module, cin: int, cout: int) -> bool:
    """A 1x1 conv with no bias and no BatchNorm of its own: the inserted projection."""
    return (
        type(module) is nn.Conv2d
        and module.kernel_size == (1, 1)
        and module.stride == (1, 1)
        and module.bias is None
        and (module.in_channels, module.out_channels) == (cin, cout)
    )


def test_registry_lists_models() -> None:
    assert sorted(MODELS) == MODELS
    for name in ("cifar_resnet20", "cifar_resnet32", "cifar_resnet44", "cifar_resnet56"):
        assert name in MODELS
    for name in ("cifar_resnet110", "cifar_resnet164", "resnet18", "resnet34", "resnet50"):
        assert name in MODELS
    assert "mobilenet_v2" in MODELS
    for name in MODELS:
        found = shipped(name)
        assert found is not None and found.name == name
        assert shipped(f"tasprune:{name}") is found  # the prefixed name is the same source
    assert shipped("no_such_model") is None


def test_prefixed_name_is_the_same_model() -> None:
    bare, prefixed = get_model_spec("cifar_resnet20"), get_model_spec("tasprune:cifar_resnet20")
    assert bare.full_shape() == prefixed.full_shape()
    assert bare.residual_groups() == prefixed.residual_groups()
    shape = random_shape("cifar_resnet20", 5)
    a = create_model("cifar_resnet20", shape)
    b = create_model("tasprune:cifar_resnet20", shape)
    assert {k: v.shape for k, v in a.state_dict().items()} == {
        k: v.shape for k, v in b.state_dict().items()
    }


def test_create_model_takes_a_shape_file(tmp_path) -> None:
    shape = random_shape("cifar_resnet20", 0)
    shape.save(tmp_path / "shape.json")
    a = create_model("cifar_resnet20", shape)
    b = create_model("cifar_resnet20", str(tmp_path / "shape.json"))
    assert [p.shape for p in a.parameters()] == [p.shape for p in b.parameters()]
    with pytest.raises(ShapeError, match="a Shape or a shape.json path, not tuple"):
        create_model("cifar_resnet20", Shape.load(tmp_path / "shape.json"))  # type: ignore[arg-type]


@pytest.mark.parametrize("name", MODELS)
def test_spec_is_consistent(name: str) -> None:
    spec = get_model_spec(name)
    assert spec.name == name
    assert spec.description.startswith(shipped(name).description)  # type: ignore[union-attr]
    full = spec.full_shape()
    assert full.widths and full.depths
    assert all(isinstance(v, int) and v >= 1 for v in full.widths.values())
    assert all(isinstance(v, int) and v >= 1 for v in full.depths.values())
    full.validate_against(full, name)
    assert len(spec.default_input) == 3
    # Width keys: the layers of the unpruned network that first write each group, at its width.
    model = create_model(name)
    modules = dict(model.named_modules())
    tr = traced(name)
    for key, width in full.widths.items():
        layer = modules.get(key)  # a conv, or the linear of an attention's heads (q/k/v rows)
        assert isinstance(layer, (nn.Conv2d, nn.Linear)), f"width key {key} is not a layer"
        out = layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
        assert out == width * tr.per_channel.get((key, True, key), 1), key
        step = spec.width_step(key)
        assert step >= 0 and (step == 0 or width % step == 0), (key, step)
    # Depth keys: the first block of a stage of residual blocks, as many as it holds.
    assert set(full.depths) == set(tr.stages)
    for stage, depth in full.depths.items():
        st = tr.stages[stage]
        assert st.blocks[0] == stage and len(st.blocks) == depth >= 2
        assert len(list(model.get_submodule(st.container).children())) >= depth
        for block in st.blocks:
            assert has_conv(model.get_submodule(block)), block
    # The unpruned network keeps no projection tasprune inserted.
    assert not any(getattr(m, "tasprune_optional", False) for m in model.modules())


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
    spec = get_model_spec(name)
    groups = spec.residual_groups()
    assert groups, f"{name} has residual streams"
    full = spec.full_shape()
    seen: set[str] = set()
    for group in groups:
        assert len(group) >= 2 and all(k in full.widths for k in group), group
        assert len({full.widths[k] for k in group}) == 1, group
        assert not seen & set(group), "a width key in two residual streams"
        seen |= set(group)


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


def check_structure(name: str, model: nn.Module, shape: Shape, in_channels: int = 3) -> None:
    """``model`` is the network of ``shape``: skipped blocks are identities, every width key
    has its width, and every conv and the classifier read and write the widths of the channel
    groups the analysis assigns them (a depthwise conv: its producer's); the only convs no
    group describes do not exist."""
    tr = traced(name)
    modules = dict(model.named_modules())
    for stage, depth in shape.depths.items():
        st = tr.stages[stage]
        container = model.get_submodule(st.container)
        kids = [container.get_submodule(c) for c in st.children]
        assert not any(is_identity(k) for k in kids[:depth]), f"{stage}: a kept block is gone"
        assert all(is_identity(k) for k in kids[depth:]), f"{stage}: a skipped block was built"
    for key, width in shape.widths.items():
        conv = modules.get(key)
        if is_kept(tr, key, shape):
            assert isinstance(conv, nn.Conv2d), f"{key} missing"
            assert conv.out_channels == width, f"{key}: {conv.out_channels} != {width}"
        else:
            assert conv is None, f"{key} is beyond its stage's depth but was built"
    widths = group_widths(tr, shape)
    layers = 0
    for mname, m in modules.items():
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        layers += 1
        assert is_kept(tr, mname, shape), f"{mname} is in a skipped block"
        outs, ins = tr.group_of.get((mname, True)), tr.group_of.get((mname, False))
        cin = m.in_channels if isinstance(m, nn.Conv2d) else m.in_features
        cout = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
        if isinstance(m, nn.Linear):
            assert outs is None, f"the classifier {mname} keeps its outputs"
        else:
            assert outs, f"conv {mname} is not described by the analysis"
            assert cout == sum(widths[g] for g in outs), f"{mname} writes {cout}"
        unpruned = tr.template.get_submodule(mname)
        if isinstance(m, nn.Conv2d) and isinstance(unpruned, nn.Conv2d) and unpruned.groups > 1:
            # depthwise (even when pruned to one channel): it reads what it writes
            assert m.groups == cin == cout, f"{mname} stays depthwise"
        elif ins:
            assert cin == sum(widths[g] for g in ins), f"{mname} reads {cin}"
        else:
            assert cin == in_channels, f"{mname} reads neither a group nor the image"
        if getattr(m, "tasprune_optional", False):
            assert mname.endswith(".shortcut") and is_bare_projection(m, cin, cout), mname
            assert cin != cout, f"{mname} projects equal widths"
    assert layers > len([k for k in shape.widths if is_kept(tr, k, shape)])


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
    ones = ones_shape(name)
    shallow = Shape(widths=dict(full.widths), depths=dict(ones.depths))
    thin = Shape(widths=dict(ones.widths), depths=dict(full.depths))
    for shape in (full, ones, shallow, thin):
        model = create_model(name, shape, in_channels=1).eval()
        check_structure(name, model, shape, in_channels=1)
        with torch.no_grad():
            out = model(torch.randn(1, 1, 8, 8))
        assert out.shape == (1, 10)
        assert torch.isfinite(out).all()


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
    """A block's shortcut is the identity where its input and output agree; where they do
    not, it is the unpruned network's projection, or else a bare 1x1 conv (no BN)."""
    unpruned = create_model(name)
    shapes = [get_model_spec(name).full_shape(), ones_shape(name), random_shape(name, 7)]
    seen = {"projection": 0, "inserted": 0, "identity": 0}
    for shape in shapes:
        model = create_model(name, shape).eval()
        blocks = {
            n: b
            for n, b in model.named_modules()
            if getattr(type(b), "tasprune_shortcut", None) and hasattr(b, "shortcut")
        }
        io = block_io(model, list(blocks.values()), torch.randn(1, *probe_input(name)))
        for n, b in blocks.items():
            x_shape, y_shape = io[id(b)]
            before = unpruned.get_submodule(f"{n}.shortcut")
            if isinstance(before, Projection):  # the network's own: kept, pruned
                assert isinstance(b.shortcut, Projection), n
                assert b.shortcut.conv.in_channels == x_shape[1], n
                assert b.shortcut.conv.out_channels == y_shape[1], n
                seen["projection"] += 1
            elif x_shape != y_shape:  # an identity of the network whose widths now differ
                assert x_shape[2:] == y_shape[2:], f"{n}: an identity block changed resolution"
                assert is_bare_projection(b.shortcut, x_shape[1], y_shape[1]), n
                seen["inserted"] += 1
            else:
                assert is_identity(b.shortcut), f"{n}: {x_shape}->{y_shape} should be identity"
                seen["identity"] += 1
    assert seen["identity"] > 0, seen
    assert seen["inserted"] > 0, seen
    if name != "mobilenet_v2":  # ResNets downsample through a projection
        assert seen["projection"] > 0, seen


def test_width_change_at_stride_1_gets_projection() -> None:
    """ResNet-20 layer1.1: 16 -> 12 at stride 1 must project; layer1.2 12 -> 16 too."""
    name = "cifar_resnet20"
    full = get_model_spec(name).full_shape()
    shape = full.replace(widths={"layer1.1.conv2.conv": 12})
    model = create_model(name, shape)
    assert is_bare_projection(model.get_submodule("layer1.1.shortcut"), 16, 12)
    assert is_bare_projection(model.get_submodule("layer1.2.shortcut"), 12, 16)
    assert is_identity(model.get_submodule("layer1.0.shortcut"))  # 16 -> 16 at stride 1
    assert isinstance(model.get_submodule("layer2.0.shortcut"), Projection)  # stride 2
    assert model.get_submodule("layer2.0.shortcut.conv").in_channels == 16
    # Created from scratch, a projection starts as the identity on the channels both keep.
    for block, (cin, cout) in (("layer1.1", (16, 12)), ("layer1.2", (12, 16))):
        proj = model.get_submodule(f"{block}.shortcut")
        assert isinstance(proj, nn.Conv2d)
        assert torch.equal(proj.weight[:, :, 0, 0], torch.eye(cout, cin)), block
    with torch.no_grad():
        assert model(torch.randn(1, 3, 16, 16)).shape == (1, 10)
    # Dropping the narrower block makes layer1 16 -> 16 again: no projection is left.
    shallow = create_model(name, shape.replace(depths={"layer1.0": 1}))
    assert not any(getattr(m, "tasprune_optional", False) for m in shallow.modules())


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
    stage = next(iter(full.depths))
    with pytest.raises(ShapeError, match="Fix:"):
        create_model(name, full.replace(depths={stage: full.depths[stage] + 1}))
    old_style = key.removesuffix(".conv")  # the family mechanism's names are gone
    with pytest.raises(ShapeError, match="Fix:"):
        create_model(name, full.replace(widths={old_style: 1}))
