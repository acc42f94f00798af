"""Training the pruned network: student construction and knowledge distillation.

The student is ``create_model(model, shape)``, initialised from scratch, from the searched
supernet (its leading channels per candidate width) or from the teacher (leading channels of
every tensor). It is trained by the ordinary :func:`tasprune.engine.fit` loop with a KD loss
(Hinton et al. 2015): ``(1 - a) * CE(s, y) + a * T^2 * KL(softmax(t / T) || softmax(s / T))``.
Optionally ``a`` ramps up linearly from 0 over the first epochs (``alpha_ramp_epochs``), and the
student's BN running statistics can be recalibrated on training batches after initialisation
(``recalibrate_bn``), and an attention-transfer loss on the stage outputs can be added
(``feature_loss: at``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tasprune.config import DistillConfig, SpaceOptions
from tasprune.contract import FORMAT_VERSION, contract_of
from tasprune.cost import model_cost
from tasprune.data import ArrayDataset, Augment, as_augment, train_test_loaders
from tasprune.engine import fit
from tasprune.epoch import LossFn, cross_entropy_loss
from tasprune.errors import ConfigError
from tasprune.imagefolder import StreamingFolder
from tasprune.models import create_model, get_model_spec
from tasprune.shape import Shape
from tasprune.utils import pick_device
from tasprune.weights import load_weights

logger = logging.getLogger(__name__)

__all__ = [
    "AttentionTransfer",
    "StepCounter",
    "at_loss",
    "attention_map",
    "build_student",
    "distill",
    "kd_alpha",
    "kd_loss",
    "kd_loss_fn",
    "model_meta",
    "recalibrate_bn",
    "with_attention_transfer",
]

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


def kd_alpha(alpha: float, step: int, ramp_steps: int) -> float:
    """The KD weight at optimiser step ``step`` (0-based): ``alpha * (step + 1) / ramp_steps``
    during the ramp, ``alpha`` after it (and always when ``ramp_steps`` <= 0)."""
    if ramp_steps <= 0:
        return alpha
    return alpha * min(1.0, (step + 1) / ramp_steps)


class StepCounter:
    """A training loader wrapper that knows the global step of the batch it last yielded.

    ``fit`` calls ``set_epoch(e)`` before every epoch (also after a resume), so ``step`` =
    ``e * len(loader) + i`` survives interruptions without being checkpointed. Everything
    else (``state_dict``, ``load_state_dict``, attributes) is the wrapped loader's.
    """

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.epoch = 0
        self.step = -1
        self._next_epoch: int | None = None

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["loader"], name)

    def current_step(self) -> int:
        return self.step

    def set_epoch(self, epoch: int) -> None:
        self._next_epoch = epoch
        set_epoch = getattr(self.loader, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)

    def __iter__(self) -> Iterator[Any]:
        if self._next_epoch is not None:
            self.epoch, self._next_epoch = self._next_epoch, None
        n = len(self.loader)
        for i, batch in enumerate(self.loader):
            self.step = self.epoch * n + i
            yield batch
        self.epoch += 1


def kd_loss_fn(
    teacher: nn.Module,
    alpha: float = 0.9,
    temperature: float = 4.0,
    *,
    ramp_steps: int = 0,
    step_of: Callable[[], int] | None = None,
) -> LossFn:
    """A ``loss_fn(model, x, y)`` for :func:`fit` that distils from a frozen ``teacher``.

    The teacher is put in eval mode (BN uses its running statistics), its parameters stop
    requiring gradients and it runs under ``torch.no_grad``, so it never changes.
    With ``ramp_steps`` > 0 the KD weight is :func:`kd_alpha` at the step ``step_of()``
    returns (the :class:`StepCounter` of the training loader).
    """
    if not 0 <= alpha <= 1:
        raise ConfigError(f"KD alpha = {alpha} is outside [0, 1]. Fix: use e.g. 0.9")
    if temperature <= 0:
        raise ConfigError(f"KD temperature = {temperature} must be > 0. Fix: use e.g. 4")
    if ramp_steps > 0 and step_of is None:
        raise ConfigError("a KD alpha ramp needs the training step. Fix: pass step_of")
    teacher.eval()
    teacher.requires_grad_(False)

    def loss_fn(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if teacher.training:  # someone called .train() on it: BN stats would drift
            teacher.eval()
        a = kd_alpha(alpha, step_of(), ramp_steps) if step_of is not None else alpha
        logits = model(x)
        if a == 0:
            return F.cross_entropy(logits.float(), y), logits
        with torch.no_grad():
            t_logits = teacher(x)
        return kd_loss(logits, t_logits, y, a, temperature), logits

    return loss_fn


def attention_map(a: Tensor) -> Tensor:
    """Spatial attention of a feature map ``B x C x H x W``: the channel mean of the squared
    activations, flattened and L2-normalised per sample (``B x HW``)."""
    return F.normalize(a.float().pow(2).mean(dim=1).flatten(1), dim=1)


def at_loss(student_feats: list[Tensor], teacher_feats: list[Tensor]) -> Tensor:
    """Attention transfer: the sum over layers of ``mean((q_s - q_t)^2)``."""
    if len(student_feats) != len(teacher_feats) or not student_feats:
        raise ConfigError(
            f"attention transfer got {len(student_feats)} student and {len(teacher_feats)} "
            "teacher feature maps. Fix: tap the same layers of both networks"
        )
    terms = [
        (attention_map(s) - attention_map(t)).pow(2).mean()
        for s, t in zip(student_feats, teacher_feats, strict=True)
    ]
    return torch.stack(terms).sum()


class _Tap:
    """Forward hooks that keep the outputs of named sub-modules while ``active``."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise ConfigError(
                f"feature loss: the network has no module {missing[0]!r}. Fix: tap its stages"
            )
        self.active = False
        self.out: list[Tensor] = []
        self.handles = [modules[name].register_forward_hook(self._hook) for name in names]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def _hook(self, module: nn.Module, inputs: Any, output: Tensor) -> None:
        if self.active:
            self.out.append(output)


class AttentionTransfer:
    """``loss_fn(model, x, y)``: ``base`` (KD or CE) + ``weight / 2 * at_loss`` on ``layers``
    (default: the network's ``stage_names``) of ``student`` and the frozen ``teacher``.

    Forward hooks on both networks record the tapped outputs during the loss call only;
    :meth:`remove` takes them off (``distill`` does so when training ends).
    """

    def __init__(
        self,
        base: LossFn,
        student: nn.Module,
        teacher: nn.Module,
        weight: float,
        layers: list[str] | None = None,
    ) -> None:
        if layers is None:
            names = getattr(student, "stage_names", None)
            if not names:
                raise ConfigError(
                    "feature loss: this network lists no stage_names. Fix: pass the layers to tap"
                )
            layers = list(names)
        teacher.eval()
        teacher.requires_grad_(False)
        self.base = base
        self.teacher = teacher
        self.weight = weight
        self.s_tap, self.t_tap = _Tap(student, layers), _Tap(teacher, layers)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        s_tap, t_tap, teacher = self.s_tap, self.t_tap, self.teacher
        s_tap.out, t_tap.out = [], []
        s_tap.active = t_tap.active = True
        try:
            loss, logits = self.base(model, x, y)
            if not t_tap.out:  # the base loss did not run the teacher (cross-entropy)
                if teacher.training:
                    teacher.eval()
                with torch.no_grad():
                    teacher(x)
        finally:
            s_tap.active = t_tap.active = False
        extra = at_loss(s_tap.out, t_tap.out)
        s_tap.out, t_tap.out = [], []
        return loss + self.weight / 2 * extra, logits

    def remove(self) -> None:
        self.s_tap.remove()
        self.t_tap.remove()


def with_attention_transfer(
    base: LossFn,
    student: nn.Module,
    teacher: nn.Module,
    weight: float,
    layers: list[str] | None = None,
) -> AttentionTransfer:
    """``base`` plus attention transfer on the stage outputs (see :class:`AttentionTransfer`)."""
    return AttentionTransfer(base, student, teacher, weight, layers)


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module,
    loader: Iterable[Any],
    batches: int,
    device: torch.device | str = "cpu",
) -> int:
    """Recompute every BatchNorm's running mean/var as the plain average over ``batches``
    batches of ``loader`` (forward passes in train mode, no gradients); returns the batches used.

    For a network whose copied statistics do not describe its own activations (a pruned
    student, a supernet's sub-network). Momentum and train/eval mode are restored.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or batches <= 0:
        return 0
    momenta = [m.momentum for m in bns]
    was_training = model.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: equal weight per batch
    model.train()
    used = 0
    try:
        for batch in loader:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(x.to(device))
            used += 1
            if used >= batches:
                break
    finally:
        for m, momentum in zip(bns, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training)
    return used


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
    the ``space`` the search used; ``init="teacher"`` needs ``teacher_state``. Either is pruned
    to ``shape`` (the leading channels of every group, the kept blocks); a projection shortcut
    the unpruned network lacks starts as the identity on the leading channels, so the
    residual path carries the source's stream as it did.
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
        state = get_model_spec(model).transfer(teacher_state, shape, num_classes, in_channels)
    else:
        raise ConfigError(f"unknown student init {init!r}. Fix: use scratch, supernet or teacher")
    missing = load_weights(student, state, strict=False).missing_keys
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
    init_state: dict[str, Tensor] | None = None,
    space: SpaceOptions | None = None,
    device: torch.device | str = "auto",
    meta: dict[str, Any] | None = None,
    progress: bool = True,
    augment: Augment | dict[str, Any] | None = None,
    tensorboard: bool = False,
) -> dict[str, Any]:
    """Build the student of ``shape`` and train it (KD from ``teacher`` when ``cfg.kd``).

    The student starts as ``cfg.init`` says, or from ``init_state`` when given: its own
    weights at ``shape`` (e.g. an L1-pruned teacher's), loaded strictly.

    Writes fit's outputs (model.pt with student meta, final.json, history.jsonl) to
    ``out_dir``; resumes there; returns fit's metrics plus the student's ``flops``/``params``.
    ``train_data``/``test_data``: in-memory ArrayDatasets or streamed StreamingFolders (see
    `tasprune.data.train_test_loaders`). ``augment``: the training augmentation (None: fit
    the data, see `Augment`; streamed data uses RandomResizedCrop + flip).
    """
    dev = torch.device(device) if not isinstance(device, str) else pick_device(device)
    if cfg.needs_teacher and teacher is None:
        raise ConfigError(
            "distillation needs a teacher (distill.kd or distill.init = teacher). "
            "Fix: pass --teacher DIR, or set distill.kd=false and distill.init=scratch"
        )
    teacher_state = teacher.state_dict() if teacher is not None else None
    torch.manual_seed(cfg.train.seed)  # the student's fresh tensors are reproducible
    student: nn.Module
    if init_state is not None:
        nc, ic = train_data.num_classes, train_data.in_channels
        student = create_model(model, shape, num_classes=nc, in_channels=ic)
        load_weights(student, init_state)
    else:
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
    tcfg = cfg.train
    streamed = isinstance(train_data, StreamingFolder)
    aug = None if streamed else as_augment(augment).resolve(train_data.name, train_data.image_size)
    train_loader: Any
    train_loader, test_loader = train_test_loaders(
        train_data, test_data, tcfg.batch_size, augment=aug, device=dev, seed=tcfg.seed
    )
    student.to(dev)
    if cfg.recalibrate_bn > 0:
        # A separate pass (its own seed) so the training loader's epochs are untouched.
        recal_loader, _ = train_test_loaders(
            train_data, test_data, tcfg.batch_size, augment=aug, device=dev, seed=tcfg.seed + 1
        )
        used = recalibrate_bn(student, recal_loader, cfg.recalibrate_bn, dev)
        logger.info("student BN statistics recalibrated on %d training batches", used)
    loss: LossFn
    if cfg.kd and teacher is not None:
        teacher.to(dev)
        ramp_steps = round(cfg.alpha_ramp_epochs * len(train_loader))
        step_of: Callable[[], int] | None = None
        if ramp_steps > 0:
            counter = StepCounter(train_loader)
            train_loader = counter
            step_of = counter.current_step
        loss = kd_loss_fn(
            teacher, cfg.alpha, cfg.temperature, ramp_steps=ramp_steps, step_of=step_of
        )
    else:
        loss = cross_entropy_loss(cfg.train.label_smoothing)
    if cfg.feature_loss == "at" and cfg.feature_weight > 0:
        if teacher is None:
            raise ConfigError(
                "distill.feature_loss = at needs a teacher. Fix: pass --teacher DIR, or set "
                "distill.feature_loss=none"
            )
        teacher.to(dev)
        loss = with_attention_transfer(loss, student, teacher, cfg.feature_weight)
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
    try:
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
    finally:
        if isinstance(loss, AttentionTransfer):
            loss.remove()
    return {**metrics, "flops": flops, "params": params}
