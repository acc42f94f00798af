"""tasprune: network pruning via Transformable Architecture Search (TAS)."""

from tasprune.cost import model_cost, model_flops
from tasprune.models import create_model, get_model_spec, list_models
from tasprune.shape import Shape

__version__ = "0.1.0"

__all__ = ["Shape", "create_model", "get_model_spec", "list_models", "model_cost", "model_flops"]
