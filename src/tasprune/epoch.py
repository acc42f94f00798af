"""One epoch (torchvision-references style): the loop every trainer's steps run through,
``train_one_epoch`` and ``evaluate``, and the loss and device settings of a step.

:func:`run_epoch` runs any :class:`EpochTask` (the supervised step of `tasprune.engine.fit`,
or the search's weight + architecture step) over a loader: progress bar, device-side sums, a
NaN/Inf stop naming the exact step, host reads every N steps.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Sized
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tasprune import distributed as ddp
from tasprune.errors import ConfigError, DataError, TrainingError

__all__ = [
    "EpochTask",
    "LossFn",
    "autocast",
    "cross_entropy_loss",
    "evaluate",
    "loader_len",
    "progress_enabled",
    "resolve_channels_last",
    "run_epoch",
    "train_one_epoch",
]


LossFn = Callable[[nn.Module, Tensor, Tensor], tuple[Tensor, Tensor]]
"""``loss_fn(model, x, y) -> (scalar loss, logits)``."""


def cross_entropy_loss(label_smoothing: float = 0.0) -> LossFn:
    """Default ``loss_fn``: cross-entropy on ``model(x)``, optionally label-smoothed."""

    def loss_fn(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        logits = model(x)
        return F.cross_entropy(logits, y, label_smoothing=label_smoothing), logits

    return loss_fn


def resolve_channels_last(setting: str, device: torch.device, model: nn.Module) -> bool:
    """Decide the memory format: ``on``/``off`` as given; ``auto`` = on for conv nets.

    On CUDA NHWC uses tensor-core friendly kernels. On CPU oneDNN convolutions are NHWC
    natively; bench/bench_train.py measures the bare training loop of CIFAR ResNets on this
    machine's CPU (see bench/results/train_throughput.json) and ``auto`` follows it.
    """
    if setting == "on":
        return True
    if setting == "off":
        return False
    if setting != "auto":
        raise ConfigError(f"channels_last must be auto, on or off, not {setting!r}")
    if device.type == "cuda":
        return True
    if device.type == "cpu":
        return any(isinstance(m, nn.Conv2d) for m in model.modules())
    return False


def progress_enabled(progress: bool) -> bool:
    """Show a bar only if asked, not vetoed by ``TASPRUNE_NO_PROGRESS=1``, on a terminal, and
    (under DDP) on rank 0 only."""
    if not progress or os.environ.get("TASPRUNE_NO_PROGRESS", "") not in ("", "0"):
        return False
    if not ddp.is_main():
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA when ``amp``; a no-op elsewhere (CPU autocast is slower here)."""
    if amp and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _to_device(
    x: Tensor, y: Tensor, device: torch.device, channels_last: bool
) -> tuple[Tensor, Tensor]:
    non_blocking = device.type == "cuda"
    if channels_last and x.dim() == 4:
        x = x.to(device, non_blocking=non_blocking, memory_format=torch.channels_last)
    else:
        x = x.to(device, non_blocking=non_blocking)
    return x, y.to(device, non_blocking=non_blocking)


def loader_len(loader: Iterable[Any], what: str) -> int:
    """Batches per epoch of ``loader``; a loader without ``len()`` or batches is a DataError."""
    if not isinstance(loader, Sized):
        raise DataError(f"the {what} loader has no len(). Fix: pass a sized loader")
    n = len(loader)
    if n < 1:
        raise DataError(
            f"the {what} loader has no batches. Fix: check the data folder and --batch-size"
        )
    return n


class EpochTask(Protocol):
    """What :func:`run_epoch` trains: the supervised step of :func:`fit`, or the search's
    weight + architecture step (`tasprune.search.step`). One loop for both: progress bar,
    device-side sums, NaN/Inf stop naming the exact step, no per-step host read."""

    def step(self, batch: Any, step: int) -> Tensor:
        """Train on one batch; return a 1-D tensor of per-step sums (on the device), every
        entry finite while training is healthy."""
        ...

    def postfix(self, sums: Tensor, steps: int, seconds: float) -> dict[str, str]:
        """The progress bar's figures from the running sums (read every 10 steps, bar only)."""
        ...

    def diverged(self, value: float, epoch: int, step: int) -> TrainingError:
        """The error for a non-finite sum first seen at ``step`` (0-based) of ``epoch``."""
        ...


def run_epoch(
    task: EpochTask,
    batches: Iterable[Any],
    steps: int,
    device: torch.device,
    epoch: int,
    *,
    desc: str,
    progress: bool = True,
    check_every: int | None = None,
) -> tuple[Tensor, float]:
    """One pass of ``task`` over ``steps`` of ``batches``: (the summed step tensors, seconds).

    Sums stay on the device. The health check reads the host every ``check_every`` steps
    (default: every step on the CPU, where a read is free; 25 on accelerators) and at the end;
    between reads a device-side "first bad step" marker keeps the step named in the error exact.
    """
    if check_every is None:
        check_every = 1 if device.type == "cpu" else 25
    check_every = max(1, check_every)
    sums: Tensor | None = None
    first_bad = torch.full((), -1, dtype=torch.int64, device=device)
    show = progress_enabled(progress)
    bar: Any = None
    iterator: Iterable[Any] = batches
    if show:
        from tqdm import tqdm

        bar = tqdm(
            batches,
            total=steps,
            desc=desc,
            unit="batch",
            leave=False,
            dynamic_ncols=True,
            mininterval=0.5,
        )
        iterator = bar

    def check() -> None:
        assert sums is not None
        bad = int(first_bad.item())
        if bad >= 0:
            values = [v for v in sums.tolist() if not math.isfinite(v)]
            raise task.diverged(values[0] if values else math.nan, epoch, bad)

    start = time.perf_counter()
    step = -1
    for step, batch in enumerate(iterator):
        values = task.step(batch, step).detach().to(torch.float64)
        sums = values.clone() if sums is None else sums.add_(values)
        if check_every == 1:
            if not bool(torch.isfinite(values).all()):
                value = next(v for v in values.tolist() if not math.isfinite(v))
                raise task.diverged(value, epoch, step)
        else:
            bad = ~torch.isfinite(values).all()
            first_bad = torch.where(bad & (first_bad < 0), step, first_bad)
            if (step + 1) % check_every == 0:
                check()
        if bar is not None and step % 10 == 0:
            bar.set_postfix(
                task.postfix(sums, step + 1, time.perf_counter() - start), refresh=False
            )
    if sums is None:
        raise DataError("the training loader yielded no batches. Fix: check the data")
    if check_every > 1:
        check()
    if bar is not None:
        bar.close()
    return sums, time.perf_counter() - start


class _SupervisedTask:
    """The step of :func:`fit`: forward under autocast, backward, clip, optimiser, scheduler."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None,
        device: torch.device,
        *,
        amp: bool,
        channels_last: bool,
        grad_clip: float | None,
    ) -> None:
        self.model, self.loss_fn, self.device = model, loss_fn, device
        self.optimizer, self.scheduler = optimizer, scheduler
        self.amp, self.channels_last, self.grad_clip = amp, channels_last, grad_clip
        self.params = [p for g in optimizer.param_groups for p in g["params"]]

    def step(self, batch: tuple[Tensor, Tensor], step: int) -> Tensor:
        x, y = _to_device(batch[0], batch[1], self.device, self.channels_last)
        with autocast(self.device, self.amp):
            loss, logits = self.loss_fn(self.model, x, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        with torch.no_grad():
            n = y.shape[0]
            correct = (logits.detach().argmax(dim=1) == y).sum()
            seen = correct.new_tensor(n).double()
            return torch.stack([loss.detach().double() * n, correct.double(), seen])

    def postfix(self, sums: Tensor, steps: int, seconds: float) -> dict[str, str]:
        loss, _, seen = sums.tolist()
        return {"loss": f"{loss / seen:.3f}", "img_s": f"{seen / max(seconds, 1e-9):.0f}"}

    def diverged(self, value: float, epoch: int, step: int) -> TrainingError:
        return TrainingError(
            f"loss became {value} at epoch {epoch} step {step}; the last good checkpoint is "
            "kept. Fix: lower the lr or set grad_clip, then rerun (under `run`: add "
            "--from-stage STAGE)"
        )


def train_one_epoch(
    model: nn.Module,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    loader: Iterable[tuple[Tensor, Tensor]],
    device: torch.device,
    epoch: int,
    *,
    amp: bool = True,
    channels_last: bool = False,
    grad_clip: float | None = None,
    progress: bool = True,
    check_every: int | None = None,
    distributed: bool = False,
) -> dict[str, float]:
    """One pass over ``loader``; returns ``loss`` (mean), ``top1`` (%), ``img_per_s``, ``seconds``.

    With ``distributed`` (every rank calls it, ``model`` DDP-wrapped, ``loader`` this rank's
    shard) the returned loss, top-1 and throughput cover all ranks' samples.

    The scheduler steps once per batch. See :func:`run_epoch` for the health checks; raises
    :class:`TrainingError` naming epoch and step when the loss becomes NaN/Inf.
    """
    n_batches = loader_len(loader, "training")
    model.train()
    if channels_last:
        model.to(memory_format=torch.channels_last)  # no-op when already NHWC
    task = _SupervisedTask(
        model,
        loss_fn,
        optimizer,
        scheduler,
        device,
        amp=amp,
        channels_last=channels_last,
        grad_clip=grad_clip,
    )
    sums, seconds = run_epoch(
        task,
        loader,
        n_batches,
        device,
        epoch,
        desc=f"epoch {epoch}",
        progress=progress,
        check_every=check_every,
    )
    if distributed:
        ddp.all_reduce_sum(sums)
    loss_sum, correct, seen = sums.tolist()
    return {
        "loss": loss_sum / seen,
        "top1": 100.0 * correct / seen,
        "img_per_s": seen / max(seconds, 1e-9),
        "seconds": seconds,
    }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor]],
    device: torch.device,
    *,
    channels_last: bool = False,
    amp: bool = False,
    distributed: bool = False,
) -> dict[str, float]:
    """Top-1 / top-k accuracy (percent, k = min(5, classes)) and mean cross-entropy.

    The model is put in eval mode and returned to the mode it had. With ``distributed`` every
    rank must call it; counts are summed over ranks, so all get the same numbers (whether the
    loader is sharded or every rank sees all of it).
    """
    loader_len(loader, "evaluation")
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    top1 = torch.zeros((), dtype=torch.int64, device=device)
    top5 = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    try:
        for xb, yb in loader:
            x, y = _to_device(xb, yb, device, channels_last)
            with autocast(device, amp):
                logits = model(x)
            logits = logits.float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
            k = min(5, logits.shape[1])
            topk = logits.topk(k, dim=1).indices
            hits = topk == y.unsqueeze(1)
            top1 += hits[:, 0].sum()
            top5 += hits.any(dim=1).sum()
            seen += y.shape[0]
    finally:
        model.train(was_training)
    if distributed:
        totals = torch.stack(
            [top1.double(), top5.double(), loss_sum, loss_sum.new_tensor(float(seen))]
        )
        ddp.all_reduce_sum(totals)
        top1, top5, loss_sum, seen = totals[0], totals[1], totals[2], int(totals[3].item())
    if seen == 0:
        raise DataError("the evaluation loader yielded no batches. Fix: check the data")
    return {
        "top1": 100.0 * top1.item() / seen,
        "top5": 100.0 * top5.item() / seen,
        "loss": loss_sum.item() / seen,
    }
