"""The optimiser and the learning-rate schedule of every training loop (fit and the search's
weight step): SGD or AdamW without weight decay on norms and biases, linear warm-up then cosine to 0,
stepped once per iteration."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from tasprune.config import TrainConfig
from tasprune.errors import ConfigError, DataError

__all__ = ["build_optimizer", "build_scheduler", "lr_factor", "weight_optimizer"]


def weight_optimizer(
    groups: list[dict[str, Any]], kind: str, lr: float, momentum: float, nesterov: bool
) -> torch.optim.Optimizer:
    """SGD with (Nesterov) momentum, or AdamW (decoupled weight decay, the usual choice for
    transformers), over parameter groups that carry their own weight decay."""
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)


def build_optimizer(
    model: nn.Module, cfg: TrainConfig, params: Iterable[nn.Parameter] | None = None
) -> torch.optim.Optimizer:
    """SGD with (Nesterov) momentum or AdamW (``cfg.optimizer``); weight decay only on
    weights with ndim > 1.

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
    return weight_optimizer(groups, cfg.optimizer, cfg.lr, cfg.momentum, cfg.nesterov)


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
