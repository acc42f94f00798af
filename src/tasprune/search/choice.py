"""A `Choice`: the candidates of one decision (a width or a depth) and, during a forward, the
sampled candidates with their mixing weights; the architecture logits themselves live in the
`SuperNet`. `align_matrix`: how a narrower candidate's channels map onto the widest one's."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Choice:
    """One categorical decision (a width or a depth) and what the current forward selected.

    ``selected`` holds (candidate index, value, weight) triples; the weight is a 0-d tensor
    carrying gradient to the logits, or a float for a fixed choice.
    """

    name: str
    kind: str  # "width" | "depth"
    candidates: list[int]
    key: str | None  # key of the logits in the SuperNet, None for a fixed choice
    members: list[str] = field(default_factory=list)  # conv or stage names sharing it
    selected: list[tuple[int, int, Tensor | float]] = field(default_factory=list)

    @property
    def searchable(self) -> bool:
        return self.key is not None and len(self.candidates) > 1

    def select_value(self, value: int) -> None:
        """Fix the choice to one value (weight 1), e.g. the argmax or a given Shape."""
        if value not in self.candidates:
            raise ValueError(f"{self.name}: {value} is not a candidate {self.candidates}")
        self.selected = [(self.candidates.index(value), value, 1.0)]

    def select_full(self) -> None:
        self.selected = [(len(self.candidates) - 1, self.candidates[-1], 1.0)]

    @property
    def max_selected(self) -> int:
        return max(v for _, v, _ in self.selected)


_MATRIX_CACHE: dict[tuple[int, int, str, str, torch.dtype], Tensor] = {}


def align_matrix(src: int, dst: int, mode: str, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(dst, src) matrix that maps ``src`` channels onto ``dst >= src`` channels.

    "cwi": channel-wise interpolation, i.e. adaptive average pooling along the channel axis
    (output j averages inputs floor(j*src/dst) .. ceil((j+1)*src/dst)-1). "pad": zero-padding.
    """
    cache_key = (src, dst, mode, str(device), dtype)
    hit = _MATRIX_CACHE.get(cache_key)
    if hit is not None:
        return hit
    m = torch.zeros(dst, src, dtype=torch.float64)
    if mode == "pad":
        m[:src, :src] = torch.eye(src, dtype=torch.float64)
    elif mode == "cwi":
        for j in range(dst):
            start = (j * src) // dst
            end = -((-(j + 1) * src) // dst)  # ceil
            m[j, start:end] = 1.0 / (end - start)
    else:
        raise ValueError(f"unknown channel alignment {mode!r}; use 'cwi' or 'pad'")
    out = m.to(device=device, dtype=dtype)
    _MATRIX_CACHE[cache_key] = out
    return out
