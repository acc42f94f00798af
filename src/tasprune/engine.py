"""Training engine (torchvision-references style): the resumable ``fit`` and the checkpoint
discipline (``resume``/``save_epoch``) every training loop shares.

``fit`` trains any model on any iterable of ``(x, y)`` batches that has ``__len__`` (and
optionally ``set_epoch(e)`` / ``state_dict()`` / ``load_state_dict()``). The loss is a
callable ``loss_fn(model, x, y) -> (loss, logits)`` so knowledge distillation or the TAS
search objective plug in without touching the loop. One epoch is `tasprune.epoch`'s
``train_one_epoch`` + ``evaluate``; the optimiser and schedule are `tasprune.optim`'s.

Epoch numbers are 0-based everywhere (history rows, checkpoints, log lines, errors).

Under ``torchrun`` (see :mod:`tasprune.distributed`) ``fit`` wraps the model in DDP, expects
loaders sharded by rank, all-reduces its metrics and writes files on rank 0 only.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from tasprune import distributed as ddp
from tasprune.checkpoint import checkpoint_exists, load_checkpoint, save_checkpoint
from tasprune.config import TrainConfig
from tasprune.epoch import (
    LossFn,
    cross_entropy_loss,
    evaluate,
    loader_len,
    resolve_channels_last,
    train_one_epoch,
)
from tasprune.errors import CheckpointError, ConfigError
from tasprune.optim import build_optimizer, build_scheduler
from tasprune.utils import (
    JsonlLogger,
    atomic_write_text,
    pick_device,
    rng_state,
    seed_everything,
    set_rng_state,
)
from tasprune.weights import load_weights, portable_state

logger = logging.getLogger(__name__)

__all__ = ["fit", "resume", "save_epoch"]


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
    steps_per_epoch = loader_len(train_loader, "training")
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
            load_weights(model, stored["model"])
            if main:
                logger.info("%s already finished (final.json); not training again", out_dir)
            return done

    optimizer = build_optimizer(model, cfg, params)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch)
    cfg_dump = cfg.model_dump(mode="json")

    train_stats: dict[str, float] | None = None
    test_stats: dict[str, float] | None = None

    def restore(payload: dict[str, Any]) -> None:
        load_weights(model, payload["model"])
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
        save_checkpoint(out_dir / "model.pt", {"model": portable_state(model), "meta": meta})
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
