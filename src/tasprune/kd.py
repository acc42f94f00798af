"""Knowledge distillation for any task, as a loss term for your own loop.

`Distiller(teacher, student, outputs=..., features=...)` compares the student with the teacher
on the same batch: on the outputs you name (class scores with a temperature, box or mask
regressions, anything in the output structure: tensors, tuples, dicts, lists) and on the
features of named modules (stage outputs), through a learned 1x1 adapter where the student's
width differs from the teacher's (a pruned student's usually does). ::

    kd = tasprune.Distiller(teacher, student, outputs={"scores.0": "soft", "boxes": "mse"},
                            features=["backbone.layer2", "backbone.layer3"], example_inputs=x)
    opt = torch.optim.SGD([*student.parameters(), *kd.parameters()], lr=0.01)
    out = student(x)                       # the student's features are captured here
    loss = task_loss(out, targets) + kd(x, out)

Paths name a place in the output structure with dots: ``"logits"`` a dict key, ``"0"`` a
position, ``"scores.0"`` both; ``""`` the output itself when it is one tensor. Kinds: ``soft``
(KL divergence of the temperature-softened distributions over dim 1, times T^2, as Hinton et
al.), ``mse``, ``l1``. The teacher runs in eval mode without gradients.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tasprune.errors import ConfigError

__all__ = ["Distiller"]

KINDS = ("soft", "mse", "l1")


def pick(out: Any, path: str) -> Tensor:
    """The tensor at ``path`` (dot-separated keys and positions) of an output structure."""
    node = out
    for part in [p for p in path.split(".") if p]:
        if isinstance(node, Mapping):
            if part not in node:
                raise ConfigError(
                    f"output path {path!r}: no key {part!r} (keys {sorted(node)[:6]}). Fix: name "
                    "a key of the model's output"
                )
            node = node[part]
        elif isinstance(node, (list, tuple)) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise ConfigError(
                f"output path {path!r}: cannot take {part!r} of a {type(node).__name__}. Fix: "
                "name keys and positions of the model's output, e.g. 'scores.0'"
            )
    if not isinstance(node, Tensor):
        raise ConfigError(f"output path {path!r} is a {type(node).__name__}, not a tensor")
    return node


class Distiller(nn.Module):
    """A KD loss term between ``teacher`` and ``student`` (see the module docstring).

    ``outputs``: path -> kind; ``features``: module names present in both networks (a pruned
    student keeps the teacher's module names); ``temperature`` for ``soft``; ``weights``:
    path or module name -> factor (default 1); ``class_dim``: the class dimension of ``soft``
    terms (1 for a classifier's logits or a segmentation map, -1 for a detector's per-anchor
    scores). ``features`` may also map module names to kinds (default ``mse``; ``soft`` for
    the class scores of a head, which need no adapter). The adapters are this module's
    parameters: give them to your optimiser."""

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        *,
        outputs: Mapping[str, str] | None = None,
        features: Sequence[str] | Mapping[str, str] = (),
        example_inputs: Any = None,
        temperature: float = 4.0,
        weights: Mapping[str, float] | None = None,
        class_dim: int = 1,
    ) -> None:
        super().__init__()
        self.outputs = dict(outputs or {})
        if not self.outputs and not features:
            raise ConfigError("nothing to distil. Fix: name outputs={path: kind} or features=[...]")
        kinds = dict(features) if isinstance(features, Mapping) else dict.fromkeys(features, "mse")
        bad = {n: k for n, k in {**self.outputs, **kinds}.items() if k not in KINDS}
        if bad:
            raise ConfigError(f"unknown KD kinds {bad}. Fix: use one of {', '.join(KINDS)}")
        self.features = list(kinds)
        self.feature_kinds = kinds
        self.temperature = temperature
        self.class_dim = class_dim
        self.weights = dict(weights or {})
        self._teacher = [teacher]  # in a list: not a sub-module, so not trained or saved
        self.adapters = nn.ModuleDict()
        self._seen: dict[str, dict[str, Tensor]] = {"teacher": {}, "student": {}}
        self._probing = False
        self._hooks: list[Any] = []
        t_mods, s_mods = dict(teacher.named_modules()), dict(student.named_modules())
        for name in self.features:
            if name not in t_mods or name not in s_mods:
                raise ConfigError(
                    f"feature {name!r} is not a module of both networks. Fix: name a module "
                    "of the teacher that the student kept (model.named_modules())"
                )
            self._hooks.append(t_mods[name].register_forward_hook(self._capture("teacher", name)))
            self._hooks.append(s_mods[name].register_forward_hook(self._capture("student", name)))
        if self.features:
            if example_inputs is None:
                raise ConfigError(
                    "feature distillation needs example_inputs (the adapters' widths are read "
                    "off one forward). Fix: Distiller(..., example_inputs=x)"
                )
            args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
            modes = teacher.training, student.training
            teacher.eval()
            student.eval()
            self._probing = True
            try:
                with torch.no_grad():
                    teacher(*args)
                    student(*args)
            finally:
                self._probing = False
                teacher.train(modes[0])
                student.train(modes[1])
            for name, s_f, t_f in self._captured(
                "is not a tensor output. Fix: name a module that returns one tensor"
            ):
                if self.feature_kinds[name] == "mse":
                    self._adapter(name, s_f, t_f)

    def remove(self) -> None:
        """Remove the feature hooks from both networks (after training: a student with no
        hooks of ours left can be copied, pickled or traced like any module)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def _capture(self, who: str, name: str) -> Any:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            # the student's features only where a loss may follow (not under no_grad)
            keep = who == "teacher" or torch.is_grad_enabled() or self._probing
            if isinstance(out, Tensor) and keep:
                self._seen[who][name] = out

        return hook

    def _adapter(self, name: str, s: Tensor, t: Tensor) -> nn.Module | None:
        """A 1x1 adapter from the student's channels to the teacher's (made from the example
        forward, started as the identity on the shared leading channels)."""
        if s.shape[1] == t.shape[1]:
            return None
        key = name.replace(".", "__")
        if key not in self.adapters:
            layer: nn.Conv2d | nn.Linear = (
                nn.Conv2d(s.shape[1], t.shape[1], 1, bias=False)
                if s.dim() == 4
                else nn.Linear(s.shape[1], t.shape[1], bias=False)
            )
            with torch.no_grad():
                w = layer.weight.view(t.shape[1], s.shape[1])
                w.zero_()
                k = min(s.shape[1], t.shape[1])
                w[:k, :k] = torch.eye(k)
            self.adapters[key] = layer.to(s.device)
        return self.adapters[key]

    def forward(self, inputs: Any, student_out: Any) -> Tensor:
        """The KD loss of the student's output ``student_out`` (from its forward on
        ``inputs``, which also captured its features) against the teacher on ``inputs``
        (a tensor or a tuple of positional arguments)."""
        args = inputs if isinstance(inputs, tuple) else (inputs,)
        teacher = self._teacher[0]
        was = teacher.training
        teacher.eval()
        try:
            with torch.no_grad():
                teacher_out = teacher(*args)
        finally:
            teacher.train(was)
        total = torch.zeros((), device=_device(student_out))
        for path, kind in self.outputs.items():
            s, t = pick(student_out, path), pick(teacher_out, path).detach()
            if s.shape != t.shape:
                raise ConfigError(
                    f"output {path!r}: student {tuple(s.shape)} vs teacher {tuple(t.shape)}. "
                    "Fix: distil outputs of the same shape (the pruned model keeps its outputs)"
                )
            total = total + self.weights.get(path, 1.0) * self._term(s.float(), t.float(), kind)
        missing = (
            "was not produced in this forward. Fix: call kd(x, student(x)) right after the "
            "student's forward on x"
        )
        for name, s_f, t_f in self._captured(missing):
            kind = self.feature_kinds[name]
            adapter = self._adapter(name, s_f, t_f) if kind == "mse" else None
            s_f = adapter(s_f.float()) if adapter is not None else s_f.float()
            if s_f.shape != t_f.shape:
                raise ConfigError(
                    f"feature {name!r} ({kind}): student {tuple(s_f.shape)} vs teacher "
                    f"{tuple(t_f.shape)}. Fix: use mse (adapted) for features whose width differs"
                )
            term = self._term(s_f, t_f.detach().float(), kind)
            total = total + self.weights.get(name, 1.0) * term
        return total

    def _captured(self, missing: str) -> list[tuple[str, Tensor, Tensor]]:
        """(name, student's, teacher's) feature of every named module from the last forwards
        (then forgotten); ``missing``: what the error says when one is absent."""
        seen, self._seen = self._seen, {"teacher": {}, "student": {}}
        out = []
        for name in self.features:
            s_f, t_f = seen["student"].get(name), seen["teacher"].get(name)
            if s_f is None or t_f is None:
                raise ConfigError(f"feature {name!r} {missing}")
            out.append((name, s_f, t_f))
        return out

    def _term(self, s: Tensor, t: Tensor, kind: str) -> Tensor:
        if kind == "soft":
            # KL summed over the classes, averaged over every other position (the batch, a
            # segmentation map's pixels, a detector's anchors), times T^2.
            temp, dim = self.temperature, self.class_dim
            kl = F.kl_div(
                F.log_softmax(s / temp, dim=dim),
                F.log_softmax(t / temp, dim=dim),
                reduction="none",
                log_target=True,
            )
            return kl.sum(dim).mean() * temp * temp
        if kind == "mse":
            return F.mse_loss(s, t)
        return F.l1_loss(s, t)


def _device(out: Any) -> torch.device:
    from torch.utils._pytree import tree_flatten

    tensors = [t for t in tree_flatten(out)[0] if isinstance(t, Tensor)]
    return tensors[0].device if tensors else torch.device("cpu")
