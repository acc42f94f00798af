"""TAS search: searchable units, the supernet, the budget loss and the search loop."""

from tasprune.search.config import SearchConfig
from tasprune.search.loop import SearchResult, search
from tasprune.search.space import SpaceOptions, depth_candidates, width_candidates
from tasprune.search.supernet import SuperNet, budget_loss, feasible_range

__all__ = [
    "SearchConfig",
    "SearchResult",
    "SpaceOptions",
    "SuperNet",
    "budget_loss",
    "depth_candidates",
    "feasible_range",
    "search",
    "width_candidates",
]
