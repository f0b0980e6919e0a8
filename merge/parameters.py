"""Resolve one parameter for one tensor: conditional filters, gradients, and the precedence levels."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

_MISSING = object()


@dataclass(frozen=True)
class Position:
    """Where a tensor sits: its name, and its place in its slice (None outside the layers)."""

    tensor: str
    layer: Optional[int] = None   # index inside the slice
    slice_len: int = 1
    aliases: tuple[str, ...] = ()  # the tensor's name in the loaded model, where it differs

    @property
    def fraction(self) -> float:
        if self.layer is None or self.slice_len <= 1:
            return 0.0
        return self.layer / (self.slice_len - 1)


def gradient_at(anchors: list[float], fraction: float) -> float:
    """Anchors spread evenly over [0, 1], linearly interpolated at `fraction`."""
    if len(anchors) == 1:
        return float(anchors[0])
    x = fraction * (len(anchors) - 1)
    i = min(int(x), len(anchors) - 2)
    f = x - i
    return float(anchors[i]) * (1 - f) + float(anchors[i + 1]) * f


def evaluate(value: Any, pos: Position) -> Any:
    """A level's value for this tensor, or _MISSING when a conditional list has no match."""
    if isinstance(value, list):
        if value and isinstance(value[0], dict):
            for entry in value:
                f = entry.get("filter")
                if f is None or f in pos.tensor or any(f in a for a in pos.aliases):
                    return evaluate(entry["value"], pos)
            return _MISSING
        if pos.layer is None:
            return float(value[0])  # outside the layers (embeddings, head): the first anchor
        return gradient_at(value, pos.fraction)
    return value


def resolve(levels: list[tuple[str, Optional[dict]]], name: str, pos: Position):
    """(value, field path) from the first level that defines `name` for this tensor, else None."""
    for path, params in levels:
        if params and name in params:
            v = evaluate(params[name], pos)
            if v is not _MISSING:
                return v, f"{path}.{name}"
    return None


def filters_in(value: Any) -> set[str]:
    """Every `filter` string of the conditional lists inside a config (any nesting)."""
    if isinstance(value, dict):
        found = {value["filter"]} if isinstance(value.get("filter"), str) else set()
        return found.union(*(filters_in(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(filters_in(v) for v in value))
    return set()
