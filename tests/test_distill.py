"""Distillation: the KD loss, a frozen teacher, and students built exactly to a Shape."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tasprune.config import DistillConfig, TrainConfig
from tasprune.cost import model_cost
from tasprune.data import ArrayDataset
from tasprune.distill import build_student, distill, kd_loss, kd_loss_fn, leading_slice_state
from tasprune.models import create_model, get_model_spec
from tasprune.search import SearchConfig, SuperNet
from tasprune.shape import Shape

MODEL = "cifar_resnet20"


def _pruned_shape() -> Shape:
    full = get_model_spec(MODEL).full_shape()
    widths = {
        k: max(1, (v * 5) // 8) if i % 3 else v for i, (k, v) in enumerate(full.widths.items())
    }
    return full.replace(widths=widths, depths={"layer1": 2, "layer2": 1, "layer3": 3})


def _candidate_shape() -> Shape:
    """A shape whose widths are all search candidates (needed by the supernet init)."""
    full = get_model_spec(MODEL).full_shape()
    widths = {k: v // 2 for k, v in full.widths.items()}
    return full.replace(widths=widths, depths={"layer1": 1, "layer2": 3, "layer3": 2})


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


def test_leading_slice_skips_what_the_source_lacks() -> None:
    src = {"a": torch.arange(12.0).view(3, 4), "b": torch.ones(3)}
    tgt = {"a": torch.zeros(2, 3), "b": torch.zeros(2, 2), "c": torch.zeros(1)}
    out, skipped = leading_slice_state(src, tgt)
    assert torch.equal(out["a"], torch.tensor([[0.0, 1, 2], [4, 5, 6]]))
    assert sorted(skipped) == ["b", "c"]


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
