"""The TAS search loop: alternate weight steps (split A) and architecture steps (split B).

Per epoch it records the argmax shape, its exact FLOPs and ratio, the supernet's accuracy on
a part of split B at that shape, and the entropy of every distribution; everything is
resumable from ``checkpoint.pt``. The step itself is `tasprune.search.step`'s; the kept shape
and its files (the last shape, projected onto the band if it ended outside it, becomes
``shape.json``) are `tasprune.search.result`'s.

Under ``torchrun`` (see :mod:`tasprune.distributed`) the logits, the Gumbel draws (one
generator, seeded alike on every rank) and hence the derived shape are identical on every
rank; that is checked every epoch. ``batch_size`` is global; rank 0 writes the files.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from tasprune import distributed as ddp
from tasprune.config import SearchConfig
from tasprune.cost import model_cost
from tasprune.data import ArrayDataset, Augment, DeviceLoader, search_loaders
from tasprune.engine import resume, save_epoch
from tasprune.epoch import resolve_channels_last, run_epoch
from tasprune.errors import BudgetError, ConfigError
from tasprune.search.latency import attach_latency
from tasprune.search.result import SearchResult, finish, load_finished
from tasprune.search.space import smallest_shape
from tasprune.search.step import SearchStepper, SearchTask, make_optimizers, wrap_search_ddp
from tasprune.search.supernet import SuperNet
from tasprune.utils import JsonlLogger, seed_everything

log = logging.getLogger(__name__)


#: Steps between two host reads of the device-side divergence marker.
CHECK_EVERY = 50


def tau_at(epoch: int, epochs: int, tau_max: float, tau_min: float, warm: int = 0) -> float:
    """Cosine-annealed Gumbel temperature: tau_max until the end of the ``warm`` epochs and at
    the first epoch after them, tau_min at the end."""
    t = max(0, epoch - warm) / (epochs - warm)
    return tau_min + (tau_max - tau_min) * (1 + math.cos(math.pi * t)) / 2


#: The checkpoint a search with warm epochs keeps of its state after them (the same for every
#: budget: `tasprune sweep` starts the other budgets' searches from it).
WARM_CHECKPOINT = "warm.pt"


def continue_from_warm(source: str | Path, dest: str | Path) -> int:
    """Start the search in folder ``dest`` where the search in ``source`` stood after its warm
    epochs (its ``warm.pt`` and their history rows): the warm epochs are the same whatever the
    budget, so a search of another budget with the same settings and seed continues from
    there as if it had run them itself. Returns the epochs that are done."""
    from tasprune.checkpoint import load_checkpoint, save_checkpoint

    src, out = Path(source), Path(dest)
    payload = load_checkpoint(src / WARM_CHECKPOINT)
    out.mkdir(parents=True, exist_ok=True)
    rows = [r for r in JsonlLogger(src / "history.jsonl").rows() if r["epoch"] <= payload["epoch"]]
    history = JsonlLogger(out / "history.jsonl")
    history.truncate_after(-1)
    for row in rows:
        history.log(row)
    save_checkpoint(out / "checkpoint.pt", payload)
    return int(payload["epoch"]) + 1


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


def _pairs(a: Any, b: Any, every: int) -> Iterator[tuple[Any, Any]]:
    """(batch of A, batch of B) for each weight step, B's batch only on every ``every``-th
    (None between, and always None without a split B: the joint step)."""
    it_b = iter(b) if b is not None else None
    for i, batch in enumerate(a):
        if it_b is None or i % every:
            yield batch, None
            continue
        second = next(it_b, None)
        if second is None:  # B is done: the epoch ends with it, as zip(A, B) does
            return
        yield batch, second


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
        done = load_finished(out, model)
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
        one_split=cfg.arch_step == "joint",
    )
    steps = (
        len(loader_a) if loader_b is None else min(len(loader_a), len(loader_b) * cfg.arch_every)
    )
    arch_steps = steps if loader_b is None else -(-steps // cfg.arch_every)
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
    task = SearchTask(stepper, device, cl)
    for epoch in range(start, cfg.epochs):
        net.train()
        net.tau = tau_at(epoch, cfg.epochs, cfg.tau_max, cfg.tau_min, cfg.warm_epochs)
        warm = stepper.warm = epoch < cfg.warm_epochs
        loader_a.set_epoch(epoch)
        if loader_b is not None and not warm:
            loader_b.set_epoch(epoch)
        pairs = (
            islice(_pairs(loader_a, None, 1), steps)
            if warm
            else _pairs(loader_a, loader_b, cfg.arch_every)
        )
        acc, seconds = run_epoch(
            task,
            pairs,
            steps,
            device,
            epoch,
            desc=f"search {epoch + 1}/{cfg.epochs}{' (warm)' if warm else ''}",
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
        in_band = not warm and all(
            b.contains(costs[b.metric], net.full_cost(b.metric)) for b in stepper.budgets
        )
        row = {
            "epoch": epoch,
            "tau": net.tau,
            "lr": w_opt.param_groups[0]["lr"],
            "loss": sums["loss"] / steps,
            "arch_loss": sums["arch_loss"] / arch_steps,
            "budget_loss": sums["budget"] / arch_steps,
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
            "warm": warm,
            "valid_top1": top1,
            "entropy_mean": sum(ent.values()) / max(1, len(ent)),
            "entropy_max": max(ent.values(), default=0.0),
            "seconds": seconds,
            "img_per_s": (steps + (0 if loader_b is None or warm else arch_steps))
            * cfg.batch_size
            / seconds,
            "shape": shape.to_dict(),
        }
        if in_band and (best is None or top1 >= best["valid_top1"]):  # never a warm epoch
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
            state = {
                "model": net.state_dict(),
                "optimizer": w_opt.state_dict(),
                "arch_optimizer": a_opt.state_dict(),
                "scheduler": w_sched.state_dict(),
                "gumbel_rng": gumbel.get_state(),
                "meta": {"model": model, "config": cfg.model_dump(mode="json"), "best": best},
            }
            save_epoch(ckpt, epoch, state)
            if epoch == cfg.warm_epochs - 1:
                save_epoch(ckpt.with_name(WARM_CHECKPOINT), epoch, state)

    if use_ddp:
        ddp.barrier()  # rank 0's last history row is on disk before the others read it
    rows = JsonlLogger(out / "history.jsonl").rows() if out is not None else []
    result = finish(net, cfg, out if main else None, best, rows)
    if use_ddp:
        ddp.barrier()  # the other ranks return only once rank 0's files exist
    return result
