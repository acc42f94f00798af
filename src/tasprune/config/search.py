"""The settings of a TAS search: `SearchConfig` (budget, schedule, architecture optimiser) and
the search-space options it yields (`SpaceOptions`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasprune.budget import Budget
from tasprune.errors import ConfigError

__all__ = ["DEFAULT_FRACTIONS", "SearchConfig", "SpaceOptions"]

DEFAULT_FRACTIONS: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


class SpaceOptions(BaseModel):
    """What is searched and how candidates are mixed (the paper's ablation axes). Declared
    once: a `SearchConfig` is a SpaceOptions with the budget and the schedule added, and
    ``SearchConfig.space()`` is its SpaceOptions part."""

    model_config = ConfigDict(extra="forbid")

    width_fractions: tuple[float, ...] = Field(
        default=DEFAULT_FRACTIONS, description="candidate widths / unpruned width"
    )
    search_width: bool = Field(default=True, description="search the widths")
    search_depth: bool = Field(default=True, description="search the depths")
    num_sampled: int | Literal["all"] = Field(
        default=2, description="candidates mixed per width choice and forward (I), or 'all'"
    )
    # How the sampled widths are mixed. The paper's channel-wise interpolation and one BN
    # affine per candidate are options: zero-padding with one affine matched or beat the
    # earlier per-conv units that did both on the fmnist protocols (docs/results.md), and
    # costs about half as much per search step.
    align: Literal["cwi", "pad"] = Field(
        default="pad", description="cwi: channel-wise interpolation; pad: zero-padding"
    )
    candidate_affine: bool = Field(
        default=False, description="one BatchNorm affine per candidate width (the paper's)"
    )
    # One residual width per stage (no projection shortcuts the teacher lacks). Default on:
    # fmnist-r56 students 90.06 +- 0.06% tied vs 88.13 +- 0.91% per-block (the paper's; its
    # recipes in configs/ set false), ResNet-20 a tie (bench/results/shortcuts-*.md).
    tie_residual: bool = Field(
        default=True,
        description="one width choice per residual stream (false: one per conv, the paper's)",
    )
    # A transformer's embedding width is normalised by LayerNorms, whose statistics change
    # under the search's masks: the searched network only approximates the pruned one there.
    # Off: on the ViT protocol it did not help (82.68 +- 0.19 against 82.65 +- 0.04 without).
    search_embedding: bool = Field(
        default=False,
        description="search the width of the token stream attention reads (the embedding)",
    )
    width_multiple: int = Field(
        default=1, ge=1, description="round width candidates to multiples of this"
    )
    width_snap: int = Field(
        default=1,
        ge=1,
        description="round width candidates up to multiples of this (a runtime's channel block)",
    )

    @model_validator(mode="after")
    def _check_space(self) -> SpaceOptions:
        if not self.width_fractions or any(not 0 < f <= 1 for f in self.width_fractions):
            raise ValueError("width_fractions must be fractions in (0, 1]")
        if isinstance(self.num_sampled, int) and self.num_sampled < 1:
            raise ValueError("num_sampled must be >= 1 or 'all'")
        if not (self.search_width or self.search_depth):
            raise ValueError("search_width and search_depth cannot both be false")
        return self

    @property
    def sampled(self) -> int | None:
        """Candidates mixed per width choice and forward; None: all of them."""
        return None if self.num_sampled == "all" else self.num_sampled


class SearchConfig(SpaceOptions):
    """One search: budget, schedule, architecture optimiser, and the search space options it
    inherits from `SpaceOptions`."""

    model_config = ConfigDict(extra="forbid")

    # Budget: keep the argmax shape's FLOPs in [flops_ratio - tolerance, flops_ratio] x unpruned.
    # With latency_ratio, the predicted latency is the budget (and FLOPs only when flops_ratio
    # is given as well).
    flops_ratio: float | None = Field(
        default=0.5,
        gt=0,
        le=1,
        description="target FLOPs / unpruned FLOPs (beside a latency_ratio: only when given)",
    )
    tolerance: float = Field(default=0.05, ge=0, lt=1)  # width of the band below the target
    budget_weight: float = Field(default=2.0, ge=0)  # lambda of the log-barrier budget loss
    params_ratio: float | None = Field(default=None, gt=0, le=1)  # optional params budget

    # Latency budget: predicted latency / the unpruned network's, from a per-layer table
    # measured in the runtime, thread count and batch size the network deploys with.
    latency_ratio: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="target predicted latency / unpruned latency (a measured per-layer table)",
    )
    latency_runtime: Literal["eager", "onnxruntime", "onnxruntime-int8"] = Field(
        default="onnxruntime",
        description="runtime the latency is measured in (onnxruntime-int8: what "
        "'tasprune export --int8' ships)",
    )
    latency_batch: int = Field(default=64, ge=1, description="batch the latency is measured at")
    latency_threads: int = Field(
        default=1, ge=1, description="intra-op threads the latency is measured with"
    )
    latency_table: str | None = None  # a table file; None: the cache's file for the key
    # ONNX Runtime latency budget: width candidates rounded up to the runtime's 8-channel
    # blocks (the padded export runs those widths anyway, so the extra channels are free).
    latency_snap: bool = True

    # Schedule of the network weights (split A of the training set).
    epochs: int = Field(default=600, ge=1, description="passes over split A")
    batch_size: int = Field(default=256, ge=1, description="images per step, on each split")
    lr: float = Field(default=0.1, gt=0)  # peak learning rate, cosine to 0
    optimizer: Literal["sgd", "adamw"] = Field(
        default="sgd", description="of the weights: sgd (momentum) or adamw"
    )
    momentum: float = Field(default=0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(default=5e-4, ge=0)
    warmup_epochs: int = Field(default=0, ge=0)

    # Architecture optimiser (split B): Adam on the width/depth logits.
    arch_lr: float = Field(default=1e-3, gt=0, description="architecture Adam lr")
    arch_betas: tuple[float, float] = (0.5, 0.999)
    # No decay on the logits by default: the paper's 1e-3 pulls them back to uniform, so the
    # fmnist-r20-f30 searches ended undecided (entropy 0.43-0.47) and its TAS+KD students at
    # 90.86 +- 0.23%; at 0 they end at 0.27-0.32 and 91.18 +- 0.05% (bench/results/
    # fmnist-r20-wd0-f30.md). The paper's recipes in configs/ set 0.001.
    arch_weight_decay: float = Field(default=0.0, ge=0)

    # How the architecture steps interleave with the weight steps. "alternate" (the paper):
    # a weight step on split A, then an architecture step on split B, every ``arch_every``-th
    # weight step (1: every one). "joint": one forward per batch serves both (first-order,
    # one split: A and B together), its loss the task loss plus the budget loss; about 1.4x
    # a plain step instead of 2.4x (bench/results/search_cost_modes.md). The default since
    # fmnist-r20 and fmnist-r56 measured it level with the alternation (docs/results.md).
    arch_step: Literal["alternate", "joint"] = "joint"
    arch_every: int = Field(
        default=1, ge=1, description="alternate: an architecture step every k weight steps"
    )

    # Epochs of weight steps alone before the first architecture step: every width is sampled
    # from the logits' initial (uniform) distribution and no budget loss applies, so these
    # epochs are the same whatever the budget; `tasprune sweep` runs them once and every
    # budget's search continues from them. The temperature anneals over the epochs after.
    warm_epochs: int = Field(default=0, ge=0)

    # Gumbel temperature, cosine-annealed from tau_max to tau_min over the epochs.
    tau_max: float = Field(default=5.0, gt=0)
    tau_min: float = Field(default=0.1, gt=0)

    # The search space: SpaceOptions' fields (inherited).
    warm_start: bool = True  # start supernet weights from the teacher when one is given
    keep: Literal["last", "best"] = "last"  # which in-band shape becomes shape.json
    # Fraction of split B the architecture steps never see: the validation images that rank
    # the in-band shapes (keep: best) and give the epochs' valid_top1. 0: validate on B itself.
    holdout: float = Field(default=0.1, ge=0, lt=1)
    valid_batches: int | None = Field(default=20, ge=1)  # validation batches per epoch
    seed: int = Field(default=0, ge=0)
    deterministic: bool = False
    channels_last: Literal["auto", "on", "off"] = "auto"
    # As the training engine's (TrainConfig): bf16 autocast of both forwards on CUDA, a max
    # global L2 norm of the weight gradients, torch.compile of the weight step's forward.
    amp: bool = True
    grad_clip: float | None = Field(default=None, gt=0)
    compile: bool = False

    @model_validator(mode="after")
    def _check(self) -> SearchConfig:
        if self.latency_ratio is not None and "flops_ratio" not in self.model_fields_set:
            self.flops_ratio = None  # a latency budget alone: the FLOPs default does not apply
        if self.flops_ratio is None and self.latency_ratio is None:
            raise ValueError("set flops_ratio or latency_ratio (or both)")
        if self.arch_every != 1 and "arch_step" not in self.model_fields_set:
            self.arch_step = "alternate"  # every k-th step: the alternation's schedule
        if self.arch_step == "joint" and self.arch_every != 1:
            raise ValueError(
                "arch_every applies to arch_step: alternate (joint makes an architecture "
                "step with every weight step)"
            )
        if self.warm_epochs >= self.epochs:
            raise ValueError(
                f"warm_epochs ({self.warm_epochs}) must be below epochs ({self.epochs}): the "
                "search needs epochs with architecture steps after them"
            )
        if self.tau_min > self.tau_max:
            raise ValueError(f"tau_min ({self.tau_min}) must be <= tau_max ({self.tau_max})")
        for name in ("flops_ratio", "params_ratio", "latency_ratio"):
            ratio = getattr(self, name)
            if ratio is not None and self.tolerance >= ratio:
                raise ValueError(f"tolerance ({self.tolerance}) must be below {name} ({ratio})")
        return self

    @property
    def budget(self) -> Budget:
        """The primary budget: latency when ``latency_ratio`` is set, else FLOPs. The kept
        shape and a projection onto the band follow it."""
        return self.budgets()[0]

    def budgets(self) -> list[Budget]:
        """Every budget the search enforces, the primary first: latency (when set), FLOPs
        (when set), params (when set)."""
        out = []
        for metric in ("latency", "flops", "params"):
            ratio = getattr(self, f"{metric}_ratio")
            if ratio is not None:
                out.append(Budget(ratio, self.tolerance, metric))
        return out

    @property
    def flops_budget(self) -> Budget:
        """The FLOPs budget the same-budget baselines meet: ``flops_ratio``, or (a latency
        budget alone) none; callers that need one refuse that case themselves."""
        if self.flops_ratio is None:
            raise ConfigError(
                "the FLOPs-budget baselines need search.flops_ratio, but only latency_ratio is "
                "set. Fix: set search.flops_ratio as well"
            )
        return Budget(self.flops_ratio, self.tolerance, "flops")

    def space(self) -> SpaceOptions:
        """The search-space part, candidates snapped to the latency runtime's block if any."""
        fields = {name: getattr(self, name) for name in SpaceOptions.model_fields}
        if self.snap_block > 1:
            fields["width_snap"] = self.snap_block
        return SpaceOptions(**fields)

    @property
    def snap_block(self) -> int:
        """The channel block width candidates are snapped up to (1: none)."""
        from tasprune.latency_table import ONNX_RUNTIMES, ORT_BLOCK

        on = self.latency_ratio is not None and self.latency_snap
        return ORT_BLOCK if on and self.latency_runtime in ONNX_RUNTIMES else 1
