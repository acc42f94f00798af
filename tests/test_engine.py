"""Engine: optimiser/schedule, epochs, metrics, NaN handling and bit-identical resume."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from tasprune.checkpoint import load_checkpoint
from tasprune.config import TrainConfig
from tasprune.engine import fit
from tasprune.epoch import cross_entropy_loss, evaluate, train_one_epoch
from tasprune.errors import TrainingError
from tasprune.optim import build_optimizer, build_scheduler

CPU = torch.device("cpu")


def tiny_net(num_classes: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, num_classes),
    )


def toy_data(n: int = 64, num_classes: int = 4, seed: int = 1) -> TensorDataset:
    """Learnable random data: each class shifts one input channel pattern."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (n,), generator=g)
    x = torch.randn(n, 3, 8, 8, generator=g)
    x += (y.float() - num_classes / 2).view(-1, 1, 1, 1) * 0.8
    return TensorDataset(x, y)


class EpochLoader:
    """A minimal sized loader with ``set_epoch`` that records the epochs it was given."""

    def __init__(self, data: TensorDataset, batch_size: int) -> None:
        self.x, self.y = data.tensors
        self.batch_size = batch_size
        self.epochs: list[int] = []
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(len(self.y) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        order = torch.randperm(len(self.y), generator=torch.Generator().manual_seed(self.epoch))
        for i in range(0, len(order), self.batch_size):
            idx = order[i : i + self.batch_size]
            yield self.x[idx], self.y[idx]


def loaders() -> tuple[DataLoader[tuple[Tensor, ...]], DataLoader[tuple[Tensor, ...]]]:
    train = DataLoader(toy_data(64), batch_size=16, shuffle=True)  # shuffle uses the torch RNG
    test = DataLoader(toy_data(32, seed=2), batch_size=16)
    return train, test


def cfg(**kw: object) -> TrainConfig:
    base: dict[str, object] = {
        "epochs": 3,
        "lr": 0.05,
        "warmup_epochs": 1,
        "deterministic": True,
        "channels_last": "off",
    }
    base.update(kw)
    return TrainConfig.model_validate(base)


def test_config_validation() -> None:
    with pytest.raises(ValidationError):
        TrainConfig(epochs=0)
    with pytest.raises(ValidationError):
        TrainConfig.model_validate({"epochs": 1, "lrr": 0.1})  # typo: extra="forbid"
    with pytest.raises(ValidationError):
        TrainConfig(epochs=1, label_smoothing=1.0)
    with pytest.raises(ValidationError):
        TrainConfig(epochs=1, channels_last="yes")  # type: ignore[arg-type]


def test_optimizer_no_decay_on_bn_and_bias() -> None:
    model = tiny_net()
    opt = build_optimizer(model, cfg(weight_decay=1e-3))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 1e-3 and all(p.ndim > 1 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.ndim <= 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert opt.defaults["nesterov"] is True


def test_adamw_keeps_the_same_decay_groups() -> None:
    """optimizer: adamw (for transformers): decoupled decay on the weights only."""
    model = tiny_net()
    opt = build_optimizer(model, cfg(weight_decay=0.05, lr=1e-3, optimizer="adamw"))
    assert isinstance(opt, torch.optim.AdamW)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.05 and all(p.ndim > 1 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.ndim <= 1 for p in no_decay["params"])


def test_scheduler_warmup_then_cosine() -> None:
    c = cfg(epochs=4, warmup_epochs=1, lr=0.1)
    opt = build_optimizer(tiny_net(), c)
    sched = build_scheduler(opt, c, steps_per_epoch=10)
    lrs = []
    for _ in range(40):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(0.01)  # warm-up: 1/10 of the peak at step 0
    assert lrs[4] == pytest.approx(0.05)
    assert lrs[9] == pytest.approx(0.1)  # peak at the end of warm-up
    assert lrs[10] == pytest.approx(0.1)  # cosine starts at the peak
    assert lrs[25] == pytest.approx(0.05)  # half way through the cosine
    assert lrs[40] == pytest.approx(0.0, abs=1e-12)  # and ends at zero
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))


def test_loss_decreases() -> None:
    model = tiny_net()
    train, _ = loaders()
    c = cfg(epochs=6, lr=0.1)
    opt = build_optimizer(model, c)
    sched = build_scheduler(opt, c, len(train))
    loss_fn = cross_entropy_loss()
    losses = []
    for epoch in range(c.epochs):
        stats = train_one_epoch(
            model, loss_fn, opt, sched, train, CPU, epoch, amp=False, progress=False
        )
        losses.append(stats["loss"])
        assert stats["img_per_s"] > 0 and stats["seconds"] > 0 and 0 <= stats["top1"] <= 100
    assert losses[-1] < 0.7 * losses[0], losses


def test_evaluate_hand_made_example() -> None:
    logits = torch.tensor(
        [
            [5.0, 4, 3, 2, 1, 0],  # label 0: top-1 hit
            [0.0, 5, 4, 3, 2, 1],  # label 2: top-5 hit only
            [0.0, 1, 2, 3, 4, 5],  # label 0: rank 6, miss
            [1.0, 0, 0, 0, 0, 9],  # label 5: top-1 hit
        ]
    )
    labels = torch.tensor([0, 2, 0, 5])
    loader = DataLoader(TensorDataset(logits, labels), batch_size=3)
    out = evaluate(nn.Identity(), loader, CPU)
    assert out["top1"] == pytest.approx(50.0)
    assert out["top5"] == pytest.approx(75.0)
    assert out["loss"] == pytest.approx(nn.functional.cross_entropy(logits, labels).item())
    # Fewer than five classes: top-k uses k = classes, so it is 100%.
    three = DataLoader(TensorDataset(logits[:, :3], torch.tensor([0, 2, 0, 1])), batch_size=4)
    assert evaluate(nn.Identity(), three, CPU)["top5"] == pytest.approx(100.0)


def test_evaluate_restores_train_mode() -> None:
    model = tiny_net()
    model.train()
    _, test = loaders()
    evaluate(model, test, CPU)
    assert model.training


def test_nan_loss_raises_with_epoch_and_step(tmp_path: Path) -> None:
    calls = {"n": 0}
    base = cross_entropy_loss()

    def flaky(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        loss, logits = base(model, x, y)
        calls["n"] += 1
        if calls["n"] == 7:  # 4 steps per epoch -> epoch 1, step 2
            loss = loss * float("nan")
        return loss, logits

    train, test = loaders()
    with pytest.raises(TrainingError, match=r"nan at epoch 1 step 2.*Fix: lower the lr"):
        fit(tiny_net(), train, test, cfg(), tmp_path, loss_fn=flaky, device=CPU, progress=False)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 0  # last good one kept
    assert not (tmp_path / "final.json").exists()


@pytest.mark.parametrize("check_every", [1, 3])
def test_nan_step_is_exact_with_deferred_checks(check_every: int) -> None:
    """The accelerator path (device-side marker, checked every few steps) names the same step."""
    calls = {"n": 0}
    base = cross_entropy_loss()

    def flaky(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        loss, logits = base(model, x, y)
        calls["n"] += 1
        return (loss * float("inf") if calls["n"] == 2 else loss), logits

    model = tiny_net()
    train = DataLoader(toy_data(64), batch_size=8)
    opt = build_optimizer(model, cfg())
    with pytest.raises(TrainingError, match=r"loss became (inf|nan) at epoch 4 step 1;"):
        train_one_epoch(
            model, flaky, opt, None, train, CPU, 4, progress=False, check_every=check_every
        )


class Interrupt(Exception):
    pass


def _state(path: Path) -> dict[str, Tensor]:
    return load_checkpoint(path)["model"]


def test_resume_is_bit_identical(tmp_path: Path) -> None:
    c = cfg(epochs=3)
    meta = {"model": "tiny", "note": [1, 2]}
    train, test = loaders()
    full = fit(tiny_net(), train, test, c, tmp_path / "a", device=CPU, meta=meta, progress=False)

    def crash_after_epoch_1(epoch: int, row: dict[str, object]) -> None:
        if epoch == 1:
            raise Interrupt

    out_b = tmp_path / "b"
    train, test = loaders()
    with pytest.raises(Interrupt):
        fit(
            tiny_net(),
            train,
            test,
            c,
            out_b,
            device=CPU,
            meta=meta,
            progress=False,
            on_epoch_end=crash_after_epoch_1,
        )
    assert load_checkpoint(out_b / "checkpoint.pt")["epoch"] == 1
    # A crash between "log row" and "save checkpoint" of epoch 2 leaves a stale row behind.
    with open(out_b / "history.jsonl", "a") as fh:
        fh.write(json.dumps({"epoch": 2, "train_loss": 123.0}) + "\n")

    torch.manual_seed(1234)  # the resumed process starts with a different RNG state
    train, test = loaders()
    resumed = fit(tiny_net(), train, test, c, out_b, device=CPU, meta=meta, progress=False)

    a, b = _state(tmp_path / "a" / "model.pt"), _state(out_b / "model.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed == full
    rows_a = [json.loads(line) for line in (tmp_path / "a" / "history.jsonl").open()]
    rows_b = [json.loads(line) for line in (out_b / "history.jsonl").open()]
    assert [r["epoch"] for r in rows_b] == [0, 1, 2]
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert ra["train_loss"] == rb["train_loss"] and ra["test_top1"] == rb["test_top1"]
    assert load_checkpoint(out_b / "model.pt")["meta"] == meta
    final = json.loads((out_b / "final.json").read_text())
    assert final["epochs"] == 3 and final["metrics"] == full


def test_finished_run_is_not_trained_again(tmp_path: Path) -> None:
    train, test = loaders()
    first = fit(tiny_net(), train, test, cfg(epochs=1), tmp_path, device=CPU, progress=False)

    def boom(*args: object, **kwargs: object) -> tuple[Tensor, Tensor]:
        raise AssertionError("must not train")

    model = tiny_net()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    again = fit(model, train, test, cfg(epochs=1), tmp_path, device=CPU, loss_fn=boom)
    assert again == first
    stored = _state(tmp_path / "model.pt")
    assert all(torch.equal(v, stored[k]) for k, v in model.state_dict().items())


def test_set_epoch_eval_every_and_no_files(tmp_path: Path) -> None:
    train = EpochLoader(toy_data(48), batch_size=16)
    test = EpochLoader(toy_data(16, seed=3), batch_size=16)
    rows: list[dict[str, object]] = []
    out = fit(
        tiny_net(),
        train,
        test,
        cfg(epochs=3, eval_every=2, channels_last="on"),
        None,
        device=CPU,
        progress=False,
        on_epoch_end=lambda e, r: rows.append(r),
    )
    assert train.epochs == [0, 1, 2]
    assert [r["test_top1"] is None for r in rows] == [True, False, False]
    assert set(out) >= {"top1", "top5", "loss", "train_loss", "train_top1", "epochs"}
    assert list(tmp_path.iterdir()) == []
