"""Training engine (torchvision-references style): optimiser, schedule, epochs, resumable fit.

``fit`` trains any model on any iterable of ``(x, y)`` batches that has ``__len__`` (and
optionally ``set_epoch(e)`` / ``state_dict()`` / ``load_state_dict()``). The loss is a
callable ``loss_fn(model, x, y) -> (loss, logits)`` so knowledge distillation or the TAS
search objective plug in without touching the loop.

Epoch numbers are 0-based everywhere (history rows, checkpoints, log lines, errors).

Under ``torchrun`` (see :mod:`tasprune.distributed`) ``fit`` wraps the model in DDP, expects
loaders sharded by rank, all-reduces its metrics and writes files on rank 0 only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Sized
from pathlib import Path
from typing import Any, Protocol, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from tasprune import distributed as ddp
from tasprune.checkpoint import checkpoint_exists, load_checkpoint, save_checkpoint
from tasprune.config import TrainConfig
from tasprune.errors import CheckpointError, ConfigError, DataError, TrainingError
from tasprune.utils import (
    JsonlLogger,
    atomic_write_text,
    pick_device,
    rng_state,
    seed_everything,
    set_rng_state,
)

logger = logging.getLogger(__name__)

__all__ = [
    "EpochTask",
    "LossFn",
    "autocast",
    "build_optimizer",
    "build_scheduler",
    "cross_entropy_loss",
    "evaluate",
    "fit",
    "lr_factor",
    "progress_enabled",
    "resolve_channels_last",
    "resume",
    "run_epoch",
    "save_epoch",
    "train_one_epoch",
]

LossFn = Callable[[nn.Module, Tensor, Tensor], tuple[Tensor, Tensor]]
"""``loss_fn(model, x, y) -> (scalar loss, logits)``."""


# --------------------------------------------------------------------------- building blocks


def build_optimizer(
    model: nn.Module, cfg: TrainConfig, params: Iterable[nn.Parameter] | None = None
) -> torch.optim.SGD:
    """SGD with (Nesterov) momentum; weight decay only on weights with ndim > 1.

    BatchNorm affine parameters and biases (ndim <= 1) get no decay: decaying them only
    shrinks scales/offsets and costs accuracy. ``params`` restricts training to a subset
    (e.g. network weights but not architecture parameters); default: every trainable one.
    """
    chosen = list(model.parameters() if params is None else params)
    seen: set[int] = set()
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in chosen:
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.ndim > 1 else no_decay).append(p)
    if not decay and not no_decay:
        raise ConfigError("the optimiser got no trainable parameters. Fix: unfreeze some layers")
    groups: list[dict[str, Any]] = []
    if decay:
        groups.append({"params": decay, "weight_decay": cfg.weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    nesterov = cfg.nesterov and cfg.momentum > 0
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=nesterov)


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """LR multiplier at optimiser step ``step`` (0-based): linear warm-up, then cosine to 0.

    Warm-up ramps ``1/w, 2/w, ..., 1`` over the first ``w`` steps; the cosine then runs from 1
    at step ``w`` to 0 at step ``total_steps``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int
) -> LambdaLR:
    """Per-iteration schedule (call ``.step()`` after every optimiser step).

    The lambda is a plain function (not an object), so ``state_dict()`` holds only plain
    values and checkpoints stay weights-only loadable.
    """
    if steps_per_epoch < 1:
        raise DataError("the training loader has no batches. Fix: check the data and batch size")
    total = cfg.epochs * steps_per_epoch
    warmup = min(cfg.warmup_epochs * steps_per_epoch, total)

    def factor(step: int) -> float:
        return lr_factor(step, total, warmup)

    return LambdaLR(optimizer, lr_lambda=factor)


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


def _loader_len(loader: Iterable[Any], what: str) -> int:
    if not isinstance(loader, Sized):
        raise DataError(f"the {what} loader has no len(). Fix: pass a sized loader")
    n = len(loader)
    if n < 1:
        raise DataError(
            f"the {what} loader has no batches. Fix: check the data folder and --batch-size"
        )
    return n


# --------------------------------------------------------------------------- epochs


class EpochTask(Protocol):
    """What :func:`run_epoch` trains: the supervised step of :func:`fit`, or the search's
    weight + architecture step (`tasprune.search.loop`). One loop for both: progress bar,
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
    n_batches = _loader_len(loader, "training")
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
    _loader_len(loader, "evaluation")
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


# --------------------------------------------------------------------------- fit


def resume(
    ckpt_path: Path | None,
    restore: Callable[[dict[str, Any]], None],
    history: JsonlLogger | None,
    *,
    map_location: torch.device | str = "cpu",
) -> tuple[int, dict[str, Any] | None]:
    """(the first epoch to run, the checkpoint's payload or None) of a resumable loop.

    ``restore(payload)`` loads the payload into the loop's objects (model, optimisers, ...);
    the RNG state saved by :func:`save_epoch` is restored after it. The history keeps the rows
    the checkpoint covers (none on a start from scratch). A checkpoint that does not fit is a
    :class:`CheckpointError` naming the fix.
    """
    if ckpt_path is None or not checkpoint_exists(ckpt_path):
        if history is not None:
            history.truncate_after(-1)  # a start from scratch: no stale rows
        return 0, None
    payload = load_checkpoint(ckpt_path, map_location=map_location)
    try:
        restore(payload)
        last = int(payload["epoch"])
    except (KeyError, RuntimeError, ValueError, TypeError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(
            f"checkpoint {ckpt_path} does not fit this model/optimiser ({first}). "
            "Fix: delete it to restart the stage, or use the --out of a matching run"
        ) from err
    set_rng_state(payload["rng"])
    if history is not None:
        history.truncate_after(last)
    return last + 1, payload


def save_epoch(ckpt_path: Path, epoch: int, state: dict[str, Any]) -> None:
    """The resumable checkpoint after ``epoch``: ``state`` plus the epoch and the RNG state."""
    save_checkpoint(ckpt_path, {**state, "epoch": epoch, "rng": rng_state()})


def _check_json(meta: dict[str, Any]) -> dict[str, Any]:
    try:
        return dict(json.loads(json.dumps(meta)))
    except (TypeError, ValueError) as err:
        raise ConfigError(
            f"meta must be a plain JSON-able dict ({err}). Fix: pass names/numbers/lists only"
        ) from err


def _cpu_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Contiguous CPU copy of the weights, for the portable ``model.pt``."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def _final_metrics(
    train_stats: dict[str, float] | None, test_stats: dict[str, float] | None, epochs: int
) -> dict[str, Any]:
    metrics: dict[str, Any] = {"epochs": epochs}
    if test_stats is not None:
        metrics.update({k: test_stats[k] for k in ("top1", "top5", "loss")})
    if train_stats is not None:
        metrics["train_loss"] = train_stats["loss"]
        metrics["train_top1"] = train_stats["top1"]
    return metrics


def _load_final(out_dir: Path, cfg: TrainConfig) -> dict[str, Any] | None:
    """Stored metrics if ``final.json`` says this stage already ran to ``cfg.epochs``."""
    path = out_dir / "final.json"
    if not path.exists():
        return None
    try:
        final = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        logger.warning("%s is unreadable (%s); finishing the stage again", path, err)
        return None
    if not isinstance(final, dict) or final.get("epochs") != cfg.epochs:
        return None
    metrics = final.get("metrics")
    return metrics if isinstance(metrics, dict) else None


def fit(
    model: nn.Module,
    train_loader: Iterable[tuple[Tensor, Tensor]],
    test_loader: Iterable[tuple[Tensor, Tensor]],
    cfg: TrainConfig,
    out_dir: Path | None,
    *,
    loss_fn: LossFn | None = None,
    device: torch.device | None = None,
    meta: dict[str, Any] | None = None,
    progress: bool = True,
    params: Iterable[nn.Parameter] | None = None,
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
    distributed: bool | None = None,
    sync_bn: bool = False,
    tensorboard: bool = False,
) -> dict[str, Any]:
    """Train ``model`` for ``cfg.epochs``, resumably; return the final metrics.

    With ``out_dir``: resumes from ``out_dir/checkpoint.pt`` (model, optimiser, scheduler,
    RNG, loader state) at the epoch after the last completed one; after each epoch appends a
    row to ``history.jsonl`` and then saves the checkpoint (that order means a crash never
    leaves a row the checkpoint does not cover — resume truncates such rows). At the end writes
    ``model.pt`` ({"model", "meta"}) and then ``final.json``; if ``final.json`` already records
    a complete run, the stored weights are loaded into ``model`` and its metrics returned
    without training. ``out_dir=None`` writes nothing.

    History rows: ``epoch``, ``lr`` (at the epoch's first step), ``train_loss``,
    ``train_top1``, ``test_top1``/``test_top5``/``test_loss`` (None on epochs not evaluated),
    ``img_per_s``, ``seconds``; with ``tensorboard`` also as scalars in ``out_dir/tensorboard``.

    ``params`` limits what the optimiser updates; ``on_epoch_end(epoch, row)`` runs after each
    epoch's checkpoint is saved (e.g. for annealing, or tests simulating a crash).
    Returned metrics: ``top1``, ``top5``, ``loss`` (test), ``train_loss``, ``train_top1``,
    ``epochs``.

    ``distributed`` (default: whether a process group is initialised) trains with DDP: every
    rank calls ``fit`` with the same arguments, ``device`` being its own GPU, and loaders
    sharded by rank (the same number of batches on every rank) whose batch is the per-rank batch
    (``distributed.per_rank_batch(cfg.batch_size, world_size)``: ``cfg.batch_size`` is global).
    Metrics are all-reduced, so every rank returns the same; rank 0 alone writes the files
    (checkpoint tensors are the plain module's, without DDP's ``module.`` prefix) and the
    other ranks wait for it at a barrier before returning. On resume every rank reads the
    checkpoint. ``sync_bn`` converts BatchNorm to SyncBatchNorm while training (CUDA only;
    ``model`` gets its plain BatchNorm layers back at the end).
    """
    device = device if device is not None else pick_device("auto")
    use_ddp = ddp.is_distributed() if distributed is None else distributed
    if use_ddp and not ddp.is_distributed():
        raise ConfigError(
            "distributed training asked for but no process group exists. Fix: launch with "
            "torchrun and call tasprune.distributed.init_from_env() first"
        )
    if use_ddp:
        ddp.check_sharded(train_loader, "training")
        ddp.check_sharded(test_loader, "evaluation", allow_unsharded=True)
    main = ddp.is_main() if use_ddp else True
    meta = _check_json(meta or {})
    loss_fn = loss_fn if loss_fn is not None else cross_entropy_loss(cfg.label_smoothing)
    steps_per_epoch = _loader_len(train_loader, "training")
    seed_everything(cfg.seed, cfg.deterministic)

    model.to(device)
    channels_last = resolve_channels_last(cfg.channels_last, device, model)
    if channels_last:
        model.to(memory_format=torch.channels_last)

    ckpt_path = out_dir / "checkpoint.pt" if out_dir is not None else None
    # Only rank 0 writes; every rank reads (finished runs, checkpoints).
    history = (
        JsonlLogger(out_dir / "history.jsonl", tensorboard=tensorboard)
        if out_dir is not None and main
        else None
    )
    if out_dir is not None:
        done = _load_final(out_dir, cfg)
        if done is not None and (out_dir / "model.pt").exists():
            stored = load_checkpoint(out_dir / "model.pt")
            model.load_state_dict(stored["model"])
            if main:
                logger.info("%s already finished (final.json); not training again", out_dir)
            return done

    optimizer = build_optimizer(model, cfg, params)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch)
    cfg_dump = cfg.model_dump(mode="json")

    train_stats: dict[str, float] | None = None
    test_stats: dict[str, float] | None = None

    def restore(payload: dict[str, Any]) -> None:
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])

    start_epoch, payload = resume(ckpt_path, restore, history)
    if payload is not None:
        loader_state = payload.get("loader")
        if loader_state is not None and hasattr(train_loader, "load_state_dict"):
            train_loader.load_state_dict(loader_state)
        saved_cfg = payload.get("train_config") or {}
        changed = sorted(k for k in cfg_dump if k in saved_cfg and saved_cfg[k] != cfg_dump[k])
        if changed and main:
            logger.warning(
                "resuming %s with changed settings (%s); the run will not match an "
                "uninterrupted one",
                ckpt_path,
                ", ".join(changed),
            )
        train_stats = payload.get("train_stats")
        test_stats = payload.get("test_stats")
        if main:
            logger.info(
                "resuming from %s: epoch %d of %d done", ckpt_path, start_epoch - 1, cfg.epochs
            )

    # Wrapped after loading, so DDP's initial broadcast from rank 0 sees the resumed weights.
    net = ddp.wrap_ddp(model, device, sync_bn=sync_bn) if use_ddp else model
    if cfg.compile:
        # Compiles the training forward only; `model` (same parameters) is what gets saved.
        net = cast(nn.Module, torch.compile(net))
    try:
        metrics = _fit_epochs(
            model,
            net,
            loss_fn,
            optimizer,
            scheduler,
            train_loader,
            test_loader,
            cfg,
            out_dir,
            device=device,
            channels_last=channels_last,
            progress=progress,
            start_epoch=start_epoch,
            train_stats=train_stats,
            test_stats=test_stats,
            history=history,
            ckpt_path=ckpt_path,
            meta=meta,
            on_epoch_end=on_epoch_end,
            use_ddp=use_ddp,
        )
    finally:
        if use_ddp and sync_bn:
            ddp.revert_sync_batchnorm(model)
    return metrics


def _fit_epochs(
    model: nn.Module,
    net: nn.Module,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    scheduler: LambdaLR,
    train_loader: Iterable[tuple[Tensor, Tensor]],
    test_loader: Iterable[tuple[Tensor, Tensor]],
    cfg: TrainConfig,
    out_dir: Path | None,
    *,
    device: torch.device,
    channels_last: bool,
    progress: bool,
    start_epoch: int,
    train_stats: dict[str, float] | None,
    test_stats: dict[str, float] | None,
    history: JsonlLogger | None,
    ckpt_path: Path | None,
    meta: dict[str, Any],
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None,
    use_ddp: bool,
) -> dict[str, Any]:
    """The epoch loop of :func:`fit`: ``net`` trains (DDP wrapper or ``model``), ``model`` is
    evaluated and saved."""
    main = ddp.is_main() if use_ddp else True
    cfg_dump = cfg.model_dump(mode="json")
    run_start = time.perf_counter()

    def evaluate_test() -> dict[str, float]:
        return evaluate(
            model,
            test_loader,
            device,
            channels_last=channels_last,
            amp=cfg.amp,
            distributed=use_ddp,
        )

    for epoch in range(start_epoch, cfg.epochs):
        set_epoch = getattr(train_loader, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
        lr = float(optimizer.param_groups[0]["lr"])
        train_stats = train_one_epoch(
            net,
            loss_fn,
            optimizer,
            scheduler,
            train_loader,
            device,
            epoch,
            amp=cfg.amp,
            channels_last=channels_last,
            grad_clip=cfg.grad_clip,
            progress=progress,
            distributed=use_ddp,
        )
        if use_ddp:
            # Each rank updated its BN running statistics on its own shard: evaluate and save
            # rank 0's, so every rank holds exactly the model that is written.
            ddp.sync_buffers(model)
        evaluated = (epoch + 1) % cfg.eval_every == 0 or epoch == cfg.epochs - 1
        if evaluated:
            test_stats = evaluate_test()
        row: dict[str, Any] = {
            "epoch": epoch,
            "lr": lr,
            "train_loss": train_stats["loss"],
            "train_top1": train_stats["top1"],
            "test_top1": test_stats["top1"] if evaluated and test_stats else None,
            "test_top5": test_stats["top5"] if evaluated and test_stats else None,
            "test_loss": test_stats["loss"] if evaluated and test_stats else None,
            "img_per_s": train_stats["img_per_s"],
            "seconds": train_stats["seconds"],
        }
        if main:
            logger.info(
                "epoch %d/%d lr %.4g | train loss %.4f top1 %.2f%% | test %s | %.0f img/s %.1fs",
                epoch,
                cfg.epochs,
                lr,
                train_stats["loss"],
                train_stats["top1"],
                f"top1 {row['test_top1']:.2f}% top5 {row['test_top5']:.2f}%" if evaluated else "-",
                train_stats["img_per_s"],
                train_stats["seconds"],
            )
        if history is not None:
            history.log(row)
        if ckpt_path is not None and main:
            payload = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "meta": meta,
                "train_config": cfg_dump,
                "train_stats": dict(train_stats),
                "test_stats": dict(test_stats) if test_stats is not None else None,
            }
            state_dict_fn = getattr(train_loader, "state_dict", None)
            if callable(state_dict_fn):
                payload["loader"] = state_dict_fn()
            save_epoch(ckpt_path, epoch, payload)
        if on_epoch_end is not None:
            on_epoch_end(epoch, row)

    if test_stats is None:  # e.g. resumed with nothing left to do and no stored metrics
        test_stats = evaluate_test()
    metrics = _final_metrics(train_stats, test_stats, cfg.epochs)
    if out_dir is not None and main:
        save_checkpoint(out_dir / "model.pt", {"model": _cpu_state_dict(model), "meta": meta})
        final = {
            "metrics": metrics,
            "epochs": cfg.epochs,
            "seconds_this_session": time.perf_counter() - run_start,
            "train_config": cfg_dump,
            "meta": meta,
        }
        atomic_write_text(out_dir / "final.json", json.dumps(final, indent=2) + "\n")
    if use_ddp:
        ddp.barrier()  # the other ranks return only once rank 0's files exist
    if main:
        logger.info(
            "finished %d epochs: test top1 %.2f%% top5 %.2f%%",
            cfg.epochs,
            metrics["top1"],
            metrics["top5"],
        )
    return metrics
