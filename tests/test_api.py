"""The library API goes through `tasprune.stages`: what each call hands the stage's training
loop (the network it starts from, its meta), with `fit`, `run_search` and `distill` spied on
so that nothing trains."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils.data import TensorDataset

import tasprune
import tasprune.stages as stages
from tasprune.models import get_model_spec
from tasprune.models.traced import register_module
from tasprune.shape import Shape
from user_nets import TinyNet

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n: int = 64, size: int = 12) -> TensorDataset:
    """A user's dataset: float images in [0, 1], the API keeps them in memory."""
    images = torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(0))
    return TensorDataset(images, torch.arange(n) % 4)


def _spy(monkeypatch: pytest.MonkeyPatch, name: str, value: Any) -> list[tuple[Any, ...]]:
    """Replace ``tasprune.stages.<name>`` by a recorder of its calls that returns ``value``."""
    calls: list[tuple[Any, ...]] = []

    def record(*args: Any, **kwargs: Any) -> Any:
        calls.append((args, kwargs))
        return value

    monkeypatch.setattr(stages, name, record)
    return calls


def test_train_starts_from_the_instance_and_stores_the_callers_meta(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = _spy(monkeypatch, "fit", {"top1": 1.0})
    torch.manual_seed(0)
    mine = TinyNet(4, 1).eval()
    data = _data()
    cfg = {"epochs": 1, "batch_size": 32}
    metrics = tasprune.train(mine, data, data, cfg, None, device="cpu", meta={"note": "mine"})
    assert metrics == {"top1": 1.0}
    ((args, kwargs),) = calls
    net, out = args[0], args[4]
    assert out is None
    x = torch.rand(2, 1, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), mine(x), rtol=0, atol=0)
    meta = kwargs["meta"]
    assert meta["note"] == "mine" and meta["role"] == "teacher" and "recipe" not in meta
    assert meta["model"] == register_module(mine, torch.zeros(1, 1, 12, 12))


def test_train_at_a_shape_is_a_student(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _spy(monkeypatch, "fit", {"top1": 1.0})
    full = get_model_spec("cifar_resnet20").full_shape()
    shape = full.replace(depths={"layer1.0": 1})
    data = _data()
    tasprune.train("cifar_resnet20", data, data, {"epochs": 1}, None, shape=shape, device="cpu")
    ((_, kwargs),) = calls
    assert kwargs["meta"]["role"] == "student"
    assert Shape.from_dict(kwargs["meta"]["shape"]) == shape


def test_search_warm_starts_from_the_instance(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _spy(monkeypatch, "run_search", "result")
    mine = TinyNet(4, 1)
    data = _data()
    assert tasprune.search(mine, data, {"epochs": 1}, None, device="cpu") == "result"
    ((args, kwargs),) = calls
    state = kwargs["teacher_state"]
    assert state.keys() == mine.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in mine.state_dict().items())
    assert args[3] is None  # no folder


def test_distill_passes_the_callers_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _spy(monkeypatch, "distill", {"top1": 1.0})
    teacher = TinyNet(4, 1)
    data = _data()
    name = register_module(teacher, torch.zeros(1, 1, 12, 12))
    shape = get_model_spec(name).full_shape()
    cfg = {"kd": True, "train": {"epochs": 1, "batch_size": 32}}
    out = tasprune.distill(
        shape, teacher, data, data, cfg, None, model=teacher, device="cpu", meta={"a": 1}
    )
    assert out == {"top1": 1.0}
    ((args, kwargs),) = calls
    assert args[0] == name and args[2] is teacher and args[6] is None
    assert kwargs["meta"] == {"a": 1} and kwargs["augment"].crop_padding is None


def test_an_unknown_keyword_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    _spy(monkeypatch, "fit", {})
    data = _data()
    with pytest.raises(TypeError, match="train\\(\\) got an unexpected keyword argument 'devcie'"):
        tasprune.train("cifar_resnet20", data, data, {"epochs": 1}, None, devcie="cpu")  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="'meta'"):  # a search writes no model.pt
        tasprune.search("cifar_resnet20", data, {"epochs": 1}, None, meta={})  # type: ignore[call-arg]
