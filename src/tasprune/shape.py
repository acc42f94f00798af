"""`Shape`: the out-width of every searchable conv and the number of blocks of every stage.

A Shape is the output of the search, the input of model construction and part of every
checkpoint. It always lists every conv of the unpruned model (widths of blocks beyond a
stage's depth are carried but unused), so that one schema describes any point of a space.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasprune.errors import ShapeError


@dataclass(frozen=True)
class Shape:
    """Widths (conv name -> out channels) and depths (stage name -> blocks kept)."""

    widths: dict[str, int] = field(default_factory=dict)
    depths: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"widths": dict(self.widths), "depths": dict(self.depths)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Shape:
        """Parse ``{"widths": {...}, "depths": {...}}``; extra keys (model, flops...) are ignored."""
        if not isinstance(data, Mapping):
            raise ShapeError("shape must be a JSON object with 'widths' and 'depths'")
        out: dict[str, dict[str, int]] = {}
        for part in ("widths", "depths"):
            raw = data.get(part)
            if not isinstance(raw, Mapping):
                raise ShapeError(
                    f"shape has no '{part}' object. Fix: write a shape JSON with "
                    f"'widths' and 'depths' maps (e.g. from `tasprune search`)"
                )
            parsed: dict[str, int] = {}
            for key, value in raw.items():
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ShapeError(
                        f"shape {part}['{key}'] = {value!r} is not an integer. Fix: use whole numbers"
                    )
                parsed[str(key)] = value
            out[part] = parsed
        return cls(widths=out["widths"], depths=out["depths"])

    def to_json(self, **extra: Any) -> str:
        return json.dumps({**extra, **self.to_dict()}, indent=2)

    def save(self, path: str | Path, **extra: Any) -> None:
        """Write the shape (plus extra fields such as model, flops) as JSON, atomically."""
        from tasprune.utils import atomic_write_text

        atomic_write_text(Path(path), self.to_json(**extra) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> tuple[Shape, dict[str, Any]]:
        """Read a shape JSON; returns the Shape and the whole JSON object (model, flops...)."""
        if not isinstance(path, (str, os.PathLike)):  # every "Shape or path" argument ends here
            raise ShapeError(
                f"a shape is a Shape or a shape.json path, not {type(path).__name__}. Fix: pass "
                "the path itself, or the Shape (Shape.load returns (shape, info))"
            )
        p = Path(path)
        if not p.is_file():
            raise ShapeError(f"shape file {p} does not exist. Fix: pass the shape.json of a search")
        try:
            data = json.loads(p.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ShapeError(
                f"shape file {p} is not valid JSON ({err}). Fix: regenerate it"
            ) from None
        return cls.from_dict(data), data

    def replace(
        self, widths: Mapping[str, int] | None = None, depths: Mapping[str, int] | None = None
    ) -> Shape:
        """A copy with some widths/depths overridden."""
        return Shape(
            widths={**self.widths, **(widths or {})}, depths={**self.depths, **(depths or {})}
        )

    def validate_against(self, full: Shape, model: str = "the model") -> None:
        """Raise ShapeError unless this shape is a sub-shape of ``full`` (same names, sizes in range)."""
        for part, mine, ref in (
            ("widths", self.widths, full.widths),
            ("depths", self.depths, full.depths),
        ):
            missing = [k for k in ref if k not in mine]
            unknown = [k for k in mine if k not in ref]
            if unknown:
                raise ShapeError(
                    f"shape has unknown {part} {unknown[:3]} for {model}. "
                    f"Fix: use the names of `tasprune space --model {model}`"
                )
            if missing:
                raise ShapeError(
                    f"shape lacks {part} {missing[:3]} of {model} ({len(missing)} missing). "
                    f"Fix: list every {part[:-1]} of the model"
                )
            unit = "channels" if part == "widths" else "blocks"
            for key, value in mine.items():
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ShapeError(
                        f"shape {part}['{key}'] = {value!r} is not an integer. Fix: use whole numbers"
                    )
                if not 1 <= value <= ref[key]:
                    raise ShapeError(
                        f"shape {part}['{key}'] = {value} is outside 1..{ref[key]} {unit} of {model}. "
                        f"Fix: a pruned shape may only shrink the unpruned one"
                    )
