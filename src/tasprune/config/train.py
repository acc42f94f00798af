"""The settings of one training stage (teacher, student): `TrainConfig`."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["TrainConfig"]


class TrainConfig(BaseModel):
    """Hyper-parameters of one training stage (validated; unknown keys are errors).

    Each field's ``description`` is its documentation and the help of the flag that sets it
    (`tasprune.cli.flags`)."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(ge=1, description="passes over the training set")
    batch_size: int = Field(default=128, ge=1, description="images per step")
    lr: float = Field(default=0.1, gt=0, description="peak learning rate, reached after warm-up")
    optimizer: Literal["sgd", "adamw"] = Field(
        default="sgd",
        description="sgd: SGD with momentum; adamw: AdamW (decoupled decay; for transformers)",
    )
    momentum: float = Field(default=0.9, ge=0, lt=1, description="SGD momentum")
    nesterov: bool = Field(default=True, description="Nesterov momentum (needs momentum > 0)")
    weight_decay: float = Field(
        default=5e-4, ge=0, description="L2 on conv/linear weights; none on BN/bias"
    )
    warmup_epochs: int = Field(
        default=0, ge=0, description="epochs of linear warm-up before the cosine decay"
    )
    label_smoothing: float = Field(
        default=0.0, ge=0, lt=1, description="fraction of the target mass spread over classes"
    )
    amp: bool = Field(default=True, description="bf16 autocast, CUDA only (ignored on CPU)")
    channels_last: Literal["auto", "on", "off"] = Field(
        default="auto", description="NHWC memory format (auto: on for conv nets)"
    )
    grad_clip: float | None = Field(
        default=None, gt=0, description="max global gradient L2 norm (unset: off)"
    )
    eval_every: int = Field(
        default=1, ge=1, description="evaluate every N epochs (and always at the end)"
    )
    seed: int = Field(
        default=0, ge=0, description="seeds python/numpy/torch at the start of training"
    )
    deterministic: bool = Field(
        default=False, description="deterministic kernels (bit-identical resume on CPU)"
    )
    compile: bool = Field(
        default=False,
        description="torch.compile the training forward (worth it on GPUs, long runs)",
    )
