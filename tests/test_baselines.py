"""Baselines at the TAS budget: uniform and random shapes in the band, L1 pruning via
Torch-Pruning's channel groups."""

from __future__ import annotations

import pytest
import torch

from tasprune.baselines import l1_prune, random_shape, uniform_shape
from tasprune.config import SpaceOptions
from tasprune.cost import model_cost
from tasprune.errors import BudgetError
from tasprune.models import create_model, get_model_spec
from tasprune.search.space import depth_candidates, width_candidates

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = (1, 28, 28)  # Fashion-MNIST


def _ratio(model: str, shape: object) -> float:
    full = model_cost(model, None, SIZE, 10)[0]
    return model_cost(model, shape, SIZE, 10)[0] / full  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("model", "ratio", "tol"),
    [("cifar_resnet20", 0.5, 0.05), ("cifar_resnet56", 0.5, 0.05), ("cifar_resnet20", 0.3, 0.03)],
)
def test_uniform_shape_in_band_with_one_factor(model: str, ratio: float, tol: float) -> None:
    shape = uniform_shape(model, ratio, SIZE, 10, tol)
    assert ratio - tol <= _ratio(model, shape) <= ratio
    full = get_model_spec(model).full_shape()
    assert shape.depths == full.depths
    # One factor for every width: all widths of equal unpruned size get equal widths.
    spec = get_model_spec(model)
    by_full: dict[int, set[int]] = {}
    for name, w in full.widths.items():
        assert spec.width_step(name) > 0  # every width of these ResNets is searchable
        assert shape.widths[name] % spec.width_step(name) == 0
        by_full.setdefault(w, set()).add(shape.widths[name])
    assert all(len(v) == 1 for v in by_full.values())
    assert all(shape.widths[n] < w for n, w in full.widths.items())  # all of them scaled
    create_model(model, shape, in_channels=1)  # a valid shape


def test_uniform_shape_impossible_budget_raises() -> None:
    with pytest.raises(BudgetError, match="FLOPs"):
        uniform_shape("cifar_resnet20", 0.002, SIZE, 10, 0.001)


@pytest.mark.parametrize("model", ["cifar_resnet20", "cifar_resnet56"])
def test_random_shape_in_band_from_the_space_and_seeded(model: str) -> None:
    a = random_shape(model, 0.5, SIZE, 10, 0.05, seed=3)
    assert 0.45 <= _ratio(model, a) <= 0.5
    full = get_model_spec(model).full_shape()
    for name, w in a.widths.items():
        assert w in width_candidates(full.widths[name])
    for stage, d in a.depths.items():
        assert d in depth_candidates(full.depths[stage])
    assert random_shape(model, 0.5, SIZE, 10, 0.05, seed=3) == a
    others = [random_shape(model, 0.5, SIZE, 10, 0.05, seed=s) for s in (4, 5, 6)]
    assert any(o != a for o in others)


def test_random_shape_respects_tied_residuals_and_gives_up_cleanly() -> None:
    shape = random_shape(
        "cifar_resnet20", 0.5, SIZE, 10, 0.05, seed=0, space=SpaceOptions(tie_residual=True)
    )
    groups = get_model_spec("cifar_resnet20").residual_groups()  # type: ignore[misc]
    for group in groups:
        assert len({shape.widths[n] for n in group}) == 1
    with pytest.raises(BudgetError, match="draws"):
        random_shape("cifar_resnet20", 0.02, SIZE, 10, 0.001, seed=0, max_tries=50)


def _tagged_teacher() -> torch.nn.Module:
    """A ResNet-20 (1x28x28) with random weights whose BN running means tag channel indices.

    The tags travel with the channels through pruning (they do not affect the L1 scores), so the
    pruned network tells which original channels it kept. The teacher is frozen, as a KD
    teacher is.
    """
    torch.manual_seed(0)
    net = create_model("cifar_resnet20", in_channels=1)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.arange(m.num_features, dtype=torch.float32))
    net.eval().requires_grad_(False)
    return net


def _kept(bn: torch.nn.Module) -> list[int]:
    return [int(v) for v in bn.running_mean.round().tolist()]  # type: ignore[union-attr]


def test_l1_prune_lands_in_budget_and_is_a_plain_model_of_its_shape() -> None:
    teacher = _tagged_teacher()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    pruned, shape = l1_prune(teacher, "cifar_resnet20", 0.5, SIZE, 10, 0.05)
    assert 0.45 <= _ratio("cifar_resnet20", shape) <= 0.5
    rebuilt = create_model("cifar_resnet20", shape, in_channels=1).eval()
    assert {k: v.shape for k, v in pruned.state_dict().items()} == {
        k: v.shape for k, v in rebuilt.state_dict().items()
    }  # the network of its shape, tensor for tensor
    params = sum(p.numel() for p in pruned.parameters())
    assert params == model_cost("cifar_resnet20", shape, SIZE, 10)[1]
    assert shape.depths == get_model_spec("cifar_resnet20").full_shape().depths
    # The teacher is untouched.
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    # It is exactly create_model(shape) holding the pruned weights.
    rebuilt.load_state_dict(pruned.state_dict(), strict=True)
    x = torch.randn(3, *SIZE)
    with torch.no_grad():
        assert torch.allclose(rebuilt(x), pruned.eval()(x), atol=1e-6)
    # Residual widths are tied by the dependency graph: the stream keeps the same channels.
    kept = _kept(pruned.stem.bn)
    assert kept == _kept(pruned.layer1[2].conv2.bn) == _kept(pruned.layer1[0].conv2.bn)
    assert kept != list(range(len(kept)))  # reordered by L1, not the leading channels


def test_l1_prune_keeps_the_largest_l1_filters() -> None:
    teacher = _tagged_teacher()
    pruned, shape = l1_prune(teacher, "cifar_resnet20", 0.5, SIZE, 10, 0.05)
    for block in ("layer2.1", "layer3.2"):
        name = f"{block}.conv1"
        weight = teacher.get_submodule(f"{name}.conv").weight
        norms = weight.abs().sum(dim=(1, 2, 3))
        k = shape.widths[f"{name}.conv"]
        assert k < weight.shape[0]  # it was pruned
        expected = sorted(torch.argsort(norms, descending=True)[:k].tolist())
        assert expected != list(range(k))  # the largest filters are not simply the first k
        assert sorted(_kept(pruned.get_submodule(f"{name}.bn"))) == expected
    # A residual stream's channels: the largest mean L1 norm over the convs that write it.
    writers = ["stem.conv", *(f"layer1.{j}.conv2.conv" for j in range(3))]
    norms = torch.stack(
        [teacher.get_submodule(w).weight.abs().sum(dim=(1, 2, 3)) for w in writers]
    ).mean(0)
    k = shape.widths["stem.conv"]
    expected = sorted(torch.argsort(norms, descending=True)[:k].tolist())
    assert expected != list(range(k))
    assert sorted(_kept(pruned.stem.bn)) == expected
