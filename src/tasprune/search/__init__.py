"""TAS search: searchable units, the supernet and the search loop (the budget: tasprune.budget)."""

from tasprune.config import SearchConfig, SpaceOptions
from tasprune.search.loop import search
from tasprune.search.result import SearchResult
from tasprune.search.space import depth_candidates, smallest_shape, width_candidates
from tasprune.search.supernet import SuperNet

__all__ = [
    "SearchConfig",
    "SearchResult",
    "SpaceOptions",
    "SuperNet",
    "depth_candidates",
    "search",
    "smallest_shape",
    "width_candidates",
]
