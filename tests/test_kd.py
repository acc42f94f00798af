"""tasprune.Distiller: a KD loss term for any task in the user's loop: zero when the student is
the teacher, gradients reach the student and the adapters but never the teacher, outputs named
anywhere in a dict/list structure, feature adapters where a pruned student is narrower."""

from __future__ import annotations

import copy

import pytest
import torch

import tasprune
from tasprune.errors import ConfigError
from tasprune.models.traced import register_module, traced
from user_nets import TwoHeads

pytestmark = pytest.mark.usefixtures("fast_cpu")


def _pruned(teacher: TwoHeads, x: torch.Tensor) -> torch.nn.Module:
    tr = traced(register_module(teacher, x))
    widths = {n: max(g.multiple, g.full // 2) for n, g in tr.searchable_groups().items()}
    return tasprune.prune(teacher, tr.full_shape().replace(widths=widths), example_inputs=x)


def test_the_teacher_itself_distils_to_zero() -> None:
    torch.manual_seed(0)
    teacher = TwoHeads().eval()
    student = copy.deepcopy(teacher).train()
    x = torch.randn(4, 1, 32, 32)
    kd = tasprune.Distiller(
        teacher,
        student,
        outputs={"boxes": "mse", "scores.0": "soft"},
        features=["neck"],
        example_inputs=x,
    )
    assert len(list(kd.parameters())) == 0  # equal widths: no adapter
    student.eval()
    loss = kd(x, student(x))
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-4)  # KL of equal softmaxes, x T^2


def test_a_pruned_student_learns_through_adapters_and_the_teacher_does_not() -> None:
    torch.manual_seed(0)
    teacher = TwoHeads()
    x = torch.randn(4, 1, 32, 32)
    student = _pruned(teacher, x).train()
    kd = tasprune.Distiller(
        teacher,
        student,
        outputs={"boxes": "l1", "scores.0": "soft"},
        features=["trunk", "neck"],
        example_inputs=x,
        weights={"trunk": 0.5},
    )
    adapters = list(kd.parameters())
    assert len(adapters) == 2  # the student's trunk and neck are narrower
    loss = kd(x, student(x))
    loss.backward()
    assert float(loss.detach()) > 0
    assert all(p.grad is not None for p in adapters)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert teacher.training  # its mode is restored
    assert not any("teacher" in k for k in kd.state_dict())


def test_bad_paths_and_kinds_are_one_clear_error() -> None:
    teacher = TwoHeads()
    x = torch.randn(2, 1, 32, 32)
    with pytest.raises(ConfigError, match="unknown KD kinds"):
        tasprune.Distiller(teacher, teacher, outputs={"boxes": "kl"})
    with pytest.raises(ConfigError, match="example_inputs"):
        tasprune.Distiller(teacher, teacher, features=["neck"])
    with pytest.raises(ConfigError, match="not a module of both"):
        tasprune.Distiller(teacher, teacher, features=["nek"], example_inputs=x)
    kd = tasprune.Distiller(teacher, teacher, outputs={"score": "mse"})
    with pytest.raises(ConfigError, match="no key 'score'"):
        kd(x, teacher(x))


@pytest.mark.parametrize("class_dim", [1, -1])
def test_soft_terms_average_the_kl_over_every_position_but_the_classes(class_dim: int) -> None:
    """soft = T^2 x KL over the class dimension, averaged over the batch and every other
    position (a segmentation map's pixels on dim 1, a detector's anchors with class_dim -1);
    a head's scores named as a soft feature get the same term."""
    torch.manual_seed(0)
    teacher = TwoHeads().eval()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, 1, 32, 32)
    kd = tasprune.Distiller(
        teacher, student, outputs={"boxes": "soft"}, temperature=2.0, class_dim=class_dim
    )
    s, t = student(x)["boxes"], teacher(x)["boxes"]
    p_t = torch.softmax(t / 2, class_dim)
    kl = p_t * (torch.log_softmax(t / 2, class_dim) - torch.log_softmax(s / 2, class_dim))
    want = kl.sum(class_dim).mean() * 4
    got = kd(x, student(x)).detach()
    assert float(got) == pytest.approx(float(want), rel=1e-4) and float(got) > 0
    by_feature = tasprune.Distiller(
        teacher,
        student,
        features={"box": "soft"},
        temperature=2.0,
        class_dim=class_dim,
        example_inputs=x,
    )
    assert len(list(by_feature.parameters())) == 0  # soft features get no adapter
    assert float(by_feature(x, student(x))) == pytest.approx(float(want), rel=1e-4)
    assert student.box._forward_hooks and teacher.box._forward_hooks
    by_feature.remove()  # training done: no hooks of ours left on either network
    assert not student.box._forward_hooks and not teacher.box._forward_hooks
