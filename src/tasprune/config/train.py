"""The settings of one training stage (teacher, student): `TrainConfig`."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["TrainConfig"]


class TrainConfig(BaseModel):
    """Hyper-parameters of one training stage (validated; unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(ge=1)  # passes over the training set
    batch_size: int = Field(default=128, ge=1)  # images per step (used by whoever builds loaders)
    lr: float = Field(default=0.1, gt=0)  # peak learning rate, reached after warm-up
    momentum: float = Field(default=0.9, ge=0, lt=1)  # SGD momentum (dimensionless)
    nesterov: bool = True  # Nesterov momentum (needs momentum > 0)
    weight_decay: float = Field(default=5e-4, ge=0)  # L2 on conv/linear weights; none on BN/bias
    warmup_epochs: int = Field(default=0, ge=0)  # epochs of linear warm-up before cosine decay
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)  # fraction of target mass spread
    amp: bool = True  # bf16 autocast, CUDA only (ignored on CPU)
    channels_last: Literal["auto", "on", "off"] = "auto"  # NHWC memory format; auto: see below
    grad_clip: float | None = Field(default=None, gt=0)  # max global grad L2 norm, None = off
    eval_every: int = Field(default=1, ge=1)  # evaluate every N epochs (and always at the end)
    seed: int = Field(default=0, ge=0)  # seeds python/numpy/torch at the start of fit
    deterministic: bool = False  # deterministic kernels (bit-identical resume on CPU)
    compile: bool = False  # torch.compile the training forward (worth it on GPUs, long runs)
