"""TAS in your own training loop: `TAS(model, example_inputs, epochs=..., flops_ratio=...)`.

You keep your model, data, loss, optimiser, AMP and trainer. tasprune gives you ``tas.model``,
the searchable network (your network itself at full width, each channel group's width mixture
and each stage's depth mixture inside it, the same forward and output structure), and one call
per architecture step. The architecture logits live in ``tas``, not in ``tas.model``: a
weight optimiser built from ``tas.model.parameters()`` cannot train them, an EMA copy or a
saved ``tas.model.state_dict()`` does not hold them. ::

    tas = tasprune.TAS(model, example_inputs=x, epochs=10, flops_ratio=0.5)
    net = tas.model
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for epoch in range(10):
        for (xa, ya), (xb, yb) in zip(loader_a, loader_b):  # two splits of your train set
            loss = criterion(net(xa), ya)                     # weight step: yours
            opt.zero_grad(); loss.backward(); opt.step()
            tas.arch_step(lambda: criterion(net(xb), yb))     # architecture step: ours
        print(tas.end_epoch())                                # FLOPs ratio, entropy, tau
    shape = tas.shape()      # the kept shape, inside the budget band
    small = tas.prune()      # the physically smaller network: an instance of your class

``arch_step`` takes a function that runs your forward on the architecture split and returns
the loss (without calling backward); it adds the budget loss, asks autograd for the logits'
gradients only (your weights' ``.grad`` are untouched) and steps Adam on the logits. Under
``torch.distributed`` the logits' gradients are averaged over ranks, and every rank samples
the same sub-network (one generator, seeded alike). In eval mode ``tas.model`` runs the most
probable shape.

With ``arch_step="joint"`` one forward serves both updates (1.1-1.5x a plain step instead of
1.8-2.5x): add ``tas.budget_loss()`` to your loss, backward as usual, step your optimiser,
then ``tas.step()`` (``tas.step(scaler)`` with an AMP GradScaler).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from tasprune import distributed as ddp
from tasprune.budget import Budget
from tasprune.config import SearchConfig, as_config
from tasprune.errors import ConfigError
from tasprune.models import create_model
from tasprune.models.traced import register_module
from tasprune.search.loop import tau_at
from tasprune.search.space import smallest_shape
from tasprune.search.step import arch_update, budget_loss, mean_over_ranks
from tasprune.search.supernet import SuperNet
from tasprune.shape import Shape

logger = logging.getLogger(__name__)

__all__ = ["TAS"]


class TAS:
    """The TAS search of ``model`` (an ``nn.Module`` with its trained weights, called on
    ``example_inputs``: a tensor or a tuple of its forward's positional arguments) for your
    own training loop. ``settings`` are `SearchConfig` fields (``epochs`` is required:
    the temperature schedule spans it; ``flops_ratio``, ``params_ratio``, ``tolerance``,
    ``arch_lr``, ``tau_max``/``tau_min``, ``width_fractions``, ``search_depth``, ``seed``, ...);
    ``config`` a SearchConfig or mapping they override. ``ignore`` names modules whose output
    widths and depths are kept (the outputs' producers always are); ``only`` names the
    sub-modules searched (``only=["backbone", "neck"]``), the rest is ignored.
    ``callback(row)`` receives each epoch's row from `end_epoch`."""

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Any,
        *,
        config: SearchConfig | dict[str, Any] | None = None,
        ignore: tuple[str, ...] | list[str] = (),
        only: tuple[str, ...] | list[str] = (),
        callback: Callable[[dict[str, Any]], None] | None = None,
        **settings: Any,
    ) -> None:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            raise ConfigError(
                "TAS got a DDP/DataParallel wrapper. Fix: pass the bare model and wrap "
                "tas.model instead"
            )
        base = config.model_dump() if isinstance(config, SearchConfig) else dict(config or {})
        if not isinstance(config, SearchConfig) and "arch_step" not in {**base, **settings}:
            # your loop's default stays the paper's alternation (its call is arch_step on
            # the architecture split); tasprune's own loop defaults to the joint step
            settings["arch_step"] = "alternate"
        if "epochs" not in {**base, **settings}:
            raise ConfigError(
                "TAS needs the number of epochs (its temperature schedule spans them). "
                "Fix: TAS(model, example_inputs, epochs=N, ...)"
            )
        self.config = as_config(SearchConfig, {**base, **settings}, "TAS settings")
        if self.config.latency_ratio is not None:
            raise ConfigError(
                "TAS in your own loop takes a FLOPs or params budget for now. Fix: use "
                "flops_ratio/params_ratio, or tasprune.search for a latency budget"
            )
        cfg = self.config
        self.name = register_module(model, example_inputs, ignore=ignore, only=only)
        self.supernet = SuperNet(self.name, options=cfg.space())
        for budget in cfg.budgets():
            small = self.supernet.shape_costs(smallest_shape(self.name, cfg.space()))
            budget.check_reachable(
                small[budget.metric], self.supernet.full_cost(budget.metric), self.name
            )
        if cfg.warm_start:
            self.supernet.load_plain_weights(model.state_dict())
        self.supernet.generator = torch.Generator().manual_seed(cfg.seed)
        self.arch = self.supernet.arch_parameters()
        self.joint = cfg.arch_step == "joint"
        for p in self.arch:
            # alternate: only arch_step asks for their gradients; joint: the user's backward
            # of (loss + tas.budget_loss()) gives them, and tas.step() applies them.
            p.requires_grad_(self.joint)
        self.callback = callback
        self.epoch = 0
        self.supernet.tau = tau_at(0, cfg.epochs, cfg.tau_max, cfg.tau_min)
        self.budgets: list[Budget] = cfg.budgets()
        self._optimizer: torch.optim.Adam | None = None
        self._optimizer_state: dict[str, Any] | None = None
        self._costs: dict[str, dict[str, float]] = {}
        self.model: nn.Module = self.supernet.net
        # A function, not a bound method: copies of the model (an EMA) share this search
        # instead of deep-copying it.
        select = self._select
        self.model.register_forward_pre_hook(lambda module, args: select(module, args))
        move = self.supernet._device()
        if (dev := _device_of(model)) is not None and dev != move:
            self.supernet.to(dev)

    # ---------------------------------------------------------------- the two steps
    def _select(self, module: nn.Module, args: Any) -> None:
        """Before each forward of ``tas.model``: the sub-network it runs (Gumbel samples in
        train mode, the most probable shape in eval mode), on the model's device."""
        sn = self.supernet
        dev = _device_of(module)
        if dev is not None and self.arch and self.arch[0].device != dev:
            sn.width_logits.to(dev)
            sn.depth_logits.to(dev)
        sn.training = module.training
        sn.select()

    def arch_step(self, closure: Callable[[], Tensor]) -> dict[str, float]:
        """One architecture step: ``closure()`` runs ``tas.model`` on a batch of the
        architecture split and returns the task loss (no backward); the budget loss is added
        and Adam steps the logits. Returns the losses."""
        sn, cfg = self.supernet, self.config
        for p in self.arch:
            p.requires_grad_(True)
        try:
            task = closure()
            if not isinstance(task, Tensor) or task.dim() != 0:
                raise ConfigError(
                    "arch_step's function returned "
                    f"{type(task).__name__ if not isinstance(task, Tensor) else tuple(task.shape)}"
                    ", not a scalar loss. Fix: return the loss of tas.model on the batch"
                )
            total, budget = arch_update(
                sn,
                self.arch,
                self.optimizer,
                task,
                self.budgets,
                cfg.budget_weight,
                self._current(),
                distributed=ddp.is_distributed(),
            )
        finally:
            for p in self.arch:
                p.requires_grad_(self.joint)
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": float(task.detach()), "budget_loss": float(budget)}

    def _current(self) -> dict[str, float]:
        """The exact cost of the most probable shape per metric (memoised: the budget loss's
        direction, which rarely changes from step to step)."""
        shape = self.supernet.derive()
        key = shape.to_json()
        if key not in self._costs:
            self._costs[key] = self.supernet.shape_costs(shape)
        return self._costs[key]

    def budget_loss(self) -> Tensor:
        """``arch_step="joint"``: the budget loss to add to your loss before its backward
        (it depends on the architecture logits only); then :meth:`step` applies the logits'
        gradients. One forward serves both updates::

            loss = criterion(tas.model(x), y) + tas.budget_loss()
            opt.zero_grad(); loss.backward(); opt.step(); tas.step()
        """
        if not self.joint:
            raise ConfigError(
                "budget_loss() is for the joint step. Fix: TAS(..., arch_step='joint'), or "
                "call tas.arch_step(closure) on the architecture split"
            )
        return budget_loss(self.supernet, self.budgets, self.config.budget_weight, self._current())

    def step(self, scaler: Any = None) -> None:
        """``arch_step="joint"``: one Adam step of the logits on the gradients your backward
        gave them (averaged over ranks under torch.distributed; divided by ``scaler``'s scale
        when you pass your AMP GradScaler, and skipped when they are not finite)."""
        if not self.joint:
            raise ConfigError("step() is for the joint step. Fix: TAS(..., arch_step='joint')")
        grads = tuple(p.grad for p in self.arch)
        if all(g is None for g in grads):
            raise ConfigError(
                "tas.step() found no gradients on the architecture logits. Fix: add "
                "tas.budget_loss() to your loss and call loss.backward() first"
            )
        if ddp.is_distributed():
            grads = mean_over_ranks(grads)
        if scaler is not None:
            scale = float(scaler.get_scale())
            grads = tuple(g / scale if g is not None else None for g in grads)
        finite = all(g is None or bool(torch.isfinite(g).all()) for g in grads)
        for p, g in zip(self.arch, grads, strict=True):
            p.grad = g
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def optimizer(self) -> torch.optim.Adam:
        """Adam on the logits (made at the first step, on the logits' device)."""
        if self._optimizer is None:
            cfg = self.config
            self._optimizer = torch.optim.Adam(
                self.arch, lr=cfg.arch_lr, betas=cfg.arch_betas, weight_decay=cfg.arch_weight_decay
            )
            if self._optimizer_state is not None:
                self._optimizer.load_state_dict(self._optimizer_state)
                self._optimizer_state = None
        return self._optimizer

    def end_epoch(self) -> dict[str, Any]:
        """Close an epoch: the next temperature; returns (and hands ``callback``) the row of
        the epoch: the most probable shape's cost ratios and band, entropy, tau."""
        cfg, sn = self.config, self.supernet
        shape = sn.derive()
        costs = sn.shape_costs(shape)
        entropy = sn.entropy()
        row: dict[str, Any] = {
            "epoch": self.epoch,
            "tau": sn.tau,
            "in_band": all(
                b.contains(costs[b.metric], sn.full_cost(b.metric)) for b in self.budgets
            ),
            "entropy_mean": sum(entropy.values()) / max(len(entropy), 1),
            "entropy_max": max(entropy.values(), default=0.0),
        }
        for metric in ("flops", "params"):
            row[f"{metric}_ratio"] = costs[metric] / sn.full_cost(metric)
        self.epoch += 1
        sn.tau = tau_at(min(self.epoch, cfg.epochs), cfg.epochs, cfg.tau_max, cfg.tau_min)
        logger.info(
            "TAS epoch %d: FLOPs ratio %.3f%s entropy %.3f tau %.2f",
            row["epoch"] + 1,
            row["flops_ratio"],
            "" if row["in_band"] else " (outside the band)",
            row["entropy_mean"],
            row["tau"],
        )
        if self.callback is not None:
            self.callback(row)
        return row

    # ---------------------------------------------------------------- the result
    def shape(self) -> Shape:
        """The kept shape: the most probable one, projected onto the budget band when it is
        outside (`SuperNet.project`)."""
        sn = self.supernet
        shape = sn.derive()
        primary = self.budgets[0]
        if not primary.contains(
            sn.shape_costs(shape)[primary.metric], sn.full_cost(primary.metric)
        ):
            shape = sn.project(shape, primary)
        return shape

    def save_shape(self, path: Any) -> Shape:
        """Write the kept shape to ``path`` (shape.json); `tasprune.prune(fresh_model, path,
        example_inputs=...)` applies it to a freshly built original."""
        shape = self.shape()
        costs = self.supernet.shape_costs(shape)
        shape.save(
            path,
            model=self.name,
            flops_ratio=costs["flops"] / self.supernet.full_cost("flops"),
            params_ratio=costs["params"] / self.supernet.full_cost("params"),
        )
        return shape

    def prune(self, shape: Shape | None = None) -> nn.Module:
        """The physically smaller network of ``shape`` (default: the kept shape), an instance
        of your class with the same forward, its weights cut from the searched network."""
        shape = shape or self.shape()
        net = create_model(self.name, shape)
        net.load_state_dict(self.supernet.plain_state_dict(shape))
        return net.to(self.supernet._device())

    # ---------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, Any]:
        """The search's own state (logits, Adam, epoch, sampling generator); your weights
        are ``tas.model.state_dict()``."""
        return {
            "logits": {n: p.detach().cpu().clone() for n, p in self._named_arch()},
            "optimizer": self._optimizer.state_dict()
            if self._optimizer is not None
            else self._optimizer_state,
            "epoch": self.epoch,
            "generator": self.supernet.generator.get_state() if self.supernet.generator else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from `state_dict`'s output."""
        own = dict(self._named_arch())
        missing = set(own) ^ set(state.get("logits", {}))
        if missing:
            raise ConfigError(
                f"the TAS state does not fit this search (logits {sorted(missing)[:3]}). Fix: "
                "resume with the same model and settings"
            )
        with torch.no_grad():
            for n, p in own.items():
                p.copy_(state["logits"][n])
        self._optimizer, self._optimizer_state = None, state.get("optimizer")
        self.epoch = int(state["epoch"])
        cfg = self.config
        self.supernet.tau = tau_at(
            min(self.epoch, cfg.epochs), cfg.epochs, cfg.tau_max, cfg.tau_min
        )
        if state.get("generator") is not None and self.supernet.generator is not None:
            self.supernet.generator.set_state(state["generator"])

    def _named_arch(self) -> list[tuple[str, nn.Parameter]]:
        sn = self.supernet
        return [
            *((f"width.{k}", p) for k, p in sn.width_logits.items()),
            *((f"depth.{k}", p) for k, p in sn.depth_logits.items()),
        ]


def _device_of(module: nn.Module) -> torch.device | None:
    return next((p.device for p in module.parameters()), None)
