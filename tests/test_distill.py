"""Distillation: the KD loss, a frozen teacher, and students built exactly to a Shape."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from tasprune.config import DistillConfig, TrainConfig
from tasprune.cost import model_cost
from tasprune.data import ArrayDataset, DeviceLoader
from tasprune.distill import (
    StepCounter,
    at_loss,
    attention_map,
    build_student,
    distill,
    kd_alpha,
    kd_loss,
    kd_loss_fn,
    recalibrate_bn,
    with_attention_transfer,
)
from tasprune.epoch import cross_entropy_loss
from tasprune.errors import ConfigError
from tasprune.models import create_model, get_model_spec
from tasprune.search import SearchConfig, SpaceOptions, SuperNet
from tasprune.search.traced import candidate_affine_layers
from tasprune.shape import Shape

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = "cifar_resnet20"


def _pruned_shape() -> Shape:
    full = get_model_spec(MODEL).full_shape()
    widths = {
        k: max(1, (v * 5) // 8) if i % 3 else v for i, (k, v) in enumerate(full.widths.items())
    }
    return full.replace(widths=widths, depths={"layer1.0": 2, "layer2.0": 1, "layer3.0": 3})


def _candidate_shape() -> Shape:
    """A shape whose widths are all search candidates (needed by the supernet init)."""
    full = get_model_spec(MODEL).full_shape()
    widths = {k: v // 2 for k, v in full.widths.items()}
    return full.replace(widths=widths, depths={"layer1.0": 1, "layer2.0": 3, "layer3.0": 2})


def test_kd_loss_matches_hand_computation() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(5, 4), torch.randn(5, 4)
    y = torch.tensor([0, 1, 2, 3, 0])
    a, temp = 0.7, 3.0
    ce = -sum(math.log(F.softmax(s[i], 0)[y[i]].item()) for i in range(5)) / 5
    kl = 0.0
    for i in range(5):
        p = F.softmax(t[i] / temp, 0)
        q = F.softmax(s[i] / temp, 0)
        kl += sum(p[j].item() * math.log(p[j].item() / q[j].item()) for j in range(4))
    expected = (1 - a) * ce + a * temp**2 * kl / 5
    assert kd_loss(s, t, y, a, temp).item() == pytest.approx(expected, rel=1e-5)


def test_kd_alpha_zero_is_cross_entropy() -> None:
    torch.manual_seed(1)
    s, t, y = torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,))
    assert torch.allclose(kd_loss(s, t, y, 0.0, 4.0), F.cross_entropy(s, y))
    teacher = create_model(MODEL, num_classes=10, in_channels=1)
    student = create_model(MODEL, _pruned_shape(), num_classes=10, in_channels=1)
    x = torch.randn(4, 1, 16, 16)
    y = torch.randint(0, 10, (4,))
    loss, logits = kd_loss_fn(teacher, alpha=0.0)(student, x, y)
    assert torch.allclose(loss, F.cross_entropy(logits, y))


def test_teacher_frozen_during_a_training_step() -> None:
    torch.manual_seed(2)
    teacher = create_model(MODEL, num_classes=10, in_channels=1)
    teacher.train()  # the loss function must switch it to eval
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = create_model(MODEL, _pruned_shape(), num_classes=10, in_channels=1)
    loss_fn = kd_loss_fn(teacher, 0.9, 4.0)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,))
    student.train()
    teacher.train()  # even if someone flips it back, the step runs it in eval
    loss, _ = loss_fn(student, x, y)
    loss.backward()
    opt.step()
    assert not teacher.training
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running stats too
    assert any(p.grad is not None for p in student.parameters())


@pytest.mark.parametrize("init", ["scratch", "teacher", "supernet"])
def test_student_has_exact_cost_model_size(init: str) -> None:
    shape = _candidate_shape() if init == "supernet" else _pruned_shape()
    teacher = create_model(MODEL, num_classes=10, in_channels=1)
    space = SearchConfig().space()
    sup = SuperNet(MODEL, num_classes=10, in_channels=1, input_size=(28, 28), options=space)
    student = build_student(
        MODEL,
        shape,
        10,
        1,
        init,  # type: ignore[arg-type]
        supernet_state=sup.state_dict(),
        teacher_state=teacher.state_dict(),
        space=space,
    )
    _, params = model_cost(MODEL, shape, (1, 28, 28), 10)
    assert sum(p.numel() for p in student.parameters()) == params
    flops, _ = model_cost(MODEL, shape, (1, 28, 28), 10)
    from torch.utils.flop_counter import FlopCounterMode

    student.eval()
    with FlopCounterMode(display=False) as counter:
        student(torch.randn(1, 1, 28, 28))
    # torch counts 2 FLOPs per multiply-accumulate; the cost model counts MACs (convs + fc).
    assert counter.get_total_flops() // 2 == flops


def test_teacher_init_of_full_shape_reproduces_teacher() -> None:
    torch.manual_seed(3)
    teacher = create_model(MODEL, num_classes=10, in_channels=1)
    # Non-trivial BN statistics, so a wrong copy would show.
    teacher.train()
    with torch.no_grad():
        teacher(torch.randn(16, 1, 28, 28))
    teacher.eval()
    full = get_model_spec(MODEL).full_shape()
    student = build_student(MODEL, full, 10, 1, "teacher", teacher_state=teacher.state_dict())
    student.eval()
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(student(x), teacher(x))


def test_teacher_init_takes_the_leading_channels_of_the_kept_blocks() -> None:
    """A student from the teacher holds, for every tensor the teacher has under its name, the
    leading slice of it (leading channels of every group, the first blocks of every stage);
    the rest are the 1x1 convs the teacher lacks. No tensor is left fresh."""
    torch.manual_seed(12)
    teacher = create_model(MODEL, num_classes=10, in_channels=1)
    with torch.no_grad():
        for m in teacher.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.weight.normal_()
    state = teacher.state_dict()
    shape = _pruned_shape()
    student = build_student(MODEL, shape, 10, 1, "teacher", teacher_state=state)
    own = student.state_dict()
    spec = get_model_spec(MODEL)
    assert spec.transfer(state, shape, 10, 1).keys() == own.keys()  # every tensor is copied
    assert "layer1.2.conv1.conv.weight" not in own  # a dropped block (layer1 keeps 2)
    conv1 = "layer2.0.conv1.conv.weight"
    assert own[conv1].shape[0] < state[conv1].shape[0]  # a pruned width
    lacking = []
    for key, value in own.items():
        if key not in state:
            lacking.append(key)
            continue
        lead = state[key][tuple(slice(0, n) for n in value.shape)]
        assert torch.equal(value, lead), key
    assert lacking and all(k.endswith(".shortcut.weight") for k in lacking)


def test_distill_trains_and_writes_student_meta(tmp_path: object) -> None:
    from pathlib import Path

    torch.manual_seed(4)
    n = 64
    data = ArrayDataset(
        images=torch.randint(0, 256, (n, 1, 12, 12), dtype=torch.uint8),
        labels=torch.arange(n) % 4,
        num_classes=4,
        mean=(0.5,),
        std=(0.25,),
        name="noise",
    )
    teacher = create_model(MODEL, num_classes=4, in_channels=1)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    cfg = DistillConfig(init="teacher", train=TrainConfig(epochs=1, batch_size=32))
    out = Path(str(tmp_path)) / "student"
    metrics = distill(MODEL, _pruned_shape(), teacher, data, data, cfg, out, device="cpu")
    assert metrics["flops"] == model_cost(MODEL, _pruned_shape(), (1, 12, 12), 4)[0]
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    from tasprune.checkpoint import load_checkpoint

    meta = load_checkpoint(out / "model.pt")["meta"]
    assert meta["role"] == "student" and meta["input_size"] == [1, 12, 12]
    assert Shape.from_dict(meta["shape"]) == _pruned_shape()


def test_kd_alpha_ramps_linearly_then_holds() -> None:
    assert kd_alpha(0.9, 0, 0) == 0.9  # no ramp
    assert kd_alpha(0.9, 0, 10) == pytest.approx(0.09)
    assert kd_alpha(0.9, 4, 10) == pytest.approx(0.45)
    assert kd_alpha(0.9, 9, 10) == pytest.approx(0.9)
    assert kd_alpha(0.9, 500, 10) == pytest.approx(0.9)
    assert DistillConfig(train=TrainConfig(epochs=1)).alpha_ramp_epochs == 3.0  # measured best
    with pytest.raises(ValidationError):
        DistillConfig(alpha_ramp_epochs=-1, train=TrainConfig(epochs=1))


class _ListLoader:
    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.batches = batches
        self.epochs: list[int] = []

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.batches)

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": 7}


def test_step_counter_follows_set_epoch_across_a_resume() -> None:
    batches = [(torch.zeros(1), torch.zeros(1)) for _ in range(3)]
    inner = _ListLoader(batches)
    counter = StepCounter(inner)
    assert len(counter) == 3 and counter.state_dict() == {"epoch": 7}  # delegated
    assert [counter.step for _ in counter] == [0, 1, 2]
    assert [counter.step for _ in counter] == [3, 4, 5]  # no set_epoch: the next epoch
    counter = StepCounter(inner)  # a resumed fit starts at epoch 2
    counter.set_epoch(2)
    assert inner.epochs[-1] == 2  # forwarded to the wrapped loader
    assert [counter.step for _ in counter] == [6, 7, 8]


def test_kd_loss_fn_uses_the_ramped_alpha() -> None:
    torch.manual_seed(5)
    teacher = create_model(MODEL, num_classes=10, in_channels=1)
    student = create_model(MODEL, _pruned_shape(), num_classes=10, in_channels=1)
    student.eval()
    teacher.eval()
    x, y = torch.randn(4, 1, 16, 16), torch.randint(0, 10, (4,))
    step = [0]
    fn = kd_loss_fn(teacher, 0.8, 2.0, ramp_steps=4, step_of=lambda: step[0])
    with torch.no_grad():
        s, t = student(x), teacher(x)
    for k, a in [(0, 0.2), (1, 0.4), (3, 0.8), (10, 0.8)]:
        step[0] = k
        loss, _ = fn(student, x, y)
        assert loss.item() == pytest.approx(kd_loss(s, t, y, a, 2.0).item(), rel=1e-5)
    with pytest.raises(ConfigError):
        kd_loss_fn(teacher, 0.8, 2.0, ramp_steps=4)  # a ramp needs the step


def _noise_data(n: int = 64, size: int = 12) -> ArrayDataset:
    return ArrayDataset(
        images=torch.randint(0, 256, (n, 1, size, size), dtype=torch.uint8),
        labels=torch.arange(n) % 4,
        num_classes=4,
        mean=(0.5,),
        std=(0.25,),
        name="noise",
    )


def test_distill_ramps_alpha_per_step(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    import tasprune.distill as distill_mod

    torch.manual_seed(6)
    data = _noise_data()
    teacher = create_model(MODEL, num_classes=4, in_channels=1)
    seen: list[float] = []
    real = distill_mod.kd_loss

    def spy(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, a: float, temp: float):  # type: ignore[no-untyped-def]
        seen.append(a)
        return real(s, t, y, a, temp)

    monkeypatch.setattr(distill_mod, "kd_loss", spy)
    train = TrainConfig(epochs=2, batch_size=32)  # 2 steps per epoch
    cfg = DistillConfig(alpha=0.9, alpha_ramp_epochs=1.5, train=train)  # ramp over 3 steps
    out = Path(str(tmp_path)) / "student"
    distill(MODEL, _pruned_shape(), teacher, data, data, cfg, out, device="cpu", progress=False)
    assert seen == pytest.approx([0.3, 0.6, 0.9, 0.9])


def test_distill_starts_from_the_given_student_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    import tasprune.distill as distill_mod

    torch.manual_seed(10)
    shape = _pruned_shape()
    own = create_model(MODEL, shape, num_classes=4, in_channels=1).state_dict()
    seen: dict[str, torch.Tensor] = {}

    def spy(student: torch.nn.Module, *args: object, **kwargs: object) -> dict[str, float]:
        seen.update({k: v.clone() for k, v in student.state_dict().items()})
        return {"top1": 0.0}

    monkeypatch.setattr(distill_mod, "fit", spy)
    data = _noise_data()
    cfg = DistillConfig(kd=False, init="scratch", train=TrainConfig(epochs=1, batch_size=32))
    distill(MODEL, shape, None, data, data, cfg, None, init_state=own, device="cpu")
    assert seen.keys() == own.keys()
    assert all(torch.equal(seen[k], v) for k, v in own.items())


def test_recalibrate_bn_averages_batch_statistics() -> None:
    torch.manual_seed(7)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3))
    model.eval()
    bn = model[1]
    bn.running_mean.fill_(5.0)  # stale statistics that must go
    batches = [(torch.randn(8, 1, 6, 6) * (i + 1), torch.zeros(8)) for i in range(3)]
    used = recalibrate_bn(model, batches, batches=2)
    assert used == 2
    with torch.no_grad():
        acts = [model[0](x) for x, _ in batches[:2]]
    mean = torch.stack([a.mean(dim=(0, 2, 3)) for a in acts]).mean(0)
    var = torch.stack([a.transpose(0, 1).reshape(3, -1).var(dim=1) for a in acts]).mean(0)
    assert torch.allclose(bn.running_mean, mean, atol=1e-5)
    assert torch.allclose(bn.running_var, var, rtol=1e-4)
    assert bn.momentum == 0.1 and not model.training  # restored
    assert recalibrate_bn(model, batches, batches=0) == 0


def test_recalibrated_supernet_student_has_its_own_statistics(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tasprune.distill as distill_mod

    torch.manual_seed(8)
    data = _noise_data(size=16)
    shape = _candidate_shape()
    space = SearchConfig().space()
    sup = SuperNet(MODEL, num_classes=4, in_channels=1, input_size=(16, 16), options=space)
    state = sup.state_dict()
    student = build_student(MODEL, shape, 4, 1, "supernet", supernet_state=state, space=space)
    loader = DeviceLoader(data, 32, train=False, device="cpu")  # 2 equal batches, no augmentation
    assert recalibrate_bn(student, loader, batches=10) == len(loader)
    first = next(m for m in student.modules() if isinstance(m, torch.nn.BatchNorm2d))
    inputs: list[torch.Tensor] = []
    handle = first.register_forward_hook(lambda m, i, o: inputs.append(i[0].detach()))
    assert student.training  # the mode it was built in is restored
    student.eval()  # (a train-mode pass would move the running statistics again)
    with torch.no_grad():
        for x, _ in loader:
            student(x)
    handle.remove()
    # Equal batches: the average of the batch means is the data set's mean of the BN's input.
    assert torch.allclose(first.running_mean, torch.cat(inputs).mean(dim=(0, 2, 3)), atol=1e-5)
    calls: list[int] = []
    real = distill_mod.recalibrate_bn

    def spy(model, loader, batches, device="cpu"):  # type: ignore[no-untyped-def]
        calls.append(real(model, loader, batches, device))
        return calls[-1]

    monkeypatch.setattr(distill_mod, "recalibrate_bn", spy)
    train = TrainConfig(epochs=1, batch_size=32)
    cfg = DistillConfig(kd=False, init="supernet", recalibrate_bn=1, train=train)
    out = Path(str(tmp_path)) / "student"
    distill(
        MODEL,
        shape,
        None,
        data,
        data,
        cfg,
        out,
        supernet_state=state,
        space=space,
        device="cpu",
        progress=False,
    )
    assert calls == [1]


def test_attention_transfer_ignores_channel_counts() -> None:
    torch.manual_seed(9)
    s = torch.randn(2, 3, 5, 5)
    q = attention_map(s)
    assert q.shape == (2, 25) and torch.allclose(q.norm(dim=1), torch.ones(2))
    # A teacher map holding the student's channels twice has the same attention.
    assert at_loss([s], [torch.cat([s, s], dim=1)]).item() == pytest.approx(0.0, abs=1e-7)
    assert at_loss([s], [torch.randn(2, 8, 5, 5)]).item() > 0
    with pytest.raises(ConfigError):
        at_loss([s], [])


def test_attention_transfer_adds_the_weighted_stage_term() -> None:
    torch.manual_seed(10)
    teacher = create_model(MODEL, num_classes=10, in_channels=1)
    student = create_model(MODEL, _pruned_shape(), num_classes=10, in_channels=1)
    teacher.eval()
    student.eval()
    x, y = torch.randn(4, 1, 16, 16), torch.randint(0, 10, (4,))
    fn = with_attention_transfer(cross_entropy_loss(), student, teacher, weight=10.0)
    loss, logits = fn(student, x, y)
    feats: dict[str, list[torch.Tensor]] = {"s": [], "t": []}
    handles = [
        getattr(net, name).register_forward_hook(
            lambda m, i, o, key=key: feats[key].append(o.detach())
        )
        for key, net in (("s", student), ("t", teacher))
        for name in ("layer1", "layer2", "layer3")
    ]
    with torch.no_grad():
        student(x), teacher(x)
    for h in handles:
        h.remove()
    expected = F.cross_entropy(logits, y) + 5.0 * at_loss(feats["s"], feats["t"])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_distill_with_kd_and_attention_transfer(tmp_path: object) -> None:
    torch.manual_seed(11)
    data = _noise_data()
    teacher = create_model(MODEL, num_classes=4, in_channels=1)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    cfg = DistillConfig(feature_loss="at", train=TrainConfig(epochs=1, batch_size=32))
    out = Path(str(tmp_path)) / "student"
    metrics = distill(
        MODEL, _pruned_shape(), teacher, data, data, cfg, out, device="cpu", progress=False
    )
    assert metrics["epochs"] == 1 and math.isfinite(metrics["train_loss"])
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def test_attention_transfer_hooks_come_off() -> None:
    teacher = create_model(MODEL, num_classes=10, in_channels=1)
    student = create_model(MODEL, _pruned_shape(), num_classes=10, in_channels=1)
    fn = with_attention_transfer(cross_entropy_loss(), student, teacher, weight=1.0)
    assert all(len(net.layer1._forward_hooks) == 1 for net in (student, teacher))
    fn.remove()
    assert all(len(net.layer1._forward_hooks) == 0 for net in (student, teacher))


def test_supernet_init_of_a_non_candidate_shape_takes_the_next_wider_bn() -> None:
    """A same-budget baseline's widths need not be candidates: every tensor is still copied,
    a candidate-affine BN's affine from the narrowest candidate at least as wide."""
    space = SpaceOptions(candidate_affine=True)
    sup = SuperNet(MODEL, num_classes=10, in_channels=1, input_size=(28, 28), options=space)
    key, bn_name = "layer3.0.conv1.conv", "layer3.0.conv1.bn"
    bn = candidate_affine_layers(sup.net)[bn_name]
    cands = sup.width_of[key].candidates
    width = next(c - 1 for c in cands[1:] if c - 1 not in cands)  # between two candidates
    expected = min((j for j, c in enumerate(cands) if c >= width), key=lambda j: cands[j])
    assert cands[expected] > width and expected > 0  # not the narrowest nor the same width
    with torch.no_grad():
        for i in range(len(bn.cand_weight)):
            bn.cand_weight[i].fill_(float(i))
            bn.cand_bias[i].fill_(-float(i))
    shape = _candidate_shape()
    shape = shape.replace(widths={**shape.widths, key: width})
    state = sup.plain_state_dict(shape)
    student = create_model(MODEL, shape, num_classes=10, in_channels=1)
    assert state[f"{bn_name}.weight"].shape == (width,)
    assert torch.all(state[f"{bn_name}.weight"] == float(expected))
    assert torch.all(state[f"{bn_name}.bias"] == -float(expected))
    assert not any(".cand_" in k for k in state)
    assert student.load_state_dict(state, strict=False).missing_keys == []
    # The distill path does the same from the saved supernet weights.
    built = build_student(
        MODEL, shape, 10, 1, "supernet", supernet_state=sup.state_dict(), space=space
    )
    assert torch.all(built.get_submodule(bn_name).weight == float(expected))


def test_a_shortcut_the_teacher_lacks_starts_as_the_identity() -> None:
    """A stride-1 block whose pruned widths differ gets a bare 1x1 conv shortcut the teacher
    does not have: it starts as eye on the leading channels (the residual stream passes on)."""
    torch.manual_seed(0)
    teacher = create_model(MODEL, num_classes=10, in_channels=1)
    full = get_model_spec(MODEL).full_shape()
    # layer1.1 reads 16 channels and writes 8; so layer1.2 reads 8 and writes 16
    shape = full.replace(widths={**full.widths, "layer1.1.conv2.conv": 8})
    state = teacher.state_dict()
    student = build_student(MODEL, shape, 10, 1, "teacher", teacher_state=state)
    shortcuts = {n: m for n, m in student.named_modules() if n.endswith("shortcut")}
    new = [n for n, m in shortcuts.items() if not isinstance(m, nn.Identity)]
    new = [n for n in new if not any(k.startswith(f"{n}.") for k in state)]
    assert new == ["layer1.1.shortcut", "layer1.2.shortcut"]
    assert isinstance(shortcuts["layer1.0.shortcut"], nn.Identity)  # equal widths: identity
    for name, (c_in, c_out) in zip(new, [(16, 8), (8, 16)], strict=True):
        conv = shortcuts[name]
        assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.bias is None
        assert (conv.in_channels, conv.out_channels) == (c_in, c_out)
        x = torch.randn(2, c_in, 7, 7)
        expected = torch.zeros(2, c_out, 7, 7)
        n = min(c_in, c_out)
        expected[:, :n] = x[:, :n]
        with torch.no_grad():
            assert torch.equal(conv(x), expected)
