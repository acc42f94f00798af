"""Channel ordering by importance: the reordered network computes the same function, and its
kept prefixes are the most important channels."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tasprune.importance import _groups, group_importance, order_channels
from tasprune.models import create_model

pytestmark = pytest.mark.usefixtures("fast_cpu")

CASES = [
    ("cifar_resnet20", (1, 28, 28)),
    ("cifar_resnet164", (3, 32, 32)),
    ("resnet18", (3, 64, 64)),
    ("mobilenet_v2", (3, 64, 64)),
]


def trained_looking(name: str, size: tuple[int, int, int]) -> nn.Module:
    """Random weights and non-trivial BN statistics and scales (so any slip shows)."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_channels=size[0])
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.1)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model.eval()


@pytest.mark.parametrize("criterion", ["l1", "bn"])
@pytest.mark.parametrize("name,size", CASES, ids=[c[0] for c in CASES])
def test_ordered_network_is_the_same_function(name: str, size, criterion: str) -> None:
    model = trained_looking(name, size)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ordered = order_channels(model, criterion, size)  # type: ignore[arg-type]
    x = torch.rand(4, *size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ordered(x), model(x), rtol=1e-4, atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # a copy
    changed = sum(not torch.equal(before[k], v) for k, v in ordered.state_dict().items())
    assert changed > 0  # something was actually permuted
    dg, groups = _groups(ordered.requires_grad_(True), torch.randn(1, *size))
    for group in groups:
        scores = group_importance(dg, group, criterion)  # type: ignore[arg-type]
        if scores is not None:
            assert bool((scores[:-1] >= scores[1:] - 1e-6).all())  # most important first


def test_taylor_needs_batches_and_keeps_the_function() -> None:
    size = (1, 28, 28)
    model = trained_looking("cifar_resnet20", size)
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randn(8, *size, generator=gen), torch.randint(0, 10, (8,), generator=gen))]
    ordered = order_channels(model, "taylor", size, batches=batches)
    x = torch.rand(2, *size)
    with torch.no_grad():
        torch.testing.assert_close(ordered(x), model(x), rtol=1e-4, atol=1e-5)
    from tasprune.errors import ConfigError

    with pytest.raises(ConfigError, match="needs training batches"):
        order_channels(model, "taylor", size)


def test_a_run_searches_and_initialises_from_the_ordered_teacher(tmp_path) -> None:
    import tasprune.pipeline as pipeline
    from conftest import needs_fashion_mnist  # noqa: F401  (real data below)
    from tasprune.checkpoint import load_model_checkpoint
    from tasprune.config import load_recipe

    recipe = load_recipe(
        None,
        {
            "model": "cifar_resnet20",
            "device": "cpu",
            "data": {"name": "fashion-mnist", "train_subset": 160, "test_subset": 64},
            "teacher": {"train": {"epochs": 1, "batch_size": 64}, "order": "l1"},
            "search": {"epochs": 1, "batch_size": 64, "valid_batches": 1},
            "distill": {"init": "teacher", "train": {"epochs": 1, "batch_size": 64}},
            "report": {"latency_batches": [1], "latency_repeats": 1, "int8": False},
        },
    )
    out = tmp_path / "r"
    pipeline.run(recipe, out, progress=False)
    stored, _ = load_model_checkpoint(out / "teacher" / "model.pt")
    seen = pipeline._Run(recipe, out, progress=False).teacher  # what search and student got
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(seen.eval()(x), stored.eval()(x), rtol=1e-4, atol=1e-5)
    assert not torch.equal(
        seen.state_dict()["stem.conv.weight"], stored.state_dict()["stem.conv.weight"]
    )
    assert (out / "student" / "final.json").is_file()


@pytest.mark.parametrize(
    "name", ["torchvision:resnet18", "timm:mobilenetv3_small_100", "timm:convnext_atto"]
)
def test_traced_models_order_by_bn_and_keep_the_function(name: str) -> None:
    """The default criterion on traced networks: the same function; a group with a layer that
    cannot be reordered (ConvNeXt's LayerNorm and layer scale) is left as trained, not an
    error, so the default never refuses a network; a group without a batch norm (ConvNeXt's
    MLP widths) is ordered by its weights' L1 norm."""
    size = (3, 64, 64)
    model = trained_looking(name, size)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ordered = order_channels(model, "bn", size)
    x = torch.rand(2, *size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ordered(x), model(x), rtol=1e-4, atol=1e-5)
    changed = {k for k, v in ordered.state_dict().items() if not torch.equal(before[k], v)}
    assert changed
    if "convnext" in name:  # the MLP widths move, the LayerNorm streams stay
        assert all(".mlp." in k for k in changed)
