"""Load torchvision checkpoints (ResNet-18/34/50, MobileNetV2) into tasprune's models.

torchvision and tasprune build the same networks under different parameter names; these
functions only rename tensors. Files are read from local disk with
``torch.load(weights_only=True)``: nothing is downloaded and nothing is unpickled beyond
tensors and plain containers.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor

from tasprune.errors import CheckpointError, ConfigError
from tasprune.models.mobilenetv2 import MobileNetV2Arch

__all__ = ["load_torchvision_checkpoint", "state_dict_from_torchvision", "supported_models"]

_BN = r"(weight|bias|running_mean|running_var|num_batches_tracked)"


def _resnet_key(key: str) -> str | None:
    """torchvision ResNet name -> tasprune name (None: not a ResNet name)."""
    rules: list[tuple[str, Callable[[re.Match[str]], str]]] = [
        (r"conv1\.weight", lambda m: "stem.conv.weight"),
        (rf"bn1\.{_BN}", lambda m: f"stem.bn.{m[1]}"),
        (r"(layer\d\.\d+)\.conv(\d)\.weight", lambda m: f"{m[1]}.conv{m[2]}.conv.weight"),
        (rf"(layer\d\.\d+)\.bn(\d)\.{_BN}", lambda m: f"{m[1]}.conv{m[2]}.bn.{m[3]}"),
        (r"(layer\d\.\d+)\.downsample\.0\.weight", lambda m: f"{m[1]}.shortcut.conv.weight"),
        (rf"(layer\d\.\d+)\.downsample\.1\.{_BN}", lambda m: f"{m[1]}.shortcut.bn.{m[2]}"),
        (r"fc\.(weight|bias)", lambda m: f"fc.{m[1]}"),
    ]
    for pattern, fmt in rules:
        m = re.fullmatch(pattern, key)
        if m is not None:
            return fmt(m)
    return None


def _mobilenet_v2_key(key: str) -> str | None:
    """torchvision MobileNetV2 name -> tasprune name (None: not a MobileNetV2 name)."""
    blocks = list(MobileNetV2Arch().blocks())
    m = re.fullmatch(r"features\.(\d+)\.(.+)", key)
    if m is not None:
        index, rest = int(m[1]), m[2]
        if index == 0:  # stem: Conv2dNormActivation (0 = conv, 1 = bn)
            part = {"0": "stem.conv", "1": "stem.bn"}
            name = rest.split(".", 1)
            return f"{part[name[0]]}.{name[1]}" if name[0] in part else None
        if index == len(blocks) + 1:  # the last 1x1 conv
            part = {"0": "head.conv", "1": "head.bn"}
            name = rest.split(".", 1)
            return f"{part[name[0]]}.{name[1]}" if name[0] in part else None
        if not 1 <= index <= len(blocks):
            return None
        info = blocks[index - 1]
        # Inside a block: conv.[0.0 expand conv, 0.1 expand bn,] dw conv/bn, project conv, bn.
        if info.expansion == 1:
            layers = {"conv.0.0": "dw.conv", "conv.0.1": "dw.bn", "conv.1": "project.conv"}
            layers["conv.2"] = "project.bn"
        else:
            layers = {"conv.0.0": "expand.conv", "conv.0.1": "expand.bn", "conv.1.0": "dw.conv"}
            layers.update({"conv.1.1": "dw.bn", "conv.2": "project.conv", "conv.3": "project.bn"})
        prefix, _, leaf = rest.rpartition(".")
        if prefix in layers:
            return f"{info.name}.{layers[prefix]}.{leaf}"
        return None
    m = re.fullmatch(r"classifier\.1\.(weight|bias)", key)
    return f"fc.{m[1]}" if m is not None else None


_RENAMERS: dict[str, Callable[[str], str | None]] = {
    "resnet18": _resnet_key,
    "resnet34": _resnet_key,
    "resnet50": _resnet_key,
    "mobilenet_v2": _mobilenet_v2_key,
}


def supported_models() -> list[str]:
    """tasprune models whose torchvision checkpoints can be loaded."""
    return sorted(_RENAMERS)


def state_dict_from_torchvision(sd: Mapping[str, Tensor], model_name: str) -> dict[str, Tensor]:
    """Rename a torchvision state dict of ``model_name`` to tasprune's parameter names.

    The result loads with ``create_model(model_name, num_classes=...).load_state_dict(...)``
    (strict) and, as a teacher, into ``SuperNet.load_plain_weights``. A key torchvision's
    model of that name does not have is an error, so a checkpoint of another architecture is
    refused instead of half-loaded.
    """
    rename = _RENAMERS.get(model_name)
    if rename is None:
        raise ConfigError(
            f"no torchvision mapping for model '{model_name}'. "
            f"Fix: use one of {', '.join(supported_models())}"
        )
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, value in sd.items():
        new = rename(key.removeprefix("module."))  # checkpoints saved from DataParallel/DDP
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise CheckpointError(
            f"{len(unknown)} tensors of the checkpoint are not part of torchvision's "
            f"{model_name} (e.g. {unknown[:3]}). Fix: pass a torchvision {model_name} state dict"
        )
    return out


def load_torchvision_checkpoint(path: str | Path, model_name: str) -> dict[str, Tensor]:
    """Read a LOCAL torchvision checkpoint of ``model_name`` and rename it for tasprune.

    Accepts a bare state dict (what torchvision's weight files are) or one wrapped under
    ``"state_dict"`` / ``"model"`` (torchvision's reference training scripts). Never downloads.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(
            f"torchvision checkpoint {p} does not exist. Fix: download the .pth file yourself "
            "and pass its local path"
        )
    try:
        data = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling refused, truncated file, not a torch file...
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(
            f"cannot read {p} as a weights-only torch file ({first}). "
            "Fix: pass a state_dict saved with torch.save"
        ) from None
    if isinstance(data, Mapping):
        for wrapper in ("state_dict", "model"):
            inner = data.get(wrapper)
            if isinstance(inner, Mapping):
                data = inner
                break
    if not isinstance(data, Mapping) or not all(isinstance(v, Tensor) for v in data.values()):
        raise CheckpointError(f"{p} does not hold a state dict of tensors. Fix: pass one")
    return state_dict_from_torchvision(data, model_name)
