"""The analysis checked against the network itself: every searchable group pruned to about
half on a copy must run, keep the outputs' shapes and cost exactly what the cost function
predicts (`torch.utils.flop_counter`'s count); the groups that break it (an op the graph does
not follow, such as a channel slice) are found by bisection and left unsearched.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch

from tasprune.errors import ConfigError
from tasprune.models.algebra import Counter, ExactAlgebra
from tasprune.models.analysis import Traced, call_shapes, output_shapes
from tasprune.models.layer_cost import Layers, cost_layers, counting, traced_cost
from tasprune.models.prune import prune_with
from tasprune.models.sources import call, images_in

logger = logging.getLogger(__name__)


def verify(self: Traced) -> None:
    """Prune every searchable group to about half on a copy and check that the network
    runs and its counted FLOPs equal the prediction; when not, find the groups that
    break it (the graph missed an op, e.g. a channel slice) and leave them unsearched."""
    try:  # the unpruned network's layers: the same for every trial
        found = cost_layers(self, copy.deepcopy(self.template), self.example)
    except Exception as err:
        raise _undescribed(self, _why(err)) from None
    if (why := _trial(self, [], found)) is not None:
        raise _undescribed(self, why)
    if rest := found[2]:
        logger.info(
            "%s: %d MACs per image are in no layer tasprune reads (the token products of an "
            "attention whose heads it does not read, say); they count as a constant, checked "
            "under pruning",
            self.model,
            rest,
        )
    stages = list(self.stages)
    if stages and (why := _trial(self, [], found, stages)) is not None:
        logger.info("%s: the shallowest network fails (%s); finding which stages", self.model, why)
        broken = [s for s in stages if _trial(self, [], found, [s]) is not None]
        for s in broken:
            logger.info(
                "%s: the depth of %s is kept (dropping its blocks breaks it)", self.model, s
            )
        self.drop_stages(broken)
        found = cost_layers(self, copy.deepcopy(self.template), self.example)
    names = [n for n, g in self.groups.items() if g.fixed is None and g.full > g.multiple]
    if names and (why := _trial(self, names, found)) is not None:
        logger.info("%s: pruning all groups fails (%s); finding which", self.model, why)
        _bisect(self, names, found)
        left = [n for n in names if self.groups[n].fixed is None]
        if left and (why := _trial(self, left, found)) is not None:  # only in combination
            for n in left:
                self.groups[n].fixed = f"pruning it with the others breaks the network ({why})"


def _bisect(self: Traced, names: list[str], found: Layers) -> None:
    """Fix the groups of ``names`` whose pruning breaks the network (``names`` as a whole
    is known to): halves that prune cleanly are cleared in one trial."""
    if len(names) == 1:
        why = _trial(self, names, found)
        self.groups[names[0]].fixed = f"pruning it breaks the network ({why})"
        return
    for half in (names[: len(names) // 2], names[len(names) // 2 :]):
        if _trial(self, half, found) is not None:
            _bisect(self, half, found)


def _undescribed(self: Traced, why: str) -> ConfigError:
    return ConfigError(
        f"{self.model}: the traced graph does not describe the network ({why}). Fix: "
        "search only a sub-module that traces, or report it with the model name"
    )


def _why(err: Exception) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"


def _trial(
    self: Traced, names: list[str], found: Layers, shallow: list[str] | None = None
) -> str | None:
    """Prune the groups ``names`` to about half (and the stages ``shallow`` to one block) on a
    copy: None when it runs, keeps the outputs and costs what ``found`` (the unpruned
    network's layers) predicts; else why."""
    half = {}
    for n in names:
        g = self.groups[n]
        half[n] = max(g.multiple, g.full // 2 // g.multiple * g.multiple)
    shape = self.full_shape().replace(widths=half, depths=dict.fromkeys(shallow or [], 1))
    try:
        net = prune_with(self, copy.deepcopy(self.template), shape, self.example).eval()
        batch = _first_batch(net, images_in(self.example))
        with counting(net) as fc:
            y = call(net, self.example)
        batch.remove()
        c = Counter(ExactAlgebra(shape))
        traced_cost(self, c, found)
    except Exception as err:
        return _why(err)
    if (got := output_shapes(y)) != self.output_shapes and not _same_heads(self, net, got):
        return f"outputs {got}, not {self.output_shapes}"
    # The cost is per image (a layer's output size without its batch dimension); the
    # example may hold several (a detector in train mode needs two for its batch norms).
    counted = fc.get_total_flops() // 2
    if counted != int(c.flops) * batch.size:
        return f"counted {counted} MACs, predicted {int(c.flops) * batch.size}"
    return None


def _same_heads(self: Traced, net: torch.nn.Module, got: list[tuple[int, ...]]) -> bool:
    """Outputs whose sizes depend on the data (a detector's kept boxes: the pruned copy scores
    differently) differ in shape while the network is right. They are accepted when they
    have the same structure (as many tensors, of the same ranks) and every layer producing the
    outputs (kept at full width) gives the shapes it gives in the full network."""
    if [len(s) for s in got] != [len(s) for s in self.output_shapes]:
        return False
    heads = sorted(self.outputs)
    if self.head_shapes is None:
        self.head_shapes = call_shapes(copy.deepcopy(self.template).eval(), self.example, heads)
    return call_shapes(net.eval(), self.example, heads) == self.head_shapes


class _first_batch:
    """The images of one call of ``net``: ``images`` where the example tells them, else the
    batch size of the first conv/linear input."""

    def __init__(self, net: torch.nn.Module, images: int | None = None) -> None:
        self.size = images or 1
        self._seen = images is not None
        self._hooks = [
            m.register_forward_hook(self._hook)
            for m in net.modules()
            if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear))
        ]

    def _hook(self, module: torch.nn.Module, args: tuple[Any, ...], out: Any) -> None:
        if not self._seen and args and isinstance(args[0], torch.Tensor):
            self.size = int(args[0].shape[0]) if args[0].dim() >= 2 else 1
            self._seen = True

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
