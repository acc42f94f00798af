"""What a TAS search produced, and its files: the kept shape (the last argmax, projected onto
the budget band when it ended outside it, or the best in-band one with ``keep: best``), its
exact cost and the latency prediction, written as ``shape.json`` (+ ``shape_last.json``,
``shape_best.json``, ``supernet.pt``, ``search_done.json``) and read back from a finished
search folder."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasprune import distributed as ddp
from tasprune.checkpoint import save_checkpoint
from tasprune.config import SearchConfig
from tasprune.errors import ConfigError
from tasprune.search.supernet import SuperNet
from tasprune.shape import Shape
from tasprune.utils import JsonlLogger, atomic_write_text

log = logging.getLogger(__name__)

__all__ = ["SearchResult", "finish", "load_finished"]


@dataclass
class SearchResult:
    """What a search produced: the chosen shape and its cost, plus the whole history."""

    model: str
    shape: Shape
    flops: int
    params: int
    flops_ratio: float
    last_shape: Shape
    best_shape: Shape | None
    history: list[dict[str, Any]] = field(default_factory=list)
    latency: dict[str, Any] | None = None  # a latency budget's prediction (shape.json's)

    def summary(self) -> dict[str, Any]:
        out = {
            "model": self.model,
            "flops": self.flops,
            "params": self.params,
            "flops_ratio": self.flops_ratio,
        }
        if self.latency is not None:
            out["latency"] = self.latency
        return out


def finish(
    net: SuperNet,
    cfg: SearchConfig,
    out: Path | None,
    best: dict[str, Any] | None,
    rows: list[dict[str, Any]],
) -> SearchResult:
    last = net.derive()
    best_shape = Shape.from_dict(best["shape"]) if best is not None else None
    budget = cfg.budget
    lower, upper = budget.band

    def ratio_of(shape: Shape) -> float:
        return net.shape_costs(shape)[budget.metric] / net.full_cost(budget.metric)

    last_ratio = ratio_of(last)
    last_ok = budget.contains_ratio(last_ratio)
    if cfg.keep == "best" and best_shape is not None:
        kept, source = best_shape, "best"
    elif last_ok:
        kept, source = last, "last"
    else:
        # The last shape projected onto the band, not an earlier in-band epoch's shape: the
        # projected last trained better on all three searches measured (bench/results/keep.md).
        kept, source = net.project(last, budget), "projected"
        if ddp.is_main():
            hint = (
                ""
                if best_shape is not None
                else " (no epoch ended inside it: a longer search or a higher arch_lr decides the shape itself)"
            )
            log.warning(
                "the last shape (%s ratio %.3f) is outside the budget band [%.3f, %.3f]%s; "
                "keeping it projected onto the budget (ratio %.3f)",
                budget.label,
                last_ratio,
                lower,
                upper,
                hint,
                ratio_of(kept),
            )
    flops, params = net.shape_cost(kept)
    latency = None
    if net.latency_table is not None:
        predicted = net.shape_costs(kept)["latency"]
        latency = {
            "predicted_ms": predicted,
            "predicted_ratio": predicted / net.full_latency,
            **(net.latency_info or {}),
        }
    result = SearchResult(
        model=net.model_name,
        shape=kept,
        flops=flops,
        params=params,
        flops_ratio=flops / net.full_flops,
        last_shape=last,
        best_shape=best_shape,
        history=rows,
        latency=latency,
    )
    if out is not None:
        extra = {
            "model": net.model_name,
            "input_size": [net.in_channels, *net.input_size],
            "num_classes": net.num_classes,
        }
        for name, shape in (("shape_last.json", last), ("shape_best.json", best_shape)):
            if shape is not None:
                f, p = net.shape_cost(shape)
                shape.save(out / name, **extra, flops=f, params=p, flops_ratio=f / net.full_flops)
        save_checkpoint(out / "supernet.pt", {"model": net.state_dict()})
        kept.save(
            out / "shape.json",
            **extra,
            flops=flops,
            params=params,
            flops_ratio=result.flops_ratio,
            source=source,
            **({"latency": latency} if latency is not None else {}),
        )
        atomic_write_text(out / "search_done.json", '{"complete": true}\n')
    return result


def load_finished(out: Path, model: str) -> SearchResult | None:
    if not (out / "search_done.json").is_file() or not (out / "shape.json").is_file():
        return None
    shape, data = Shape.load(out / "shape.json")
    if data.get("model", model) != model:  # never hand back another model's search
        raise ConfigError(
            f"{out} holds a finished search of {data['model']}, not {model}. Fix: use another "
            "output folder"
        )
    last, _ = Shape.load(out / "shape_last.json")
    best = Shape.load(out / "shape_best.json")[0] if (out / "shape_best.json").is_file() else None
    rows = JsonlLogger(out / "history.jsonl").rows()
    return SearchResult(
        model=data.get("model", model),
        shape=shape,
        flops=int(data["flops"]),
        params=int(data["params"]),
        flops_ratio=float(data["flops_ratio"]),
        last_shape=last,
        best_shape=best,
        history=rows,
        latency=data.get("latency"),
    )
