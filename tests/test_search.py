"""Invariants of the TAS search space, its width mixtures and the search loop."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from conftest import one_hot
from tasprune.budget import Budget
from tasprune.cost import model_cost
from tasprune.data import ArrayDataset, stratified_split
from tasprune.datasets import load_dataset
from tasprune.errors import BudgetError, ConfigError, TrainingError
from tasprune.models import create_model, get_model_spec
from tasprune.search import (
    SearchConfig,
    SpaceOptions,
    SuperNet,
    depth_candidates,
    search,
    smallest_shape,
    width_candidates,
)
from tasprune.search.choice import align_matrix
from tasprune.search.loop import check_budget
from tasprune.search.traced import candidate_affine_layers
from tasprune.shape import Shape

pytestmark = pytest.mark.usefixtures("one_thread")


def test_width_candidates_match_reference() -> None:
    assert width_candidates(16) == [4, 6, 8, 9, 11, 12, 14, 16]
    assert width_candidates(32) == [9, 12, 16, 19, 22, 25, 28, 32]
    assert width_candidates(64) == [19, 25, 32, 38, 44, 51, 57, 64]
    assert width_candidates(3, (0.1, 0.5)) == [1, 3]


def test_depth_candidates_match_reference() -> None:
    assert depth_candidates(3) == [1, 2, 3]
    assert depth_candidates(9) == [1, 3, 5, 7, 9]
    assert depth_candidates(18) == [1, 3, 5, 7, 9, 11, 13, 15, 17, 18]


SPACES = [
    ("cifar_resnet20", SpaceOptions()),  # residual widths tied per stage (the default)
    ("cifar_resnet20", SpaceOptions(tie_residual=False)),  # per block: new projections
    ("cifar_resnet20", SpaceOptions(search_depth=False)),
    ("cifar_resnet20", SpaceOptions(search_width=False)),
    ("cifar_resnet56", SpaceOptions(tie_residual=False)),
    ("cifar_resnet164", SpaceOptions()),
]


@pytest.mark.parametrize(("model", "opts"), SPACES)
def test_expected_cost_equals_exact_onone_hot(model: str, opts: SpaceOptions) -> None:
    rng = random.Random(0)
    net = SuperNet(model, num_classes=10, in_channels=1, input_size=(28, 28), options=opts)
    for _ in range(6):
        one_hot(net, rng)
        shape = net.derive()
        exp_flops, exp_params = net.expected_cost()
        flops, params = net.shape_cost(shape)
        assert round(float(exp_flops.detach())) == flops
        assert round(float(exp_params.detach())) == params


@pytest.mark.parametrize("model,opts", SPACES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(SPACES)])
def test_argmax_cost_on_the_device_is_the_exact_cost_of_the_derived_shape(
    model: str, opts: SpaceOptions
) -> None:
    """What the budget loss reads every step (no host round trip) is the argmax shape's exact
    cost, for soft (not one-hot) distributions too."""
    torch.manual_seed(0)
    net = SuperNet(model, num_classes=10, in_channels=1, input_size=(28, 28), options=opts)
    for _ in range(4):
        with torch.no_grad():
            for p in net.arch_parameters():
                p.normal_()
        flops, params = net.argmax_cost()
        assert not flops.requires_grad
        assert (round(float(flops)), round(float(params))) == net.shape_cost(net.derive())


def test_search_divergence_names_the_exact_step(tmp_path, monkeypatch) -> None:
    """Losses are read on the host only every CHECK_EVERY steps; the device-side marker still
    names the first bad step."""
    import tasprune.search.step as step

    data = _subset(256)
    cfg = SearchConfig(
        epochs=1, batch_size=16, valid_batches=1, flops_ratio=0.6, holdout=0, arch_step="alternate"
    )  # split A: 8 steps of 16 images
    real_step = step.SearchStepper.step
    calls = {"n": 0}

    def poisoned(self, *args):  # type: ignore[no-untyped-def]
        out = real_step(self, *args)
        calls["n"] += 1
        return (out[0] * float("nan"), *out[1:]) if calls["n"] == 3 else out

    monkeypatch.setattr(step.SearchStepper, "step", poisoned)
    with pytest.raises(TrainingError, match=r"nan at epoch 1 step 3;.*Fix:"):
        search("cifar_resnet20", data, cfg, tmp_path / "s", progress=False)
    assert calls["n"] == 8  # ran on to the end of the epoch's first check window (8 steps)


FAST_SPACES = [(m, o) for m, o in SPACES if m != "cifar_resnet164"]  # R164: ~8 s a projection


@pytest.mark.parametrize(
    "model,opts", FAST_SPACES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(FAST_SPACES)]
)
def test_projection_lands_in_the_band_from_any_distribution(model: str, opts: SpaceOptions) -> None:
    torch.manual_seed(1)
    net = SuperNet(model, num_classes=10, in_channels=1, input_size=(28, 28), options=opts)
    full = net.full_flops
    small = net.shape_cost(smallest_shape(model, opts))[0] / full
    for ratio in (0.5, 0.7):
        budget = Budget(ratio, 0.05)
        if small > budget.band[1]:
            continue  # this space cannot reach the band (e.g. depth-only)
        for start in (net.full_shape, smallest_shape(model, opts)):
            with torch.no_grad():
                for p in net.arch_parameters():
                    p.normal_()
            shape = net.project(start, budget)
            shape.validate_against(net.full_shape, model)
            flops = net.shape_cost(shape)[0]
            assert budget.within_target(flops / full)  # never over budget
            if opts.search_width:  # depth steps alone (1/9 of the FLOPs each) can skip the band
                assert budget.contains(flops, full), (model, ratio, flops / full)
        inside = net.project(net.full_shape, budget)
        assert net.project(inside, budget) == inside  # in band already: unchanged


def test_a_search_that_ends_outside_the_band_keeps_a_projected_shape(tmp_path) -> None:
    data = _subset(128)
    cfg = SearchConfig(epochs=1, batch_size=32, valid_batches=1, flops_ratio=0.4, arch_lr=1e-6)
    result = search("cifar_resnet20", data, cfg, tmp_path / "s", progress=False)
    saved, meta = Shape.load(tmp_path / "s" / "shape.json")
    assert meta["source"] == "projected" and saved == result.shape
    assert cfg.budget.contains_ratio(result.flops_ratio)


@pytest.mark.parametrize("keep", ["last", "best"])
def test_a_last_shape_outside_the_band_is_projected_unless_keep_best(keep: str) -> None:
    # The last argmax is the full network (over budget); an earlier epoch was in band.
    from tasprune.search.result import finish

    cfg = SearchConfig(flops_ratio=0.5, keep=keep)
    net = SuperNet("cifar_resnet20")
    with torch.no_grad():
        for p in net.arch_parameters():
            p.zero_()
            p[..., -1] = 10.0  # argmax: the largest candidate everywhere
    assert net.derive() == net.full_shape
    best = net.project(net.full_shape, cfg.budget)
    assert best != net.full_shape
    # An earlier in-band shape different from the projection of the last one.
    other = net.project(smallest_shape("cifar_resnet20"), cfg.budget)
    assert other != best and cfg.budget.contains_ratio(net.shape_cost(other)[0] / net.full_flops)
    record = {"epoch": 1, "valid_top1": 50.0, "shape": other.to_dict()}
    result = finish(net, cfg, None, record, [])
    assert result.last_shape == net.full_shape and result.best_shape == other
    assert result.shape == (best if keep == "last" else other)
    assert cfg.budget.contains_ratio(result.flops_ratio)


def test_a_seeded_supernet_does_not_depend_on_what_ran_before(monkeypatch) -> None:
    """Analysing a model (its first use in a process; cached) does not move the global RNG:
    one seed gives one supernet and one random stream after it, first use or not (else the
    second of two seeded searches in a process starts from other weights)."""
    import tasprune.models.traced as traced_mod

    for cache in ("_ANALYSES", "_LAYERS", "_SPECS", "_RESIDUAL"):
        monkeypatch.setattr(traced_mod, cache, {})  # this process has not analysed it yet
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        net = SuperNet("cifar_resnet20", in_channels=1, input_size=(28, 28))
        runs.append((net.state_dict(), torch.rand(4)))
    (first, after_first), (second, after_second) = runs
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert torch.equal(after_first, after_second)


def test_expected_cost_is_between_extremes_and_differentiable() -> None:
    net = SuperNet("cifar_resnet20")
    lo = model_cost("cifar_resnet20", smallest_shape("cifar_resnet20"), (3, 32, 32))[0]
    hi = net.full_flops
    flops, params = net.expected_cost()
    assert lo < float(flops.detach()) < hi
    flops.backward()
    for p in net.arch_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_full_width_sample_reproduces_plain_network() -> None:
    torch.manual_seed(0)
    plain = create_model("cifar_resnet20", num_classes=10, in_channels=1).eval()
    for m in plain.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
            m.bias.data.normal_()
    net = SuperNet("cifar_resnet20", in_channels=1, input_size=(28, 28)).eval()
    net.load_plain_weights(plain.state_dict())
    x = torch.randn(3, 1, 28, 28)
    with net.fixed(net.full_shape):
        out = net(x)
    torch.testing.assert_close(out, plain(x), rtol=1e-4, atol=1e-4)


def test_derived_shape_transfers_to_plain_network() -> None:
    """A sub-network of the supernet equals the plain pruned network built from its weights."""
    torch.manual_seed(1)
    net = SuperNet("cifar_resnet20", options=SpaceOptions(search_depth=False)).eval()
    shape = Shape(
        widths={n: net.width_of[n].candidates[2] for n in net.full_shape.widths},
        depths=dict(net.full_shape.depths),
    )
    # Equal widths everywhere: the pruned net has projections only where the supernet has them.
    pruned = create_model("cifar_resnet20", shape).eval()
    missing = set(pruned.state_dict()) - set(net.plain_state_dict(shape))
    assert not missing
    pruned.load_state_dict(net.plain_state_dict(shape))
    x = torch.randn(2, 3, 32, 32)
    with net.fixed(shape):
        out = net(x)
    torch.testing.assert_close(out, pruned(x), rtol=1e-4, atol=1e-4)


def test_gradients_reach_every_width_and_depth_logit() -> None:
    torch.manual_seed(0)
    net = SuperNet("cifar_resnet20").train()
    y = torch.randint(0, 10, (8,))
    loss = F.cross_entropy(net(torch.randn(8, 3, 32, 32)), y)
    loss.backward()
    assert net.width_logits and net.depth_logits
    for p in net.arch_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_align_matrix_is_channel_pooling_or_zero_padding() -> None:
    m = align_matrix(3, 4, "cwi", torch.device("cpu"), torch.float64)
    expected = torch.tensor(
        [[1.0, 0, 0], [0.5, 0.5, 0], [0, 0.5, 0.5], [0, 0, 1.0]], dtype=torch.float64
    )
    torch.testing.assert_close(m, expected)
    # Same as adaptive average pooling along the channel axis.
    x = torch.randn(2, 5, 3, 3, dtype=torch.float64)
    pooled = F.adaptive_avg_pool1d(x.permute(0, 2, 3, 1).reshape(-1, 1, 5), 8)
    pooled = pooled.reshape(2, 3, 3, 8).permute(0, 3, 1, 2)
    via_matrix = torch.einsum("oc,nchw->nohw", align_matrix(5, 8, "cwi", x.device, x.dtype), x)
    torch.testing.assert_close(via_matrix, pooled)
    pad = align_matrix(2, 3, "pad", torch.device("cpu"), torch.float64)
    torch.testing.assert_close(pad, torch.tensor([[1.0, 0], [0, 1.0], [0, 0]], dtype=torch.float64))


@pytest.mark.parametrize("align", ["cwi", "pad"])
def test_candidate_affine_site_equals_direct_per_candidate_computation(align: str) -> None:
    """A conv + BatchNorm (one affine per candidate) + ReLU site of the searchable network,
    with two candidates sampled, equals: BN statistics of the batch, each candidate's affine on
    its channels, aligned onto the widest sampled one, weighted sum (the rest zero)."""
    torch.manual_seed(0)
    opts = SpaceOptions(align=align, candidate_affine=True)
    net = SuperNet("cifar_resnet20", input_size=(8, 8), options=opts).train()
    site = net.net.get_submodule("layer1.0.conv1")  # conv -> bn -> relu, 16 channels
    bn = candidate_affine_layers(net.net)["layer1.0.conv1.bn"]
    assert bn is site.bn and bn.cand_weight.shape == (8, 16)  # 8 candidates x 16 channels
    with torch.no_grad():
        bn.cand_weight.normal_()
        bn.cand_bias.normal_()
    choice = net.width_of["layer1.0.conv1.conv"]
    assert choice.candidates[:2] == [4, 6]
    w = torch.tensor([0.3, 0.7], requires_grad=True)
    choice.selected = [(0, 4, w[0]), (1, 6, w[1])]
    x = torch.randn(4, 16, 7, 7)
    out = site(x)
    y = F.conv2d(x, site.conv.weight.detach(), padding=1)
    mean, var = y.mean((0, 2, 3)), y.var((0, 2, 3), unbiased=False)
    yhat = (y - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + 1e-5)
    ref = torch.zeros_like(yhat)
    cw, cb = bn.cand_weight.detach(), bn.cand_bias.detach()
    for (i, k), wt in zip([(0, 4), (1, 6)], w, strict=True):
        z = yhat[:, :k] * cw[i, :k, None, None] + cb[i, :k, None, None]
        a = align_matrix(k, 6, align, x.device, x.dtype)
        ref[:, :6] = ref[:, :6] + wt * torch.einsum("oc,nchw->nohw", a, z)
    torch.testing.assert_close(out, F.relu(ref), rtol=1e-4, atol=1e-5)
    assert torch.equal(out[:, 6:], torch.zeros_like(out[:, 6:]))  # beyond the widest sampled
    out.sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0
    assert bn.cand_weight.grad is not None
    assert bn.cand_weight.grad[:2].abs().sum() > 0  # the sampled candidates' affines learn
    assert bn.cand_weight.grad[2:].abs().sum() == 0  # the others are not in this forward


def test_budget_loss_pushes_towards_band() -> None:
    e = torch.tensor(100.0, requires_grad=True)
    budget = Budget(0.55, 0.1)  # band [45, 55] of a full cost of 100
    assert budget.bounds(100) == pytest.approx((45, 55))
    assert budget.loss(e, current=60, full=100, weight=2.0).item() > 0
    budget.loss(e, current=60, full=100, weight=2.0).backward()
    assert e.grad is not None and e.grad > 0  # descent lowers the expected cost
    e.grad = None
    budget.loss(e, current=30, full=100, weight=2.0).backward()
    assert e.grad is not None and e.grad < 0  # descent raises it
    assert budget.loss(e, current=50, full=100, weight=2.0).item() == 0
    assert budget.contains(45, 100) and budget.contains(55, 100) and not budget.contains(56, 100)
    assert budget.within_target(0.3) and not budget.within_target(0.56)


def test_budget_feasibility_from_the_candidate_lists() -> None:
    """The reachability check builds no network: smallest shape of the space + cost model."""
    small = smallest_shape("cifar_resnet20")
    net = SuperNet("cifar_resnet20")
    want = {n: net.width_of[n].candidates[0] for n in net.full_shape.widths}
    assert small.widths == want
    assert small.depths == {s: c.candidates[0] for s, c in net.depth_of.items()}
    floor = model_cost("cifar_resnet20", small, (3, 32, 32))[0] / net.full_flops
    check_budget("cifar_resnet20", SearchConfig(flops_ratio=floor + 0.06), (3, 32, 32), 10)
    with pytest.raises(BudgetError, match=f"flops_ratio >= {floor:.3f}"):
        check_budget("cifar_resnet20", SearchConfig(flops_ratio=floor * 0.9, tolerance=0.001),
                     (3, 32, 32), 10)  # fmt: skip
    with pytest.raises(ValueError, match="below params_ratio"):
        SearchConfig(params_ratio=0.04)


def _subset(n: int) -> ArrayDataset:
    data = load_dataset("fashion-mnist", "train")
    idx, _ = stratified_split(data.labels, n / len(data), seed=0)
    return data.subset(idx)


def test_infeasible_target_is_refused_before_training(tmp_path) -> None:
    data = _subset(100)
    cfg = SearchConfig(flops_ratio=0.01, tolerance=0.005, epochs=1, batch_size=16)
    with pytest.raises(BudgetError, match="smallest shape"):
        search("cifar_resnet20", data, cfg, tmp_path / "s", progress=False)
    assert not (tmp_path / "s" / "checkpoint.pt").exists()


@pytest.mark.slow
@pytest.mark.parametrize("ratio", [0.5, 0.7])
def test_short_real_search_meets_budget(tmp_path, ratio: float) -> None:
    data = _subset(512)
    cfg = SearchConfig(
        flops_ratio=ratio,
        epochs=6,
        batch_size=64,
        arch_lr=0.1,
        valid_batches=2,
        seed=0,
        holdout=0,  # calibrated on all of split B (256 images here)
        tie_residual=False,  # and on per-block residual widths
        arch_weight_decay=1e-3,  # and on the paper's decay (at 0 the 0.7 search ends at 0.745)
    )
    augment = {"crop_padding": 4, "flip": True}
    result = search("cifar_resnet20", data, cfg, tmp_path / "s", progress=False, augment=augment)
    assert cfg.flops_ratio - cfg.tolerance <= result.flops_ratio <= cfg.flops_ratio
    # The budget loss itself keeps the argmax around the band (not only the projection that
    # rescues a last shape outside it). 24 architecture steps do not settle a search: its
    # argmax moves by 0.05-0.15 of the FLOPs between epochs, and the trajectory differs
    # between CPUs (float rounding), so the mean over the six epochs is asserted. Measured at
    # ratio 0.5 on an AMD EPYC, seeds 0-4 (seed 0 is this test): that mean lies 0.091 below to
    # 0.051 above the band's centre; with `budget_weight=0` (no budget loss) it drifts to
    # 0.16-0.25 below it (seeds 0-2). 0.12 separates the two.
    ratios = [row["flops_ratio"] for row in result.history]
    centre = cfg.flops_ratio - cfg.tolerance / 2
    assert abs(sum(ratios) / len(ratios) - centre) <= 0.12, ratios
    saved, meta = Shape.load(tmp_path / "s" / "shape.json")
    assert saved == result.shape
    assert meta["flops"] == result.flops and meta["model"] == "cifar_resnet20"
    pruned = create_model("cifar_resnet20", saved, num_classes=10, in_channels=1)
    assert sum(p.numel() for p in pruned.parameters()) == meta["params"]
    assert len(result.history) == cfg.epochs
    # A finished search is returned as is.
    again = search("cifar_resnet20", data, cfg, tmp_path / "s", progress=False)
    assert again.shape == result.shape


def test_width_multiple_rounds_candidates_and_the_searched_widths() -> None:
    from tasprune.config import SpaceOptions
    from tasprune.cost import model_cost
    from tasprune.search.space import width_candidates

    assert width_candidates(64, multiple=8) == [16, 24, 32, 40, 48, 56, 64]
    assert width_candidates(16, multiple=4) == [4, 8, 12, 16]
    assert width_candidates(6, multiple=8) == [6]  # never above the unpruned width
    assert width_candidates(64) == [19, 25, 32, 38, 44, 51, 57, 64]  # default unchanged
    with pytest.raises(ValueError, match="multiple"):
        width_candidates(64, multiple=0)
    net = SuperNet("cifar_resnet20", options=SpaceOptions(width_multiple=8))
    rng = random.Random(0)
    for _ in range(5):  # any one-hot setting: widths are multiples of 8, costs stay exact
        for c in net.all_choices():
            logits = net.logits_of(c)
            if logits is not None:
                with torch.no_grad():
                    logits.fill_(-30.0)
                    logits[rng.randrange(len(c.candidates))] = 30.0
        shape = net.derive()
        assert all(w % 8 == 0 for w in shape.widths.values())
        flops, _ = net.expected_cost()
        assert abs(float(flops.detach()) - model_cost("cifar_resnet20", shape)[0]) < 1.0


def test_a_folder_with_another_models_finished_search_is_refused(tmp_path) -> None:
    """Resuming must not hand back a finished search of another model as this one's."""
    out = tmp_path / "s"
    out.mkdir()
    full = get_model_spec("cifar_resnet20").full_shape()
    full.save(out / "shape.json", model="cifar_resnet20", flops=1, params=1, flops_ratio=1.0)
    full.save(out / "shape_last.json", model="cifar_resnet20")
    (out / "search_done.json").write_text('{"complete": true}\n')
    cfg = SearchConfig(epochs=1, batch_size=16)
    with pytest.raises(ConfigError, match="finished search of cifar_resnet20, not cifar_resnet56"):
        search("cifar_resnet56", _subset(100), cfg, out, progress=False)


@pytest.mark.parametrize("clip", [None, 1e-3])
def test_search_grad_clip_bounds_the_weight_gradients(clip: float | None) -> None:
    """search.grad_clip clips the weight step's gradients (as the engine's), not the logits'."""
    from tasprune.search.step import SearchStepper, make_optimizers

    torch.manual_seed(0)
    cfg = SearchConfig(flops_ratio=0.6, grad_clip=clip)
    net = SuperNet("cifar_resnet20", num_classes=10, in_channels=1, input_size=(28, 28))
    w_opt, w_sched, a_opt = make_optimizers(net, cfg, 10)
    norms: list[float] = []

    def record(opt, args, kwargs):  # type: ignore[no-untyped-def]
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    w_opt.register_step_pre_hook(record)
    stepper = SearchStepper(net, w_opt, w_sched, a_opt, cfg)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    stepper.step(x, y, x, y)
    assert len(norms) == 1
    if clip is None:
        assert norms[0] > 10 * 1e-3  # the unclipped norm is far above the clip below
    else:
        assert norms[0] <= clip * (1 + 1e-4)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.arch_parameters())


@pytest.mark.parametrize("tie", [True, False])
def test_projection_lands_in_the_band_from_any_shape(tie: bool) -> None:
    """From random argmax shapes over and under the band, the projection ends inside it."""
    rng = random.Random(0)
    net = SuperNet(
        "cifar_resnet20", in_channels=1, input_size=(28, 28), options=SpaceOptions(tie_residual=tie)
    )
    full = net.full_flops
    misses = []
    for trial in range(60):
        one_hot(net, rng)
        shape = net.derive()
        budget = Budget(rng.choice([0.3, 0.5, 0.7]), 0.02)
        low, high = budget.bounds(full)
        projected = net.project(shape, budget)
        flops = net.shape_costs(projected)["flops"]
        if not low <= flops <= high:
            misses.append((trial, budget.ratio, net.shape_costs(shape)["flops"] / full))
    assert not misses


def test_projection_climbs_into_the_band_when_every_step_up_overshoots() -> None:
    """A real tied search (fmnist-r20, seed 1) ended at 0.418 of the FLOPs, where every single
    step up overshoots the 0.50 target: the projection takes the least overshooting step and
    comes back down, into [0.45, 0.50] (it used to stop at 0.418). The fixture was written
    in tasprune 0.x's keys and translated to today's (`tasprune.models.legacy.upgrade_shape`
    for the shape, the same renaming for the logits' choice names)."""
    import json
    from pathlib import Path

    fix = json.loads((Path(__file__).parent / "data" / "project_overshoot.json").read_text())
    net = SuperNet(
        fix["model"],
        num_classes=fix["num_classes"],
        in_channels=fix["input_size"][0],
        input_size=tuple(fix["input_size"][1:]),
        options=SpaceOptions(tie_residual=True),
    )
    searched = {c.name: c for c in net.all_choices() if c.key is not None}
    assert set(fix["logits"]) == set(searched)  # the fixture is in this version's keys
    with torch.no_grad():
        for name, c in searched.items():
            net.logits_of(c).copy_(torch.tensor(fix["logits"][name]))  # type: ignore[union-attr]
    shape = Shape.from_dict(fix["shape"])
    budget = Budget(fix["flops_ratio"], fix["tolerance"])
    low, high = budget.bounds(net.full_flops)
    assert net.shape_costs(shape)["flops"] / net.full_flops == pytest.approx(0.418, abs=5e-4)
    assert net.shape_costs(shape)["flops"] < low
    for c in net.all_choices():  # the premise: no single step up lands within the target
        value = shape.widths[c.members[0]] if c.kind == "width" else shape.depths[c.members[0]]
        i = c.candidates.index(value) + 1
        if i < len(c.candidates):
            up = shape.replace(
                **(
                    {"widths": {**shape.widths, **{m: c.candidates[i] for m in c.members}}}
                    if c.kind == "width"
                    else {"depths": {**shape.depths, c.members[0]: c.candidates[i]}}
                )
            )
            flops = net.shape_costs(up)["flops"]
            assert flops > high or flops <= net.shape_costs(shape)["flops"]
    projected = net.project(shape, budget)
    assert low <= net.shape_costs(projected)["flops"] <= high


def _stepper(**settings):  # type: ignore[no-untyped-def]
    from tasprune.search.step import SearchStepper, make_optimizers

    torch.manual_seed(0)
    cfg = SearchConfig(flops_ratio=0.3, **settings)
    net = SuperNet("cifar_resnet20", num_classes=10, in_channels=1, input_size=(28, 28))
    net.generator = torch.Generator().manual_seed(0)
    w_opt, w_sched, a_opt = make_optimizers(net, cfg, 10)
    return net, SearchStepper(net, w_opt, w_sched, a_opt, cfg)


def _snapshot(net: SuperNet) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    arch = {id(p) for p in net.arch_parameters()}
    weights = [p.detach().clone() for p in net.parameters() if id(p) not in arch]
    return weights, [p.detach().clone() for p in net.arch_parameters()]


def _moved(before: list[torch.Tensor], after: list[torch.Tensor]) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_a_weight_step_alone_leaves_the_logits_and_a_joint_step_moves_both() -> None:
    """arch_every > 1: the steps without a split-B batch train the weights only. arch_step
    joint: one forward, and both the weights and the logits move, the budget loss included
    (the full-width argmax is far over a 0.3 budget)."""
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    net, stepper = _stepper(arch_every=4)
    w0, a0 = _snapshot(net)
    loss, arch_loss, bl, _ = stepper.step(x, y)
    w1, a1 = _snapshot(net)
    assert _moved(w0, w1) and not _moved(a0, a1)
    assert float(arch_loss) == 0 and float(bl) == 0 and float(loss) > 0

    net, stepper = _stepper(arch_step="joint")
    w0, a0 = _snapshot(net)
    loss, total, bl, _ = stepper.step(x, y, None, None)
    w1, a1 = _snapshot(net)
    assert _moved(w0, w1) and _moved(a0, a1)
    assert float(bl) != 0 and float(total) == pytest.approx(float(loss) + float(bl), rel=1e-5)
    assert stepper.a_opt.state_dict()["state"], "Adam stepped the logits"


def test_arch_every_pairs_a_split_b_batch_with_every_kth_weight_step() -> None:
    from tasprune.search.loop import _pairs

    pairs = list(_pairs(range(7), iter("abc"), 3))
    assert pairs == [(0, "a"), (1, None), (2, None), (3, "b"), (4, None), (5, None), (6, "c")]
    assert list(_pairs(range(3), None, 1)) == [(0, None), (1, None), (2, None)]
    assert list(_pairs(range(9), iter("ab"), 1)) == [(0, "a"), (1, "b")]  # as zip(A, B)
    with pytest.raises(ValueError, match="arch_every"):
        SearchConfig(arch_step="joint", arch_every=2)


@pytest.mark.parametrize("settings", [{"arch_step": "joint"}, {"arch_every": 2}])
def test_a_search_with_fewer_architecture_steps_ends_in_the_band(tmp_path, settings) -> None:
    """Both cheaper schedules run the whole search (history, kept shape inside the band);
    joint trains on A and B as one split, so an epoch has twice the weight steps."""
    data = _subset(128)
    cfg = SearchConfig(flops_ratio=0.5, epochs=2, batch_size=16, valid_batches=1, **settings)
    result = search("cifar_resnet20", data, cfg, tmp_path / "s", progress=False)
    assert cfg.flops_ratio - cfg.tolerance <= result.flops_ratio <= cfg.flops_ratio
    assert len(result.history) == 2
    assert all(row["arch_loss"] != 0 for row in result.history)


@pytest.mark.parametrize("arch_step", ["joint", "alternate"])
def test_warm_epochs_do_not_depend_on_the_budget_and_a_search_continues_from_them(
    tmp_path, arch_step: str
) -> None:
    """The warm epochs are weight steps alone (the logits untouched, no budget loss), so two
    budgets' searches keep the same warm checkpoint; a search that starts from the other
    budget's warm checkpoint ends exactly where its own run from scratch ends (what the
    sweep relies on), inside its band."""
    from tasprune.checkpoint import load_checkpoint
    from tasprune.search.loop import WARM_CHECKPOINT, continue_from_warm

    data = _subset(128)

    def cfg(ratio: float) -> SearchConfig:
        return SearchConfig(
            flops_ratio=ratio,
            epochs=3,
            warm_epochs=1,
            batch_size=16,
            valid_batches=1,
            arch_step=arch_step,
            deterministic=True,
        )

    runs = {
        r: search("cifar_resnet20", data, cfg(r), tmp_path / f"s{r}", progress=False)
        for r in (0.5, 0.7)
    }
    warm = {r: load_checkpoint(tmp_path / f"s{r}" / WARM_CHECKPOINT) for r in (0.5, 0.7)}
    assert warm[0.5]["epoch"] == 0
    for key, value in warm[0.5]["model"].items():
        assert torch.equal(value, warm[0.7]["model"][key]), key
    first = runs[0.5].history
    assert first[0]["warm"] and first[0]["arch_loss"] == 0 and first[0]["tau"] == 5.0
    assert not first[1]["warm"] and first[1]["arch_loss"] != 0 and first[1]["tau"] == 5.0
    # the 0.7 search again, from the 0.5 search's warm checkpoint
    assert continue_from_warm(tmp_path / "s0.5", shared := tmp_path / "shared") == 1
    again = search("cifar_resnet20", data, cfg(0.7), shared, progress=False)
    assert again.shape == runs[0.7].shape
    assert 0.65 <= again.flops_ratio <= 0.7
    assert [r["flops"] for r in again.history] == [r["flops"] for r in runs[0.7].history]
    assert again.history[0] == runs[0.5].history[0]  # the warm epoch's row, copied
