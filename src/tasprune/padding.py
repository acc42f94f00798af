"""Zero-padding a pruned network's channel groups up to a multiple, for runtimes whose kernels
work in blocks of channels (ONNX Runtime on CPU runs 8- or 16-channel blocks; a width of 20
costs it about what 24 costs, plus a slower path).

Every coupled group (found by Torch-Pruning's dependency graph, as for pruning) gets zero
channels appended after its last channel in every producer and consumer: a padded conv filter
is zero, its BN maps it to zero (scale 0, shift 0, mean 0, variance 1), consumers read it with
zero weights, so the network computes exactly the same function. Measured on the fmnist-r20
student (1 thread, batch 64, ONNX Runtime): 27.4 ms unpadded, 20.6 ms padded to 8, 21.4 ms to
16, teacher 32.1 ms (`bench/results/padding.md`). Eager PyTorch does not gain, so only ONNX
exports are padded.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

_NORMS = (nn.modules.batchnorm._BatchNorm,)


def _insert(t: Tensor, dim: int, at: int, n: int, value: float = 0.0) -> Tensor:
    shape = list(t.shape)
    shape[dim] = n
    filler = torch.full(shape, value, dtype=t.dtype, device=t.device)
    return torch.cat([t.narrow(dim, 0, at), filler, t.narrow(dim, at, t.shape[dim] - at)], dim)


def pad_channels(net: nn.Module, multiple: int, example: Tensor) -> int:
    """Pad ``net`` in place (every channel group to a multiple of ``multiple``); returns the
    number of groups padded. Groups that touch a layer other than conv, linear or BatchNorm
    (e.g. a LayerNorm) are left as they are."""
    from tasprune.models.graph import dependency_graph, eval_mode, output_layers

    if multiple <= 1:
        return 0
    names = {m: n for n, m in net.named_modules()}
    modules = dict(net.named_modules())
    heads = [modules[n] for n in output_layers(net, (example,))]
    with eval_mode(net):
        dg = dependency_graph(net, example)
    roots = (nn.Conv2d, nn.Linear)
    # (module, dim) -> [(position, count)]: all insertions, from one graph, applied at the end
    # from the highest position down so that earlier positions stay valid.
    plan: dict[tuple[nn.Module, str], list[tuple[int, int]]] = {}
    padded = 0
    for group in dg.get_all_groups(ignored_layers=heads, root_module_types=roots):
        k = len(group[0].idxs)
        n = math.ceil(k / multiple) * multiple - k
        if n == 0:
            continue
        edits: dict[tuple[nn.Module, str], tuple[int, int]] = {}
        ok = True
        for dep, idxs in group:
            mod = dep.target.module
            if mod not in names:
                continue  # an op node (add, concat, ...): nothing to pad
            if not isinstance(mod, (*roots, *_NORMS)):
                ok = False
                break
            out = dep.handler.__name__.startswith("prune_out")
            depthwise = isinstance(mod, nn.Conv2d) and 1 < mod.groups == mod.in_channels
            if isinstance(mod, nn.Conv2d) and mod.groups > 1 and not depthwise:
                ok = False  # a grouped conv: its group count would have to change
                break
            side = "out" if out or depthwise or isinstance(mod, _NORMS) else "in"
            edits[(mod, side)] = (max(int(i) for i in idxs) + 1, n)
        if not ok:
            continue
        for key, edit in edits.items():
            plan.setdefault(key, []).append(edit)
        padded += 1
    for (mod, side), inserts in plan.items():
        for at, n in sorted(inserts, reverse=True):
            _apply(mod, side, at, n)
    if padded:
        logger.info(
            "padded %d channel groups to multiples of %d (outputs unchanged)", padded, multiple
        )
    return padded


def _apply(mod: nn.Module, side: str, at: int, n: int) -> None:
    with torch.no_grad():
        if isinstance(mod, nn.Conv2d):
            if side == "out":
                mod.weight = nn.Parameter(_insert(mod.weight, 0, at, n))
                if mod.bias is not None:
                    mod.bias = nn.Parameter(_insert(mod.bias, 0, at, n))
                if mod.groups > 1:  # depthwise: its input grows with it
                    mod.groups += n
                    mod.in_channels += n
                mod.out_channels += n
            else:
                mod.weight = nn.Parameter(_insert(mod.weight, 1, at, n))
                mod.in_channels += n
        elif isinstance(mod, nn.Linear):
            if side == "out":
                mod.weight = nn.Parameter(_insert(mod.weight, 0, at, n))
                if mod.bias is not None:
                    mod.bias = nn.Parameter(_insert(mod.bias, 0, at, n))
                mod.out_features += n
            else:
                mod.weight = nn.Parameter(_insert(mod.weight, 1, at, n))
                mod.in_features += n
        elif isinstance(mod, _NORMS):
            bn: Any = mod
            if bn.weight is not None:
                bn.weight = nn.Parameter(_insert(bn.weight, 0, at, n))
                bn.bias = nn.Parameter(_insert(bn.bias, 0, at, n))
            if bn.running_mean is not None:
                bn.running_mean = _insert(bn.running_mean, 0, at, n)
                bn.running_var = _insert(bn.running_var, 0, at, n, 1.0)
            bn.num_features += n
