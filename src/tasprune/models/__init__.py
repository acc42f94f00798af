"""Models: the shipped networks (importing this module registers them) and the one entry to
any model's spec."""

from tasprune.models import mobilenetv2 as _mobilenetv2  # noqa: F401  (registers models)
from tasprune.models import resnet as _resnet  # noqa: F401  (registers models)
from tasprune.models import vit as _vit  # noqa: F401  (registers models)
from tasprune.models.registry import ModelSpec, create_model, get_model_spec, list_models

__all__ = ["ModelSpec", "create_model", "get_model_spec", "list_models"]
