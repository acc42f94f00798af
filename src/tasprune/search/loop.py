"""The TAS search loop: alternate weight steps (split A) and architecture steps (split B).

Per epoch it records the argmax shape, its exact FLOPs and ratio, the supernet's accuracy on
a part of split B at that shape, and the entropy of every distribution. Both the last shape and
the best in-band shape are saved; the last one (projected onto the band if it ended outside
it) becomes ``shape.json``; everything is resumable from ``checkpoint.pt``.

Under ``torchrun`` (see :mod:`tasprune.distributed`) the weight step runs through DDP (the
architecture logits excluded from its reducer), the architecture step on the plain module with
its gradients averaged over ranks by hand, so the logits, the Gumbel draws (one generator,
seeded alike on every rank) and hence the derived shape are identical on every rank; that is
checked every epoch. ``batch_size`` is global; rank 0 writes the files.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tasprune import distributed as ddp
from tasprune.checkpoint import save_checkpoint
from tasprune.config import SearchConfig
from tasprune.cost import model_cost
from tasprune.data import ArrayDataset, Augment, DeviceLoader, search_loaders
from tasprune.engine import (
    autocast,
    lr_factor,
    resolve_channels_last,
    resume,
    run_epoch,
    save_epoch,
)
from tasprune.errors import BudgetError, ConfigError, TrainingError
from tasprune.search.latency import attach_latency
from tasprune.search.space import smallest_shape
from tasprune.search.supernet import SuperNet
from tasprune.shape import Shape
from tasprune.utils import JsonlLogger, atomic_write_text, seed_everything

log = logging.getLogger(__name__)


@dataclass
class SearchResult:
    """What a search produced: the chosen shape and its cost, plus the whole history."""

    model: str
    shape: Shape
    flops: int
    params: int
    flops_ratio: float
    last_shape: Shape
    best_shape: Shape | None
    history: list[dict[str, Any]] = field(default_factory=list)
    latency: dict[str, Any] | None = None  # a latency budget's prediction (shape.json's)

    def summary(self) -> dict[str, Any]:
        out = {
            "model": self.model,
            "flops": self.flops,
            "params": self.params,
            "flops_ratio": self.flops_ratio,
        }
        if self.latency is not None:
            out["latency"] = self.latency
        return out


#: Steps between two host reads of the device-side divergence marker.
CHECK_EVERY = 50


def tau_at(epoch: int, epochs: int, tau_max: float, tau_min: float) -> float:
    """Cosine-annealed Gumbel temperature: tau_max at epoch 0, tau_min at the end."""
    return tau_min + (tau_max - tau_min) * (1 + math.cos(math.pi * epoch / epochs)) / 2


def check_budget(
    model: str,
    cfg: SearchConfig,
    input_size: tuple[int, int, int],
    num_classes: int,
    *,
    progress: bool = True,
    net: SuperNet | None = None,
) -> None:
    """Refuse, before any training, a budget the search space cannot reach. FLOPs and params
    are computed from the candidate lists and the cost model alone (no network is built); a
    latency budget needs the latency table, attached here to ``net`` (or to a supernet built
    for the check; the table is cached, so the search reuses it), and is checked last."""
    small = smallest_shape(model, cfg.space())
    costs = model_cost(model, small, input_size, num_classes)
    full = model_cost(model, None, input_size, num_classes)
    for budget in sorted(cfg.budgets(), key=lambda b: b.metric == "latency"):
        if budget.metric == "latency":
            if net is None:
                net = SuperNet.for_input(model, input_size, num_classes, cfg.space())
            if net.latency_table is None:
                attach_latency(net, cfg, progress=progress)
            smallest = net.shape_costs(small)["latency"]
            budget.check_reachable(smallest, net.full_latency, model)
            continue
        i = 0 if budget.metric == "flops" else 1
        budget.check_reachable(costs[i], full[i], model)


def build_supernet(
    model: str,
    data: ArrayDataset,
    cfg: SearchConfig,
    teacher_state: dict[str, Tensor] | None,
    *,
    progress: bool = True,
) -> SuperNet:
    size = (data.in_channels, *data.image_size)
    net = SuperNet.for_input(model, size, data.num_classes, cfg.space())
    # Also attaches the latency model to net when the budget is one.
    check_budget(model, cfg, size, data.num_classes, progress=progress, net=net)
    if teacher_state is not None and cfg.warm_start:
        net.load_plain_weights(teacher_state)
    return net


def _weight_optimizer(net: SuperNet, cfg: SearchConfig) -> torch.optim.SGD:
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in net.net.named_parameters():
        per_candidate_bn = name.endswith(("cand_weight", "cand_bias"))
        (decay if p.ndim > 1 and not per_candidate_bn else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.SGD(
        groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0
    )


@torch.no_grad()
def valid_top1(
    net: SuperNet,
    loader: DeviceLoader,
    batches: int | None,
    cl: bool,
    *,
    distributed: bool = False,
) -> float:
    """Accuracy (%) of the argmax sub-network on the first ``batches`` batches of split B.

    Running BN statistics were accumulated over many sampled sub-networks and do not fit any
    single one, so the argmax sub-network is evaluated with batch statistics; the running
    buffers are restored afterwards. With ``distributed`` (every rank calls it with its shard)
    the counts are summed over ranks, so all ranks get the same accuracy.
    """
    was = net.training
    buffers = {k: v.clone() for k, v in net.named_buffers()}
    net.train()
    correct = total = 0
    with net.fixed(net.derive()):
        for i, (x, y) in enumerate(loader):
            if batches is not None and i >= batches:
                break
            if cl:
                x = x.contiguous(memory_format=torch.channels_last)
            correct += int((net(x).argmax(1) == y).sum())
            total += y.numel()
    for k, v in net.named_buffers():
        v.copy_(buffers[k])
    net.train(was)
    if distributed:
        counts = ddp.all_reduce_sum(torch.tensor([correct, total], dtype=torch.float64))
        correct, total = int(counts[0].item()), int(counts[1].item())
    return 100.0 * correct / max(1, total)


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

    def exact(self, shape: Shape) -> dict[str, float]:
        """Exact cost of a shape per metric, memoised (the argmax rarely changes per step)."""
        key = shape.to_json()
        if key not in self._cost_cache:
            self._cost_cache[key] = self.net.shape_costs(shape)
        return self._cost_cache[key]

    def step(
        self, xa: Tensor, ya: Tensor, xb: Tensor, yb: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | float]:
        """Returns (weight loss, architecture loss, budget loss, the argmax shape's cost in the
        primary budget's metric).

        On an accelerator the argmax shape's cost is computed on the device
        (`SuperNet.argmax_cost`), so a step never waits for the host; on the CPU, where a
        host read is free, it is the memoised exact cost of ``derive()`` (cheaper there)."""
        net, cfg = self.net, self.cfg
        # Weight step on split A: the sampled widths carry no gradient to the logits here.
        for p in self.arch:
            p.requires_grad_(False)
        with autocast(xa.device, cfg.amp):
            logits = self.weight_model(xa)
        loss = F.cross_entropy(logits.float(), ya)
        self.w_opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.weights, cfg.grad_clip)
        self.w_opt.step()
        if self.w_sched is not None:
            self.w_sched.step()
        for p in self.arch:
            p.requires_grad_(True)
        # Architecture step on split B: gradients for the logits only, none for the weights.
        with autocast(xb.device, cfg.amp):
            logits = net(xb)
        ce = F.cross_entropy(logits.float(), yb)
        on_cpu = xb.device.type == "cpu"
        current: dict[str, Tensor] | dict[str, float] = (
            self.exact(net.derive()) if on_cpu else net.argmax_costs()
        )
        expected = net.expected_costs()
        bl = sum(
            (
                b.loss(
                    expected[b.metric],
                    current[b.metric],
                    net.full_cost(b.metric),
                    cfg.budget_weight,
                )
                for b in self.budgets
            ),
            start=expected["flops"].new_zeros(()),
        )
        arch_loss = ce + bl.to(ce.dtype)
        grads: tuple[Tensor | None, ...] = torch.autograd.grad(
            arch_loss, self.arch, allow_unused=True
        )
        if self.distributed:
            grads = _mean_over_ranks(grads)
        for p, g in zip(self.arch, grads, strict=True):
            p.grad = g
        self.a_opt.step()
        return loss.detach(), arch_loss.detach(), bl.detach(), current[self.primary]


class _SearchTask:
    """The search's step for the engine's :func:`run_epoch`: batches of splits A and B to the
    device, one :class:`SearchStepper` step, sums (weight, architecture, budget loss)."""

    def __init__(self, stepper: SearchStepper, device: torch.device, cl: bool) -> None:
        self.stepper, self.device, self.cl = stepper, device, cl
        self.full = stepper.net.full_cost(stepper.primary)
        self.cost: Tensor | float = 0.0  # the argmax shape's cost at the last step

    def step(self, batch: Any, step: int) -> Tensor:
        (xa, ya), (xb, yb) = batch
        # No-ops for device-resident batches; streamed ones arrive on the CPU.
        xa, ya, xb, yb = (t.to(self.device, non_blocking=True) for t in (xa, ya, xb, yb))
        if self.cl:
            xa = xa.contiguous(memory_format=torch.channels_last)
            xb = xb.contiguous(memory_format=torch.channels_last)
        loss, arch_loss, bl, self.cost = self.stepper.step(xa, ya, xb, yb)
        return torch.stack([loss, arch_loss, bl])

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


def _mean_over_ranks(grads: tuple[Tensor | None, ...]) -> tuple[Tensor | None, ...]:
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


def make_optimizers(
    net: SuperNet, cfg: SearchConfig, steps_per_epoch: int
) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.LambdaLR, torch.optim.Adam]:
    """SGD + per-step cosine schedule for the weights, Adam for the architecture logits."""
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


def search(
    model: str,
    data: Any,
    cfg: SearchConfig,
    out_dir: str | Path | None = None,
    *,
    teacher_state: dict[str, Tensor] | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
    augment: Augment | dict[str, Any] | None = None,
    distributed: bool | None = None,
    tensorboard: bool = False,
) -> SearchResult:
    """Run a TAS search of ``model`` on ``data`` (the training split) and derive a shape.

    ``data``: an in-memory ArrayDataset or a streamed `tasprune.imagefolder.StreamingFolder`
    (split into halves A and B by `tasprune.data.search_loaders`). ``augment`` applies to
    both training halves (None: fit the data, see `Augment`).
    ``tensorboard``: the history rows (FLOPs ratio, entropy, tau, ...) also go to
    ``out_dir/tensorboard``.

    With ``out_dir`` it writes ``shape.json`` (the kept shape plus model, flops, params,
    flops_ratio), ``shape_last.json``, ``shape_best.json``, ``history.jsonl`` and a resumable
    ``checkpoint.pt``; a finished search found there is returned without training.

    ``distributed`` (default: whether a process group is initialised) searches with DDP:
    every rank calls ``search`` with the same arguments and its own ``device``; each split is
    sharded by rank with per-rank batch ``cfg.batch_size / world_size``; rank 0 writes the
    files, the others wait for it and every rank returns the same result.
    """
    device = torch.device(device)
    use_ddp = ddp.is_distributed() if distributed is None else distributed
    if use_ddp and not ddp.is_distributed():
        raise ConfigError(
            "distributed search asked for but no process group exists. Fix: launch with "
            "torchrun and call tasprune.distributed.init_from_env() first"
        )
    rank, world = (ddp.get_rank(), ddp.get_world_size()) if use_ddp else (0, 1)
    main = rank == 0
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        if main:
            out.mkdir(parents=True, exist_ok=True)
        done = _load_finished(out, model)
        if done is not None:
            return done
    seed_everything(cfg.seed, cfg.deterministic)
    net = build_supernet(model, data, cfg, teacher_state, progress=progress).to(device)
    cl = resolve_channels_last(cfg.channels_last, device, net)
    if cl:
        net = net.to(memory_format=torch.channels_last)
    gumbel = net.generator = torch.Generator().manual_seed(cfg.seed)

    loader_a, loader_b, valid = search_loaders(
        data,
        cfg.batch_size,
        augment=augment,
        device=device,
        seed=cfg.seed,
        world=(rank, world),
        holdout=cfg.holdout,
    )
    steps = min(len(loader_a), len(loader_b))
    if steps < 1:
        raise BudgetError(
            f"the training set is too small for batch {cfg.batch_size} "
            "on each half. Fix: lower batch_size"
        )

    w_opt, w_sched, a_opt = make_optimizers(net, cfg, steps)

    budget = cfg.budget  # the primary one: the kept shape and the log line follow it
    full_primary = net.full_cost(budget.metric)

    best = None
    # Only rank 0 writes; every rank reads the checkpoint on resume.
    history = (
        JsonlLogger(out / "history.jsonl", tensorboard=tensorboard)
        if out is not None and main
        else None
    )
    ckpt = out / "checkpoint.pt" if out is not None else None

    def restore(state: dict[str, Any]) -> None:
        net.load_state_dict(state["model"])
        w_opt.load_state_dict(state["optimizer"])
        a_opt.load_state_dict(state["arch_optimizer"])
        w_sched.load_state_dict(state["scheduler"])
        gumbel.set_state(state["gumbel_rng"])

    start, state = resume(ckpt, restore, history, map_location=device)
    if state is not None:
        best = state["meta"].get("best")
        if main:
            log.info("resuming search from epoch %d", start)

    # Wrapped after loading, so DDP's initial broadcast from rank 0 sees the resumed weights.
    weight_model: nn.Module | None = wrap_search_ddp(net, device) if use_ddp else None
    if cfg.compile:
        # Compiles the weight step's forward; the architecture step runs the plain module.
        weight_model = cast(nn.Module, torch.compile(weight_model or net))
    stepper = SearchStepper(
        net, w_opt, w_sched, a_opt, cfg, weight_model=weight_model, distributed=use_ddp
    )
    task = _SearchTask(stepper, device, cl)
    for epoch in range(start, cfg.epochs):
        net.train()
        net.tau = tau_at(epoch, cfg.epochs, cfg.tau_max, cfg.tau_min)
        loader_a.set_epoch(epoch)
        loader_b.set_epoch(epoch)
        acc, seconds = run_epoch(
            task,
            zip(loader_a, loader_b, strict=False),
            steps,
            device,
            epoch,
            desc=f"search {epoch + 1}/{cfg.epochs}",
            progress=progress,
            check_every=CHECK_EVERY,
        )
        sums = dict(zip(("loss", "arch_loss", "budget"), acc.tolist(), strict=True))
        if use_ddp:
            # Everything below (shape, best, checkpoint) must be the same on every rank.
            ddp.assert_same(net.arch_parameters(), f"architecture logits after epoch {epoch}")
            ddp.sync_buffers(net)
            loss_sums = torch.tensor([sums[k] for k in sums], dtype=torch.float64)
            ddp.all_reduce_mean(loss_sums)
            sums = dict(zip(sums, loss_sums.tolist(), strict=True))
        shape = net.derive()
        costs = stepper.exact(shape)
        flops, params = int(costs["flops"]), int(costs["params"])
        ratio = costs[budget.metric] / full_primary
        top1 = valid_top1(net, valid, cfg.valid_batches, cl, distributed=use_ddp)
        ent = net.entropy()
        in_band = all(b.contains(costs[b.metric], net.full_cost(b.metric)) for b in stepper.budgets)
        row = {
            "epoch": epoch,
            "tau": net.tau,
            "lr": w_opt.param_groups[0]["lr"],
            "loss": sums["loss"] / steps,
            "arch_loss": sums["arch_loss"] / steps,
            "budget_loss": sums["budget"] / steps,
            "flops": flops,
            "params": params,
            "flops_ratio": flops / net.full_flops,
            **(
                {
                    "latency_ms": costs["latency"],
                    "latency_ratio": costs["latency"] / net.full_latency,
                }
                if "latency" in costs
                else {}
            ),
            "in_band": in_band,
            "valid_top1": top1,
            "entropy_mean": sum(ent.values()) / max(1, len(ent)),
            "entropy_max": max(ent.values(), default=0.0),
            "seconds": seconds,
            "img_per_s": 2 * steps * cfg.batch_size / seconds,
            "shape": shape.to_dict(),
        }
        if in_band and (best is None or top1 >= best["valid_top1"]):
            best = {"epoch": epoch, "valid_top1": top1, "shape": shape.to_dict()}
        if main:
            log.info(
                "search epoch %d/%d: %s ratio %.3f (band %.3f-%.3f) valid top-1 %.2f%% "
                "entropy %.3f tau %.2f (%.0f img/s)",
                epoch + 1,
                cfg.epochs,
                budget.label,
                ratio,
                *budget.band,
                top1,
                row["entropy_mean"],
                net.tau,
                row["img_per_s"],
            )
        if history is not None:
            history.log(row)
        if ckpt is not None and main:
            save_epoch(
                ckpt,
                epoch,
                {
                    "model": net.state_dict(),
                    "optimizer": w_opt.state_dict(),
                    "arch_optimizer": a_opt.state_dict(),
                    "scheduler": w_sched.state_dict(),
                    "gumbel_rng": gumbel.get_state(),
                    "meta": {"model": model, "config": cfg.model_dump(mode="json"), "best": best},
                },
            )

    if use_ddp:
        ddp.barrier()  # rank 0's last history row is on disk before the others read it
    rows = JsonlLogger(out / "history.jsonl").rows() if out is not None else []
    result = _finish(net, cfg, out if main else None, best, rows)
    if use_ddp:
        ddp.barrier()  # the other ranks return only once rank 0's files exist
    return result


def _finish(
    net: SuperNet,
    cfg: SearchConfig,
    out: Path | None,
    best: dict[str, Any] | None,
    rows: list[dict[str, Any]],
) -> SearchResult:
    last = net.derive()
    best_shape = Shape.from_dict(best["shape"]) if best is not None else None
    budget = cfg.budget
    lower, upper = budget.band

    def ratio_of(shape: Shape) -> float:
        return net.shape_costs(shape)[budget.metric] / net.full_cost(budget.metric)

    last_ratio = ratio_of(last)
    last_ok = budget.contains_ratio(last_ratio)
    if cfg.keep == "best" and best_shape is not None:
        kept, source = best_shape, "best"
    elif last_ok:
        kept, source = last, "last"
    else:
        # The last shape projected onto the band, not an earlier in-band epoch's shape: the
        # projected last trained better on all three searches measured (bench/results/keep.md).
        kept, source = net.project(last, budget), "projected"
        if ddp.is_main():
            hint = (
                ""
                if best_shape is not None
                else " (no epoch ended inside it: a longer search or a higher arch_lr decides the shape itself)"
            )
            log.warning(
                "the last shape (%s ratio %.3f) is outside the budget band [%.3f, %.3f]%s; "
                "keeping it projected onto the budget (ratio %.3f)",
                budget.label,
                last_ratio,
                lower,
                upper,
                hint,
                ratio_of(kept),
            )
    flops, params = net.shape_cost(kept)
    latency = None
    if net.latency_table is not None:
        predicted = net.shape_costs(kept)["latency"]
        latency = {
            "predicted_ms": predicted,
            "predicted_ratio": predicted / net.full_latency,
            **(net.latency_info or {}),
        }
    result = SearchResult(
        model=net.model_name,
        shape=kept,
        flops=flops,
        params=params,
        flops_ratio=flops / net.full_flops,
        last_shape=last,
        best_shape=best_shape,
        history=rows,
        latency=latency,
    )
    if out is not None:
        extra = {
            "model": net.model_name,
            "input_size": [net.in_channels, *net.input_size],
            "num_classes": net.num_classes,
        }
        for name, shape in (("shape_last.json", last), ("shape_best.json", best_shape)):
            if shape is not None:
                f, p = net.shape_cost(shape)
                shape.save(out / name, **extra, flops=f, params=p, flops_ratio=f / net.full_flops)
        save_checkpoint(out / "supernet.pt", {"model": net.state_dict()})
        kept.save(
            out / "shape.json",
            **extra,
            flops=flops,
            params=params,
            flops_ratio=result.flops_ratio,
            source=source,
            **({"latency": latency} if latency is not None else {}),
        )
        atomic_write_text(out / "search_done.json", '{"complete": true}\n')
    return result


def _load_finished(out: Path, model: str) -> SearchResult | None:
    if not (out / "search_done.json").is_file() or not (out / "shape.json").is_file():
        return None
    shape, data = Shape.load(out / "shape.json")
    if data.get("model", model) != model:  # never hand back another model's search
        raise ConfigError(
            f"{out} holds a finished search of {data['model']}, not {model}. Fix: use another "
            "output folder"
        )
    last, _ = Shape.load(out / "shape_last.json")
    best = Shape.load(out / "shape_best.json")[0] if (out / "shape_best.json").is_file() else None
    rows = JsonlLogger(out / "history.jsonl").rows()
    return SearchResult(
        model=data.get("model", model),
        shape=shape,
        flops=int(data["flops"]),
        params=int(data["params"]),
        flops_ratio=float(data["flops_ratio"]),
        last_shape=last,
        best_shape=best,
        history=rows,
        latency=data.get("latency"),
    )


def supernet_module(net: nn.Module) -> SuperNet:
    """The SuperNet inside a possibly wrapped (DDP) module."""
    inner = getattr(net, "module", net)
    assert isinstance(inner, SuperNet)
    return inner
