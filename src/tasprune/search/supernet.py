"""The searchable network: any model's own network with its width and depth mixtures
(`tasprune.search.traced`) + the architecture logits.

`SuperNet.forward(x)` always returns logits. Which sub-network runs is decided before each
forward from the architecture distributions: Gumbel-sampled candidates in training mode, the
argmax in eval mode, or a given Shape inside ``with supernet.fixed(shape):``. Expected FLOPs and
params come from `expected_cost()`, which evaluates the model's own cost function on the width
and depth distributions.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from tasprune.budget import Budget
from tasprune.config import SpaceOptions
from tasprune.cost import model_cost
from tasprune.errors import ConfigError
from tasprune.models import get_model_spec
from tasprune.models.algebra import CostAlgebra, Counter, ExactAlgebra
from tasprune.search.choice import Choice
from tasprune.search.expected import ExpectedAlgebra, gumbel_select
from tasprune.search.space import choice_widths, depth_candidates
from tasprune.search.traced import (
    plain_state,
    reset_candidate_affine,
    searchable_network,
)
from tasprune.shape import Shape

if TYPE_CHECKING:
    from tasprune.latency_table import LatencyTable


def _key(name: str) -> str:
    return name.replace(".", "__")


class SuperNet(nn.Module):
    """A model turned into a TAS search space with learnable width/depth logits."""

    @classmethod
    def for_input(
        cls,
        model: str,
        input_size: tuple[int, ...],
        num_classes: int,
        options: SpaceOptions | None = None,
    ) -> SuperNet:
        """The supernet for inputs of ``input_size`` (C, H, W) and ``num_classes`` outputs."""
        return cls(
            model,
            num_classes=num_classes,
            in_channels=input_size[0],
            input_size=(input_size[1], input_size[2]),
            options=options,
        )

    def __init__(
        self,
        model: str,
        *,
        num_classes: int = 10,
        in_channels: int = 3,
        input_size: tuple[int, int] | None = None,
        options: SpaceOptions | None = None,
    ) -> None:
        super().__init__()
        spec = get_model_spec(model)
        opts = options or SpaceOptions()
        self.model_name = model
        self.options = opts
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.input_size = input_size or spec.default_input[1:]
        self.full_shape = spec.full_shape()
        self.tau = 5.0
        self.generator: torch.Generator | None = None
        self._fixed: Shape | None = None

        # Width choices: one per conv, or one per residual stream when tied.
        self.width_of: dict[str, Choice] = {}
        self.width_choices: dict[str, Choice] = {}
        groups: list[list[str]] = []
        if opts.tie_residual:
            groups = spec.residual_groups()
        grouped = {n for g in groups for n in g}
        groups += [[n] for n in self.full_shape.widths if n not in grouped]
        logits: dict[str, nn.Parameter] = {}
        for group in groups:
            full = self.full_shape.widths[group[0]]
            cands = choice_widths(spec, group[0], full, opts)
            name = group[0] if len(group) == 1 else f"{group[0]}+{len(group) - 1}"
            key = _key(name) if len(cands) > 1 else None
            choice = Choice(name, "width", cands, key, members=list(group))
            self.width_choices[name] = choice
            for member in group:
                self.width_of[member] = choice
            if key is not None:
                logits[key] = nn.Parameter(torch.randn(len(cands)) * 1e-2)
        self.width_logits = nn.ParameterDict(logits)

        self.depth_of: dict[str, Choice] = {}
        depth_logits: dict[str, nn.Parameter] = {}
        for stage, blocks in self.full_shape.depths.items():
            cands = depth_candidates(blocks) if opts.search_depth else [blocks]
            key = _key(stage) if len(cands) > 1 else None
            self.depth_of[stage] = Choice(stage, "depth", cands, key, members=[stage])
            if key is not None:
                depth_logits[key] = nn.Parameter(torch.randn(len(cands)) * 1e-2)
        self.depth_logits = nn.ParameterDict(depth_logits)
        self.depth_choices = {c.name: c for c in self.depth_of.values()}

        for c in self.all_choices():
            c.select_full()
        self.net = searchable_network(self, model)  # its own network, searchable in place
        self.full_flops, self.full_params = model_cost(
            model, None, (in_channels, *self.input_size), num_classes
        )
        # Latency: a measured table and the model's rest (`tasprune.search.latency`).
        self.latency_table: LatencyTable | None = None
        self.latency_fit = (1.0, 0.0)
        self.full_latency = 0.0
        self.latency_info: dict[str, Any] | None = None  # what shape.json records of the table

    def attach_latency(self, table: LatencyTable, fit: tuple[float, float]) -> None:
        """Predict latency as ``scale * (the table's layers) + rest_ms`` (``fit``) from now on."""
        self.latency_table, self.latency_fit = table, fit
        self.full_latency = self.shape_costs(self.full_shape)["latency"]

    # ---------------------------------------------------------------- choices and logits
    def all_choices(self) -> list[Choice]:
        return [*self.width_choices.values(), *self.depth_choices.values()]

    def logits_of(self, choice: Choice) -> Tensor | None:
        if choice.key is None:
            return None
        table = self.width_logits if choice.kind == "width" else self.depth_logits
        return table[choice.key]

    def probs(self, choice: Choice) -> Tensor:
        """Plain softmax of a choice's logits (a fixed choice has probability 1)."""
        logits = self.logits_of(choice)
        if logits is None:
            return torch.ones(1, device=self._device())
        return logits.softmax(-1)

    def arch_parameters(self) -> list[nn.Parameter]:
        return [*self.width_logits.values(), *self.depth_logits.values()]

    def weight_parameters(self) -> list[nn.Parameter]:
        return list(self.net.parameters())

    def _device(self) -> torch.device:
        return next(self.net.parameters()).device

    # ---------------------------------------------------------------- forward
    def select(self) -> None:
        """Decide the sub-network of the next forward (see the class docstring)."""
        if self._fixed is not None:
            shape = self._fixed
            for c in self.width_choices.values():
                c.select_value(shape.widths[c.members[0]])
            for c in self.depth_choices.values():
                c.select_value(shape.depths[c.name])
            return
        sample = self.training
        for c in self.all_choices():
            logits = self.logits_of(c)
            if logits is None:
                c.select_full()
            elif not sample:
                c.selected = [(int(logits.argmax()), c.candidates[int(logits.argmax())], 1.0)]
            else:
                num = self.options.sampled if c.kind == "width" else None
                idx, weights = gumbel_select(logits, self.tau, num, self.generator)
                c.selected = [(i, c.candidates[i], weights[n]) for n, i in enumerate(idx)]

    def forward(self, x: Tensor) -> Tensor:
        self.select()
        return self.net(x)

    @contextmanager
    def fixed(self, shape: Shape) -> Iterator[None]:
        """Run the sub-network of ``shape`` (every width must be a candidate)."""
        shape.validate_against(self.full_shape, self.model_name)
        for c in self.width_choices.values():
            values = {shape.widths[m] for m in c.members}
            if len(values) != 1 or values.pop() not in c.candidates:
                raise ConfigError(
                    f"shape widths of {c.members[:2]} are not one candidate of {c.candidates}"
                )
        previous, self._fixed = self._fixed, shape
        try:
            yield
        finally:
            self._fixed = previous

    # ---------------------------------------------------------------- cost and result
    def _count(self, alg: CostAlgebra) -> dict[str, Any]:
        counter = Counter(alg, self.latency_table)
        spec = get_model_spec(self.model_name)
        spec.cost(counter, self.in_channels, self.input_size, self.num_classes)
        out = {"flops": counter.flops, "params": counter.params}
        if self.latency_table is not None:
            scale, rest = self.latency_fit
            out["latency"] = scale * counter.latency + rest
        return out

    def expected_costs(self) -> dict[str, Tensor]:
        """Differentiable expected cost under the architecture distributions, per metric
        ("flops", "params", and "latency" in ms when a latency table is attached)."""
        return self._count(ExpectedAlgebra(self))

    def argmax_costs(self) -> dict[str, Tensor]:
        """Exact cost of the argmax shape per metric as 0-d tensors on the logits' device
        (equal to ``shape_costs(derive())``; no host synchronisation)."""
        return {k: v.detach() for k, v in self._count(ExpectedAlgebra(self, hard=True)).items()}

    def shape_costs(self, shape: Shape) -> dict[str, float]:
        """Exact cost of the pruned network of ``shape`` per metric (latency: predicted), from
        one evaluation of the cost function."""
        shape.validate_against(self.full_shape, self.model_name)
        out = self._count(ExactAlgebra(shape))
        out["flops"], out["params"] = int(out["flops"]), int(out["params"])
        if "latency" in out:
            out["latency"] = float(out["latency"])
        return out

    def full_cost(self, metric: str) -> float:
        """The unpruned network's cost in ``metric``."""
        return {"flops": self.full_flops, "params": self.full_params, "latency": self.full_latency}[
            metric
        ]

    def expected_cost(self) -> tuple[Tensor, Tensor]:
        """Differentiable expected (FLOPs, params) under the architecture distributions."""
        costs = self.expected_costs()
        return costs["flops"], costs["params"]

    def argmax_cost(self) -> tuple[Tensor, Tensor]:
        """Exact (FLOPs, params) of the argmax shape as 0-d tensors on the logits' device."""
        costs = self.argmax_costs()
        return costs["flops"], costs["params"]

    def sample(self, rng: random.Random) -> Shape:
        """A shape drawn uniformly from the space: every width and depth choice takes a
        uniformly drawn candidate (tied widths one value)."""
        widths: dict[str, int] = {}
        for c in self.width_choices.values():
            value = rng.choice(c.candidates)
            for member in c.members:
                widths[member] = value
        depths = {c.name: rng.choice(c.candidates) for c in self.depth_choices.values()}
        return Shape(widths=widths, depths=depths)

    def derive(self) -> Shape:
        """The argmax shape: the most probable width of every conv and depth of every stage."""
        widths: dict[str, int] = {}
        for name in self.full_shape.widths:
            c = self.width_of[name]
            widths[name] = c.candidates[int(self.probs(c).argmax())]
        depths = {s: c.candidates[int(self.probs(c).argmax())] for s, c in self.depth_of.items()}
        return Shape(widths=widths, depths=depths)

    def project(self, shape: Shape, budget: Budget) -> Shape:
        """The shape nearest to ``shape`` (in the architecture's log-probabilities) whose
        exact cost (``budget``'s metric) lies in its band, moving one choice one candidate at a time.

        Over budget: repeatedly take the step down (narrower width or shallower stage) that
        saves the most FLOPs per unit of log-probability given up, among the steps that do
        not fall under the band if there are any; under the band: the step up
        that adds the most FLOPs per unit given up without overshooting the target, or, if
        every step overshoots, the one that overshoots least (then down again). A short
        search that ends outside the band still yields an in-band shape this way (the
        smallest shape of the space permitting); ``shape`` itself when already inside.
        """
        metric = budget.metric
        low, high = budget.bounds(self.full_cost(metric))
        choices = [c for c in self.all_choices() if len(c.candidates) > 1]
        logp = {c.name: self.probs(c).detach().double().clamp_min(1e-12).log() for c in choices}
        index: dict[str, int] = {}
        for c in choices:
            member = c.members[0]
            value = shape.widths[member] if c.kind == "width" else shape.depths[member]
            index[c.name] = c.candidates.index(value)

        def build(idx: dict[str, int]) -> Shape:
            widths, depths = dict(shape.widths), dict(shape.depths)
            for c in choices:
                target = widths if c.kind == "width" else depths
                for member in c.members:
                    target[member] = c.candidates[idx[c.name]]
            return Shape(widths=widths, depths=depths)

        cost = self.shape_costs(shape)[metric]
        seen = {tuple(index.values())}
        # The largest visited shape within the target: kept if none lands in the band.
        fb_idx, fb_cost = (dict(index), cost) if cost <= high else (None, -1.0)
        while not low <= cost <= high:
            down = cost > high
            # (lands on the right side of the band, score, trial, cost). Going down, a step
            # that stays at or above the floor beats one that falls under it; going up, one
            # that stays at or under the target beats one that overshoots it. When every step
            # up overshoots (tied residual widths and depths move in large steps), the least
            # overshooting one is taken and the next steps come down from above; shapes
            # already visited are skipped, so this ends.
            best: tuple[bool, float, dict[str, int], float] | None = None
            for c in choices:
                i = index[c.name] + (-1 if down else 1)
                if not 0 <= i < len(c.candidates):
                    continue
                trial = {**index, c.name: i}
                if tuple(trial.values()) in seen:
                    continue
                new = self.shape_costs(build(trial))[metric]
                gain = cost - new if down else new - cost
                if gain <= 0:
                    continue
                given_up = float(logp[c.name][index[c.name]] - logp[c.name][i])
                score = gain / (max(given_up, 0.0) + 1e-6)
                key = (new >= low, score) if down else (new <= high, score if new <= high else -new)
                if best is None or key > best[:2]:
                    best = (*key, trial, new)
            if best is None:
                break  # at the space's edge, or every reachable shape was visited
            index, cost = best[2], best[3]
            seen.add(tuple(index.values()))
            if cost <= high and cost > fb_cost:
                fb_idx, fb_cost = dict(index), cost
        if not low <= cost <= high and fb_idx is not None:
            index = fb_idx
        return build(index)

    def shape_cost(self, shape: Shape) -> tuple[int, int]:
        """Exact (FLOPs, params) of the pruned network of ``shape`` at this input size."""
        return model_cost(
            self.model_name, shape, (self.in_channels, *self.input_size), self.num_classes
        )

    def entropy(self) -> dict[str, float]:
        """Entropy of every searchable distribution, normalised to [0, 1] (1 = uniform)."""
        out = {}
        for c in self.all_choices():
            logits = self.logits_of(c)
            if logits is None:
                continue
            p = logits.detach().softmax(-1)
            h = -(p * p.clamp_min(1e-12).log()).sum()
            out[c.name] = float(h / math.log(len(c.candidates)))
        return out

    # ---------------------------------------------------------------- weight transfer
    def load_plain_weights(self, state: dict[str, Tensor]) -> None:
        """Warm-start from a trained unpruned plain model of the same name (same param names);
        a per-candidate BatchNorm affine starts from the plain BN's."""
        own = self.net.state_dict()
        copied = 0
        for key, value in state.items():
            if key in own and own[key].shape == value.shape:
                own[key].copy_(value)
                copied += 1
        if copied == 0:
            raise ConfigError(
                f"the teacher weights share no tensor with {self.model_name} (first key "
                f"{next(iter(state), 'none')!r}). Fix: pass the unpruned network's state_dict "
                "(for a model from tasprune.load: model.net.state_dict())"
            )
        self.net.load_state_dict(own)
        reset_candidate_affine(self.net)

    def plain_state_dict(self, shape: Shape) -> dict[str, Tensor]:
        """Weights for ``create_model(model, shape)``: the supernet's network pruned to
        ``shape`` (leading channels of every group, the kept blocks)."""
        spec = get_model_spec(self.model_name)
        return spec.transfer(plain_state(self, shape), shape, self.num_classes, self.in_channels)


__all__ = ["SuperNet"]
