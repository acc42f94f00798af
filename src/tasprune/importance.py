"""Keep the important channels: reorder a trained network's coupled channels by importance.

TAS keeps the first k channels of every width choice, and the student starts from the
teacher's first k channels, so before a warm-started search (and the student's
initialisation) every coupled group of the teacher (the convs writing one residual stream, a
depthwise conv and its producer, a conv and its BN, ...) is permuted so that its most
important channels come first: the same permutation in every producer and consumer of the
group, hence the network computes exactly the same function (tested on every shipped
network). The groups are traced by Torch-Pruning's dependency graph (the ``baselines`` extra).

Criteria (per channel of a group, averaged over the group's members):
- ``l1``: L1 norm of the producing conv filters (Li et al., ICLR 2017);
- ``bn``: |gamma| of the batch norms that follow the producers (Liu et al., ICCV 2017);
- ``taylor``: |gamma * dL/dgamma| summed over a few training batches (first-order Taylor
  estimate of the loss change when the channel is removed; Molchanov et al., CVPR 2019).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tasprune.errors import ConfigError

__all__ = ["Criterion", "group_importance", "order_channels"]

logger = logging.getLogger(__name__)

Criterion = Literal["l1", "bn", "taylor"]
PERMUTED = [nn.Conv2d, nn.Linear]  # the layers whose output channels root a group


def _tp() -> Any:
    try:
        import torch_pruning
    except ImportError as err:
        raise ConfigError(
            "ordering channels needs Torch-Pruning to trace the coupled groups. Fix: pip "
            "install 'tasprune[baselines]', or set teacher.order: none"
        ) from err
    return torch_pruning


def _groups(model: nn.Module, example: Tensor) -> tuple[Any, list[Any]]:
    """(dependency graph, every coupled group rooted on a conv's or linear's output
    channels). What produces the network's outputs is never permuted (its inputs are, as a
    consumer), nor are attention's q/k/v projections (their heads move whole: `_order_heads`),
    nor chunked channels (each part would need the same order: they keep the trained one)."""
    from tasprune.models.attention import find_attention
    from tasprune.models.graph import chunked, dependency_graph, output_layers, quiet

    _tp()  # the clear error when Torch-Pruning is missing
    dg = dependency_graph(model, example)
    mods = dict(model.named_modules())
    outputs = [mods[n] for n in output_layers(model, (example,))]
    qkv = {mods[p] for att in find_attention(model)[0] for p in att.inside()}
    with quiet():
        groups = [
            g
            for g in dg.get_all_groups(ignored_layers=outputs, root_module_types=PERMUTED)
            if g[0].dep.target.module not in qkv and chunked(dg, g) is None
        ]
    return dg, groups


def _items(dg: Any, group: Any) -> list[tuple[Any, bool, list[int], list[int]]]:
    """(module, is_out_channels, local indices, root indices) of every member of a group; the
    "module" is a bare ``nn.Parameter`` for a traced parameter (e.g. a layer scale)."""
    out = []
    for item in group:
        dep = item.dep
        module = dep.target.module
        is_out = dg.is_out_channel_pruning_fn(dep.handler)
        out.append((module, is_out, list(item.idxs), list(item.root_idxs)))
    return out


def _bn_after(model: nn.Module) -> dict[nn.Conv2d, nn.BatchNorm2d]:
    """Conv -> the BatchNorm that directly follows it inside the same parent module."""
    out: dict[nn.Conv2d, nn.BatchNorm2d] = {}
    for parent in model.modules():
        children = list(parent.children())
        for a, b in zip(children, children[1:], strict=False):
            if isinstance(a, nn.Conv2d) and isinstance(b, nn.BatchNorm2d):
                out[a] = b
    return out


def group_importance(
    dg: Any, group: Any, criterion: Criterion, grads: dict[nn.Module, Tensor] | None = None
) -> Tensor | None:
    """Importance of each root channel of ``group`` (None when the criterion sees no member)."""
    total: Tensor | None = None
    count: Tensor | None = None
    for module, is_out, idxs, roots in _items(dg, group):
        if not is_out:
            continue
        if criterion == "l1" and isinstance(module, (nn.Conv2d, nn.Linear)):
            score = module.weight.detach()[idxs].flatten(1).abs().sum(1).float()
        elif criterion == "bn" and isinstance(module, nn.BatchNorm2d) and module.affine:
            score = module.weight.detach()[idxs].abs().float()
        elif criterion == "taylor" and isinstance(module, nn.BatchNorm2d) and module.affine:
            if grads is None or module not in grads:
                continue
            score = (module.weight.detach() * grads[module]).abs()[idxs].float()
        else:
            continue
        n = max(roots) + 1
        if total is None or count is None:
            total, count = torch.zeros(n), torch.zeros(n)
        if n > total.numel():
            total = F.pad(total, (0, n - total.numel()))
            count = F.pad(count, (0, n - count.numel()))
        root = torch.tensor(roots)
        total.scatter_add_(0, root, score.cpu())
        count.scatter_add_(0, root, torch.ones(len(roots)))
    if total is None or count is None:
        return None
    return total / count.clamp_min(1)


def _taylor_grads(
    model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], n_batches: int
) -> dict[nn.Module, Tensor]:
    """Sum over ``n_batches`` training batches of dL/dgamma of every affine BatchNorm."""
    work = copy.deepcopy(model).train()
    originals = dict(zip(work.modules(), model.modules(), strict=True))
    bns = [m for m in work.modules() if isinstance(m, nn.BatchNorm2d) and m.affine]
    for p in work.parameters():
        p.requires_grad_(False)
    for bn in bns:
        bn.weight.requires_grad_(True)
        bn.weight.grad = None
    seen = 0
    for x, y in batches:
        F.cross_entropy(work(x), y).backward()
        seen += 1
        if seen >= n_batches:
            break
    if seen == 0:
        raise ConfigError("the taylor criterion got no training batches. Fix: use l1 or bn")
    return {
        originals[bn]: bn.weight.grad.detach().clone() for bn in bns if bn.weight.grad is not None
    }


def _permute(
    module: nn.Module, is_out: bool, idxs: list[int], roots: list[int], order: list[int]
) -> None:
    """Apply the root permutation ``order`` (new position j holds old root channel order[j])
    to this member's channels ``idxs`` (paired with ``roots``). Only for members that
    :func:`_can_permute` accepts (the one place that says which can move)."""
    local_of = dict(zip(roots, idxs, strict=True))
    wanted = [local_of[r] for r in order if r in local_of]
    slots = sorted(wanted)

    def index(n: int) -> Tensor:
        idx = torch.arange(n)
        idx[torch.tensor(slots)] = torch.tensor(wanted)
        return idx

    with torch.no_grad():
        if isinstance(module, nn.Conv2d):
            depthwise = module.groups > 1 and module.groups == module.in_channels
            if is_out:
                ix = index(module.out_channels)
                module.weight.copy_(module.weight[ix])
                if module.bias is not None:
                    module.bias.copy_(module.bias[ix])
            elif depthwise:
                return  # its channels move with its output channels (the same group)
            else:  # groups == 1
                ix = index(module.in_channels)
                module.weight.copy_(module.weight[:, ix])
        elif isinstance(module, nn.BatchNorm2d):
            ix = index(module.num_features)
            for t in (module.weight, module.bias, module.running_mean, module.running_var):
                if t is not None:
                    t.copy_(t[ix])
        elif isinstance(module, nn.Linear) and is_out:
            ix = index(module.out_features)
            module.weight.copy_(module.weight[ix])
            if module.bias is not None:
                module.bias.copy_(module.bias[ix])
        elif isinstance(module, nn.Linear):  # its inputs
            ix = index(module.in_features)
            module.weight.copy_(module.weight[:, ix])
        # else: a traced op without state (add, activation, pooling): channels pass through


def _can_permute(module: Any, is_out: bool) -> bool:
    """Whether :func:`_permute` can move this member's channels (the same cases it handles)."""
    if not isinstance(module, nn.Module):
        return False  # a bare parameter
    if isinstance(module, nn.Conv2d):
        depthwise = module.groups > 1 and module.groups == module.in_channels
        return is_out or depthwise or module.groups == 1
    if isinstance(module, nn.BatchNorm2d):
        return True
    if isinstance(module, nn.Linear):
        return True
    stateful = any(True for _ in module.parameters(recurse=False)) or any(
        True for _ in module.buffers(recurse=False)
    )
    return not stateful  # a traced op without state (add, activation, pooling)


def _weight(model: nn.Module, name: str) -> Tensor:
    w = model.get_submodule(name).weight
    assert isinstance(w, Tensor)
    return w.detach()


def _order_heads(model: nn.Module) -> int:
    """Sort the heads of every multi-head attention module by the mean absolute value of
    their q, k and v rows and output-projection columns, most important first (whole heads
    move, with the tables that have one entry per head); returns how many modules changed."""
    from tasprune.models.attention import find_attention, permute_heads

    moved = 0
    for att in find_attention(model)[0]:
        score = torch.zeros(att.heads)
        out = _weight(model, att.out)
        for h in range(att.heads):
            for part, (layer, _) in enumerate(att.rows):
                w = _weight(model, layer)[att.part_rows(part, [h])]
                score[h] += float(w.abs().mean())
            score[h] += float(out[:, att.out_columns([h])].abs().mean())
        order = torch.argsort(score, descending=True, stable=True).tolist()
        if order != sorted(order):
            permute_heads(model, att, order)
            moved += 1
    return moved


def order_channels(
    model: nn.Module,
    criterion: Criterion,
    input_size: tuple[int, int, int],
    *,
    batches: Iterable[tuple[Tensor, Tensor]] | None = None,
    taylor_batches: int = 8,
) -> nn.Module:
    """A copy of ``model`` whose coupled channel groups are sorted by ``criterion``, most
    important first. It computes the same function as ``model``; ``model`` is unchanged.

    ``batches`` (training batches, normalised like the model's inputs) are needed for
    ``taylor``; ``input_size`` (C, H, W) traces the dependency graph."""
    if criterion not in ("l1", "bn", "taylor"):
        raise ConfigError(f"unknown channel order {criterion!r}. Fix: use l1, bn or taylor")
    work = copy.deepcopy(model).cpu().float().eval()
    grads = None
    if criterion == "taylor":
        if batches is None:
            raise ConfigError("the taylor criterion needs training batches. Fix: use l1 or bn")
        grads = _taylor_grads(work, batches, taylor_batches)
    work.requires_grad_(True)  # the graph is traced through autograd
    dg, groups = _groups(work, torch.randn(1, *input_size))
    moved = kept = 0
    for group in groups:
        scores = group_importance(dg, group, criterion, grads)
        if scores is None and criterion != "l1":  # no batch norm in the group: its weights
            scores = group_importance(dg, group, "l1")
        if scores is None:
            continue
        order = torch.argsort(scores, descending=True, stable=True).tolist()
        if order == sorted(order):
            continue
        members = _items(dg, group)
        if not all(_can_permute(module, is_out) for module, is_out, _, _ in members):
            kept += 1  # a member that cannot move (LayerNorm, layer scale, grouped conv input)
            continue
        for module, is_out, idxs, roots in members:
            _permute(module, is_out, idxs, roots, order)
        moved += 1
    work.requires_grad_(False)
    heads = _order_heads(work)
    logger.info(
        "teacher channels ordered by %s: %d of %d groups permuted%s",
        criterion,
        moved,
        len(groups),
        f"; {kept} left as trained (a layer in them cannot be reordered)" if kept else "",
    )
    if heads:
        logger.info("attention heads ordered by the L1 norm of their weights in %d modules", heads)
    device = next(model.parameters()).device
    return work.to(device).train(model.training)
