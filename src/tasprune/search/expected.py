"""The search's probabilities: Gumbel sampling of the candidates mixed in a forward, and the
cost algebra over the width and depth distributions (`ExpectedAlgebra`): the model's own cost
function evaluated on it gives the differentiable expected FLOPs, params and latency, and its
``hard`` form the exact cost of the argmax shape without a host round trip.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from tasprune.latency_table import LatencyTable, Op
    from tasprune.search.choice import Choice

SuperNet = Any  # tasprune.search.supernet.SuperNet (which imports this module)


def gumbel_select(
    logits: Tensor, tau: float, num: int | None, generator: torch.Generator | None = None
) -> tuple[list[int], Tensor]:
    """Draw ``num`` distinct candidates from Gumbel-perturbed probabilities.

    Returns the indices (no gradient through the draw) and their mixing weights: a softmax over
    the perturbed logits of the drawn candidates, so gradient reaches every drawn logit.
    ``num=None`` (or >= the number of candidates) mixes all candidates (Gumbel-softmax).
    """
    for _ in range(100):
        # Noise is drawn on the CPU from the search's own generator (reproducible anywhere).
        u = torch.empty(logits.shape).exponential_(generator=generator).to(logits.device)
        perturbed = (logits.log_softmax(-1) - u.log()) / tau
        probs = perturbed.softmax(-1)
        if torch.isfinite(perturbed).all() and torch.isfinite(probs).all():
            break
    n = logits.numel()
    if num is None or num >= n:
        return list(range(n)), probs
    with torch.no_grad():
        cpu_probs = probs.detach().cpu() + 1e-7
        idx = torch.multinomial(cpu_probs, num, replacement=False, generator=generator)
    idx_list = [int(i) for i in idx]
    return idx_list, perturbed[idx].softmax(-1)


@dataclass
class Dist:
    """A channel count as a distribution; ``key`` identifies perfectly correlated copies."""

    key: int
    values: Tensor
    probs: Tensor
    host: tuple[int, ...]  # ``values`` on the host (table lookups without a device read)

    def mean(self) -> Tensor:
        return (self.values * self.probs).sum()


class ExpectedAlgebra:
    """Cost algebra over the plain-softmax (no Gumbel) width and depth distributions.

    ``hard``: every distribution one-hot at its argmax, so the result is the exact cost of the
    argmax shape, computed on the logits' device without a host round trip."""

    def __init__(self, net: SuperNet, *, hard: bool = False) -> None:
        self._keys = itertools.count(-1, -1)
        self.net = net
        dtype = torch.float64
        self.device = net._device()

        def probs(choice: Choice) -> Tensor:
            p = net.probs(choice).to(dtype)
            if hard:
                p = F.one_hot(p.argmax(), p.numel()).to(dtype)
            return p

        self.dists: dict[str, Dist] = {}
        for i, choice in enumerate(net.width_choices.values()):
            values = torch.tensor(choice.candidates, dtype=dtype, device=self.device)
            self.dists[choice.name] = Dist(i, values, probs(choice), tuple(choice.candidates))
        self.depth_probs = {c.name: probs(c) for c in net.depth_choices.values()}

    def const(self, channels: int) -> Dist:
        one = torch.ones(1, dtype=torch.float64, device=self.device)
        return Dist(next(self._keys), one * channels, one, (channels,))

    def width(self, name: str) -> Dist:
        return self.dists[self.net.width_of[name].name]

    def keep(self, stage: str, index: int) -> Tensor:
        choice = self.net.depth_of[stage]
        probs = self.depth_probs[choice.name]
        kept = [p for d, p in zip(choice.candidates, probs, strict=True) if d > index]
        return torch.stack(kept).sum() if kept else probs.new_zeros(())

    def stage_output(self, stage: str, outs: Sequence[Dist]) -> Dist:
        choice = self.net.depth_of[stage]
        probs = self.depth_probs[choice.name]
        parts = [(outs[d - 1], p) for d, p in zip(choice.candidates, probs, strict=True)]
        if len({d.key for d, _ in parts}) == 1:
            return parts[0][0]
        values = torch.cat([d.values for d, _ in parts])
        mixed = torch.cat([d.probs * p for d, p in parts])
        host = tuple(v for d, _ in parts for v in d.host)
        return Dist(next(self._keys), values, mixed, host)

    def mean(self, d: Dist) -> Tensor:
        return d.mean()

    def prod(self, a: Dist, b: Dist) -> Tensor:
        if a.key == b.key:
            return (a.values * a.values * a.probs).sum()
        return a.mean() * b.mean()

    def _differ(self, a: Dist, b: Dist) -> Tensor:
        """Joint probability table of independent a, b restricted to a != b."""
        joint = a.probs[:, None] * b.probs[None, :]
        return joint * (a.values[:, None] != b.values[None, :])

    def proj(self, a: Dist, b: Dist, stride: int) -> Tensor | int:
        if stride != 1:
            return self.prod(a, b)
        if a.key == b.key:
            return 0
        return (self._differ(a, b) * a.values[:, None] * b.values[None, :]).sum()

    def lookup(
        self, table: LatencyTable, op: Op, a: Dist, b: Dist, *, differ: bool = False
    ) -> Tensor | int:
        m = table.matrix(op, a.host, b.host, self.device)
        if a.key == b.key:  # one channel count on both sides (a depthwise conv)
            return 0 if differ else (torch.diagonal(m) * a.probs).sum()
        joint = self._differ(a, b) if differ else a.probs[:, None] * b.probs[None, :]
        return (joint * m).sum()

    def total(self, parts: Sequence[tuple[Dist, int]]) -> Dist:
        """The distribution of sum(m * x) over independent parts: equal sums merged, so it
        has at most (full channel count + 1) values."""
        if len(parts) == 1 and parts[0][1] == 1:
            return parts[0][0]
        host: list[int] = [0]
        probs = torch.ones(1, dtype=torch.float64, device=self.device)
        for d, m in parts:
            sums = [h + v * m for h in host for v in d.host]
            joint = (probs[:, None] * d.probs[None, :]).reshape(-1)
            merged = sorted(set(sums))
            where = {v: i for i, v in enumerate(merged)}
            index = torch.tensor([where[v] for v in sums], device=self.device)
            probs = torch.zeros(len(merged), dtype=joint.dtype, device=self.device).index_add(
                0, index, joint
            )
            host = merged
        values = torch.tensor(host, dtype=torch.float64, device=self.device)
        return Dist(next(self._keys), values, probs, tuple(host))
