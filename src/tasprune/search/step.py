"""One TAS search iteration: a weight step on split A, then an architecture step on split B
(``arch_step: alternate``, every ``arch_every``-th weight step), or one joint step of both.

`SearchStepper` is the step (with its optimisers: SGD + cosine schedule for the weights, Adam
for the architecture logits); `SearchTask` hands it to the engine's `run_epoch`. Under DDP the
weight step runs through DDP (the logits left out of its reducer) and the architecture step on
the plain module, its gradients averaged over ranks here, so the logits stay identical on every
rank.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tasprune import distributed as ddp
from tasprune.budget import Budget
from tasprune.config import SearchConfig
from tasprune.epoch import autocast
from tasprune.errors import TrainingError
from tasprune.optim import lr_factor, weight_optimizer
from tasprune.search.supernet import SuperNet
from tasprune.shape import Shape

__all__ = [
    "SearchStepper",
    "SearchTask",
    "arch_update",
    "budget_loss",
    "make_optimizers",
    "supernet_module",
    "wrap_search_ddp",
]


def _weight_optimizer(net: SuperNet, cfg: SearchConfig) -> torch.optim.Optimizer:
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in net.net.named_parameters():
        per_candidate_bn = name.endswith(("cand_weight", "cand_bias"))
        (decay if p.ndim > 1 and not per_candidate_bn else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return weight_optimizer(groups, cfg.optimizer, cfg.lr, cfg.momentum, cfg.nesterov)


def make_optimizers(
    net: SuperNet, cfg: SearchConfig, steps_per_epoch: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR, torch.optim.Adam]:
    """SGD or AdamW + per-step cosine schedule for the weights, Adam for the logits."""
    w_opt = _weight_optimizer(net, cfg)
    total, warm = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch
    w_sched = torch.optim.lr_scheduler.LambdaLR(w_opt, lambda s: lr_factor(s, total, warm))
    a_opt = torch.optim.Adam(
        net.arch_parameters(),
        lr=cfg.arch_lr,
        betas=cfg.arch_betas,
        weight_decay=cfg.arch_weight_decay,
    )
    return w_opt, w_sched, a_opt


class SearchStepper:
    """One search iteration: a weight step on split A, then an architecture step on split B.

    Under DDP pass ``weight_model`` (the SuperNet wrapped by :func:`wrap_search_ddp`) and
    ``distributed=True``: the weight step then runs through DDP, which averages the weight
    gradients; the architecture step runs on the plain ``net`` and its gradients are averaged
    over ranks here before Adam, so the logits stay identical on every rank.
    """

    def __init__(
        self,
        net: SuperNet,
        w_opt: torch.optim.Optimizer,
        w_sched: torch.optim.lr_scheduler.LRScheduler | None,
        a_opt: torch.optim.Optimizer,
        cfg: SearchConfig,
        *,
        weight_model: nn.Module | None = None,
        distributed: bool = False,
    ) -> None:
        self.net, self.w_opt, self.w_sched, self.a_opt, self.cfg = net, w_opt, w_sched, a_opt, cfg
        self.weight_model = weight_model if weight_model is not None else net
        self.distributed = distributed
        self.arch = net.arch_parameters()
        self.weights = [p for g in w_opt.param_groups for p in g["params"]]  # for grad_clip
        self.budgets = cfg.budgets()
        self.primary = self.budgets[0].metric
        self._cost_cache: dict[str, dict[str, float]] = {}
        # The warm epochs (cfg.warm_epochs): weight steps alone, whatever arch_step says (the
        # loop hands them no split-B batch).
        self.warm = False

    def exact(self, shape: Shape) -> dict[str, float]:
        """Exact cost of a shape per metric, memoised (the argmax rarely changes per step)."""
        key = shape.to_json()
        if key not in self._cost_cache:
            self._cost_cache[key] = self.net.shape_costs(shape)
        return self._cost_cache[key]

    def current(self, device: torch.device) -> dict[str, Tensor] | dict[str, float]:
        """The argmax shape's cost per metric: on an accelerator computed on the device
        (`SuperNet.argmax_costs`), so a step never waits for the host; on the CPU, where a
        host read is free, the memoised exact cost of ``derive()`` (cheaper there)."""
        return self.exact(self.net.derive()) if device.type == "cpu" else self.net.argmax_costs()

    def step(
        self, xa: Tensor, ya: Tensor, xb: Tensor | None = None, yb: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | float]:
        """Returns (weight loss, architecture loss, budget loss, the argmax shape's cost in the
        primary budget's metric).

        ``arch_step: alternate``: a weight step on (xa, ya), then an architecture step on
        (xb, yb) unless they are None (the steps between two architecture steps of
        ``arch_every``). ``joint``: one step on (xa, ya) updates both; xb is not used."""
        if self.cfg.arch_step == "joint" and not self.warm:
            return self._joint(xa, ya)
        net, cfg = self.net, self.cfg
        # Weight step on split A: the sampled widths carry no gradient to the logits here.
        for p in self.arch:
            p.requires_grad_(False)
        with autocast(xa.device, cfg.amp):
            logits = self.weight_model(xa)
        loss = F.cross_entropy(logits.float(), ya)
        self.w_opt.zero_grad(set_to_none=True)
        loss.backward()
        self._weight_update()
        for p in self.arch:
            p.requires_grad_(True)
        if xb is None or yb is None:  # between architecture steps, or a warm epoch
            zero = loss.detach().new_zeros(())
            return loss.detach(), zero, zero, self.current(xa.device)[self.primary]
        # Architecture step on split B: gradients for the logits only, none for the weights.
        with autocast(xb.device, cfg.amp):
            logits = net(xb)
        ce = F.cross_entropy(logits.float(), yb)
        current = self.current(xb.device)
        arch_loss, bl = arch_update(
            net,
            self.arch,
            self.a_opt,
            ce,
            self.budgets,
            cfg.budget_weight,
            current,
            distributed=self.distributed,
        )
        return loss.detach(), arch_loss.detach(), bl.detach(), current[self.primary]

    def _weight_update(self) -> None:
        if self.cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.weights, self.cfg.grad_clip)
        self.w_opt.step()
        if self.w_sched is not None:
            self.w_sched.step()

    def _joint(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor | float]:
        """One forward of the sampled sub-network on (x, y); one backward gives the weights'
        and the logits' gradients of task loss + budget loss (the budget loss depends on the
        logits only); SGD steps the weights, Adam the logits."""
        net, cfg = self.net, self.cfg
        with autocast(x.device, cfg.amp):
            logits = self.weight_model(x)
        ce = F.cross_entropy(logits.float(), y)
        current = self.current(x.device)
        bl = budget_loss(net, self.budgets, cfg.budget_weight, current)
        total = ce + bl.to(torch.float32)
        self.w_opt.zero_grad(set_to_none=True)
        for p in self.arch:
            p.grad = None
        total.backward()
        if self.distributed:  # DDP averaged the weights' gradients, not the logits'
            grads = mean_over_ranks(tuple(p.grad for p in self.arch))
            for p, g in zip(self.arch, grads, strict=True):
                p.grad = g
        self._weight_update()
        self.a_opt.step()
        return ce.detach(), total.detach(), bl.detach(), current[self.primary]


def budget_loss(
    net: SuperNet,
    budgets: list[Budget],
    budget_weight: float,
    current: dict[str, Tensor] | dict[str, float],
) -> Tensor:
    """The sum of every budget's loss on the expected costs of the current distributions
    (``current``: the argmax shape's cost per metric, which sets each loss's direction)."""
    expected = net.expected_costs()
    return sum(
        (
            b.loss(expected[b.metric], current[b.metric], net.full_cost(b.metric), budget_weight)
            for b in budgets
        ),
        start=expected["flops"].new_zeros(()),
    )


def arch_update(
    net: SuperNet,
    arch: list[nn.Parameter],
    optimizer: torch.optim.Optimizer,
    task_loss: Tensor,
    budgets: list[Budget],
    budget_weight: float,
    current: dict[str, Tensor] | dict[str, float],
    *,
    distributed: bool,
) -> tuple[Tensor, Tensor]:
    """The architecture step after a forward on split B (the pipeline's search and
    `tasprune.TAS` alike): the budget loss of every budget (``current``: the argmax shape's
    cost per metric) added to ``task_loss``, gradients for the logits ``arch`` only (the
    weights' ``.grad`` untouched; averaged over ranks when ``distributed``), one optimiser
    step. Returns (the architecture loss, the budget loss), detached."""
    bl = budget_loss(net, budgets, budget_weight, current)
    total = task_loss.float() + bl.to(torch.float32)
    grads: tuple[Tensor | None, ...] = torch.autograd.grad(total, arch, allow_unused=True)
    if distributed:
        grads = mean_over_ranks(grads)
    for p, g in zip(arch, grads, strict=True):
        p.grad = g
    optimizer.step()
    return total.detach(), bl.detach()


class SearchTask:
    """The search's step for `tasprune.epoch.run_epoch`: batches of splits A and B to the
    device, one :class:`SearchStepper` step, sums (weight, architecture, budget loss)."""

    def __init__(self, stepper: SearchStepper, device: torch.device, cl: bool) -> None:
        self.stepper, self.device, self.cl = stepper, device, cl
        self.full = stepper.net.full_cost(stepper.primary)
        self.cost: Tensor | float = 0.0  # the argmax shape's cost at the last step

    def step(self, batch: Any, step: int) -> Tensor:
        """``batch``: ((xa, ya), (xb, yb)), or ((xa, ya), None) for a weight step alone (or
        a joint step)."""
        first, second = batch
        xa, ya = self._to_device(first)
        xb, yb = self._to_device(second) if second is not None else (None, None)
        loss, arch_loss, bl, self.cost = self.stepper.step(xa, ya, xb, yb)
        return torch.stack([loss, arch_loss, bl])

    def _to_device(self, batch: Any) -> tuple[Tensor, Tensor]:
        # No-ops for device-resident batches; streamed ones arrive on the CPU.
        x, y = (t.to(self.device, non_blocking=True) for t in batch)
        if self.cl:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y

    def postfix(self, sums: Tensor, steps: int, seconds: float) -> dict[str, str]:
        return {
            "loss": f"{float(sums[0]) / steps:.3f}",
            "ratio": f"{float(self.cost) / self.full:.3f}",
        }

    def diverged(self, value: float, epoch: int, step: int) -> TrainingError:
        kind = "nan" if math.isnan(value) else "inf"
        return TrainingError(
            f"search loss became {kind} at epoch {epoch + 1} step {step + 1}; the last good "
            "checkpoint is kept. Fix: lower lr or arch_lr, then rerun to resume"
        )


def mean_over_ranks(grads: tuple[Tensor | None, ...]) -> tuple[Tensor | None, ...]:
    """Average gradients over ranks with one all-reduce of their concatenation.

    Every rank sampled the same sub-network, so the same logits got no gradient (None)
    everywhere and the concatenations line up.
    """
    present = [g for g in grads if g is not None]
    if not present:
        return grads
    flat = ddp.all_reduce_mean(torch.cat([g.reshape(-1) for g in present]))
    out: list[Tensor | None] = []
    offset = 0
    for g in grads:
        if g is None:
            out.append(None)
            continue
        out.append(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
    return tuple(out)


def wrap_search_ddp(net: SuperNet, device: torch.device) -> nn.Module:
    """The SuperNet in DDP for the weight step, its architecture logits left out of DDP.

    The logits are updated by the architecture step with their own all-reduce; leaving them
    out means DDP neither waits for their (absent) gradients in the weight step nor
    broadcasts them.
    """
    arch = {id(p) for p in net.arch_parameters()}
    names = [n for n, p in net.named_parameters() if id(p) in arch]
    return ddp.wrap_ddp(net, device, ignore=names)


def supernet_module(net: nn.Module) -> SuperNet:
    """The SuperNet inside a possibly wrapped (DDP) module."""
    inner = getattr(net, "module", net)
    assert isinstance(inner, SuperNet)
    return inner
