"""Training the pruned network: student construction and knowledge distillation.

The student is ``create_model(model, shape)``, initialised from scratch, from the searched
supernet (its leading channels per candidate width) or from the teacher (leading channels of
every tensor). It is trained by the ordinary :func:`tasprune.engine.fit` loop with a KD loss
(Hinton et al. 2015): ``(1 - a) * CE(s, y) + a * T^2 * KL(softmax(t / T) || softmax(s / T))``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tasprune.config import DistillConfig, SpaceOptions
from tasprune.contract import FORMAT_VERSION, contract_of
from tasprune.cost import model_cost
from tasprune.data import ArrayDataset, Augment, as_augment, train_test_loaders
from tasprune.engine import LossFn, cross_entropy_loss, fit
from tasprune.errors import ConfigError
from tasprune.imagefolder import StreamingFolder
from tasprune.models import create_model
from tasprune.shape import Shape
from tasprune.utils import pick_device

logger = logging.getLogger(__name__)

__all__ = ["build_student", "distill", "kd_loss", "kd_loss_fn", "leading_slice_state", "model_meta"]

Init = Literal["scratch", "supernet", "teacher"]


def kd_loss(
    student_logits: Tensor, teacher_logits: Tensor, y: Tensor, alpha: float, temperature: float
) -> Tensor:
    """``(1-a) CE(s, y) + a T^2 KL(softmax(t/T) || softmax(s/T))``, KL averaged per sample."""
    s = student_logits.float()
    t = teacher_logits.float()
    ce = F.cross_entropy(s, y)
    if alpha == 0:
        return ce
    kl = F.kl_div(
        F.log_softmax(s / temperature, dim=1),
        F.log_softmax(t / temperature, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    # T^2 keeps the soft-target gradients on the scale of the hard-target ones.
    return (1 - alpha) * ce + alpha * temperature**2 * kl


def kd_loss_fn(teacher: nn.Module, alpha: float = 0.9, temperature: float = 4.0) -> LossFn:
    """A ``loss_fn(model, x, y)`` for :func:`fit` that distils from a frozen ``teacher``.

    The teacher is put in eval mode (BN uses its running statistics), its parameters stop
    requiring gradients and it runs under ``torch.no_grad``, so it never changes.
    """
    if not 0 <= alpha <= 1:
        raise ConfigError(f"KD alpha = {alpha} is outside [0, 1]. Fix: use e.g. 0.9")
    if temperature <= 0:
        raise ConfigError(f"KD temperature = {temperature} must be > 0. Fix: use e.g. 4")
    teacher.eval()
    teacher.requires_grad_(False)

    def loss_fn(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if teacher.training:  # someone called .train() on it: BN stats would drift
            teacher.eval()
        logits = model(x)
        if alpha == 0:
            return F.cross_entropy(logits.float(), y), logits
        with torch.no_grad():
            t_logits = teacher(x)
        return kd_loss(logits, t_logits, y, alpha, temperature), logits

    return loss_fn


def leading_slice_state(
    source: dict[str, Tensor], target: dict[str, Tensor]
) -> tuple[dict[str, Tensor], list[str]]:
    """For every key of ``target``, the leading slice of ``source[key]`` that fits its shape.

    Keys the source lacks, or whose rank differs or that are smaller than the target, are
    skipped (returned as the second element), e.g. a projection only the pruned net has.
    """
    out: dict[str, Tensor] = {}
    skipped: list[str] = []
    for key, value in target.items():
        src = source.get(key)
        if (
            src is None
            or src.dim() != value.dim()
            or any(s < t for s, t in zip(src.shape, value.shape, strict=True))
        ):
            skipped.append(key)
            continue
        out[key] = src[tuple(slice(0, n) for n in value.shape)].detach().clone().to(value.dtype)
    return out, skipped


def build_student(
    model: str,
    shape: Shape,
    num_classes: int,
    in_channels: int,
    init: Init = "scratch",
    supernet_state: dict[str, Tensor] | None = None,
    teacher_state: dict[str, Tensor] | None = None,
    *,
    space: SpaceOptions | None = None,
) -> nn.Module:
    """The pruned network of ``shape``, initialised as asked.

    ``init="supernet"`` needs ``supernet_state`` (the ``"model"`` entry of ``supernet.pt``) and
    the ``space`` the search used; ``init="teacher"`` needs ``teacher_state``. Tensors that
    cannot be sliced from the source keep their fresh initialisation.
    """
    student = create_model(model, shape, num_classes=num_classes, in_channels=in_channels)
    if init == "scratch":
        return student
    if init == "supernet":
        if supernet_state is None:
            raise ConfigError(
                "distill.init = supernet but no supernet weights were given. "
                "Fix: pass the search's supernet.pt, or use init: teacher/scratch"
            )
        from tasprune.search.supernet import SuperNet

        net = SuperNet(model, num_classes=num_classes, in_channels=in_channels, options=space)
        try:
            net.load_state_dict(supernet_state)
        except RuntimeError as err:
            raise ConfigError(
                f"supernet weights do not fit {model} with this search space "
                f"({str(err).splitlines()[0]}). Fix: use the search settings of that run"
            ) from None
        state = net.plain_state_dict(shape)
    elif init == "teacher":
        if teacher_state is None:
            raise ConfigError(
                "distill.init = teacher but no teacher weights were given. Fix: pass a teacher"
            )
        state, _ = leading_slice_state(teacher_state, student.state_dict())
    else:
        raise ConfigError(f"unknown student init {init!r}. Fix: use scratch, supernet or teacher")
    missing = student.load_state_dict(state, strict=False).missing_keys
    logger.info(
        "student initialised from the %s: %d tensors copied, %d fresh",
        init,
        len(state),
        len(missing),
    )
    return student


def model_meta(
    model: str,
    shape: Shape,
    data: Any,
    role: str,
    *,
    augment: Augment | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The ``meta`` stored in ``model.pt``: enough to rebuild the network, feed it raw inputs
    (its input contract) and know its data and training augmentation. ``data``: the training
    split (an ArrayDataset or a streamed one)."""
    return {
        "format_version": FORMAT_VERSION,
        "model": model,
        "shape": shape.to_dict(),
        "num_classes": data.num_classes,
        "in_channels": data.in_channels,
        "input_size": [data.in_channels, *data.image_size],
        "dataset": data.name,
        "role": role,
        "input": contract_of(data).to_dict(),
        "augment": augment.model_dump() if augment is not None else None,
        **extra,
    }


def distill(
    model: str,
    shape: Shape,
    teacher: nn.Module | None,
    train_data: ArrayDataset,
    test_data: ArrayDataset,
    cfg: DistillConfig,
    out_dir: str | Path | None = None,
    *,
    supernet_state: dict[str, Tensor] | None = None,
    space: SpaceOptions | None = None,
    device: torch.device | str = "auto",
    meta: dict[str, Any] | None = None,
    progress: bool = True,
    augment: Augment | dict[str, Any] | None = None,
    tensorboard: bool = False,
) -> dict[str, Any]:
    """Build the student of ``shape`` and train it (KD from ``teacher`` when ``cfg.kd``).

    Writes fit's outputs (model.pt with student meta, final.json, history.jsonl) to
    ``out_dir``; resumes there; returns fit's metrics plus the student's ``flops``/``params``.
    ``train_data``/``test_data``: in-memory ArrayDatasets or streamed StreamingFolders (see
    `tasprune.data.train_test_loaders`). ``augment``: the training augmentation (None: fit
    the data, see `Augment`; streamed data uses RandomResizedCrop + flip).
    """
    dev = torch.device(device) if not isinstance(device, str) else pick_device(device)
    if (cfg.kd or cfg.init == "teacher") and teacher is None:
        raise ConfigError(
            "distillation needs a teacher (distill.kd or distill.init = teacher). "
            "Fix: pass --teacher DIR, or set distill.kd=false and distill.init=scratch"
        )
    teacher_state = teacher.state_dict() if teacher is not None else None
    torch.manual_seed(cfg.train.seed)  # the student's fresh tensors are reproducible
    student = build_student(
        model,
        shape,
        train_data.num_classes,
        train_data.in_channels,
        cfg.init,
        supernet_state=supernet_state,
        teacher_state=teacher_state,
        space=space,
    )
    input_size = (train_data.in_channels, *train_data.image_size)
    flops, params = model_cost(model, shape, input_size, train_data.num_classes)
    loss: LossFn
    if cfg.kd and teacher is not None:
        teacher.to(dev)
        loss = kd_loss_fn(teacher, cfg.alpha, cfg.temperature)
    else:
        loss = cross_entropy_loss(cfg.train.label_smoothing)
    tcfg = cfg.train
    streamed = isinstance(train_data, StreamingFolder)
    aug = None if streamed else as_augment(augment).resolve(train_data.name, train_data.image_size)
    train_loader, test_loader = train_test_loaders(
        train_data, test_data, tcfg.batch_size, augment=aug, device=dev, seed=tcfg.seed
    )
    full_meta = model_meta(
        model, shape, train_data, "student", augment=aug, flops=flops, params=params
    )
    full_meta.update(meta or {})
    logger.info(
        "distilling %s (%.2f MFLOPs, %.3f M params) for %d epochs, init=%s, kd=%s",
        model,
        flops / 1e6,
        params / 1e6,
        tcfg.epochs,
        cfg.init,
        cfg.kd,
    )
    out = Path(out_dir) if out_dir is not None else None
    metrics = fit(
        student,
        train_loader,
        test_loader,
        tcfg,
        out,
        loss_fn=loss,
        device=dev,
        meta=full_meta,
        progress=progress,
        tensorboard=tensorboard,
    )
    return {**metrics, "flops": flops, "params": params}
