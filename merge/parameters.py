"""Resolve one parameter for one tensor: conditional filters, gradients, and the precedence levels.

The rules are the reference toolkit's (mergekit 0.1.5), see docs/configuration.md:
* a gradient's anchors are spread evenly over a slice's layers; layer i of an n-layer slice sits at
  i/(n-1), a one-layer slice at 1 (its last anchor), tensors outside the layers at 0;
* a conditional entry matches when its filter is missing, `*`, or a substring of the tensor's name
  (or of its name in the current Transformers layout, see `layout_names`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

_MISSING = object()


@dataclass(frozen=True)
class Position:
    """Where a tensor sits: its name, and its place in its slice (None outside the layers)."""

    tensor: str
    layer: Optional[int] = None   # index inside the slice
    slice_len: int = 1

    @property
    def fraction(self) -> float:
        if self.layer is None:
            return 0.0
        if self.slice_len <= 1:
            return 1.0
        return self.layer / (self.slice_len - 1)

    def renamed(self, tensor: str) -> "Position":
        return Position(tensor, self.layer, self.slice_len)


# Checkpoints saved before Transformers 5 name mixture-of-experts weights per expert
# (`block_sparse_moe.experts.3.w1.weight`); Transformers 5 loads them into fused tensors named
# `mlp.experts.gate_up_proj` / `mlp.experts.down_proj`, and the reference toolkit matches filters
# against those names. A filter therefore also matches the tensor's current-layout name.
_LAYOUT_RENAMES = (
    (re.compile(r"\.block_sparse_moe\."), ".mlp."),
    (re.compile(r"\.experts\.\d+\.(w1|w3|gate_proj|up_proj)\.weight$"), ".experts.gate_up_proj"),
    (re.compile(r"\.experts\.\d+\.(w2|down_proj)\.weight$"), ".experts.down_proj"),
)


def layout_names(tensor: str) -> tuple[str, ...]:
    """The tensor's own name, plus its Transformers-5 layout name where that differs."""
    renamed = tensor
    for pattern, repl in _LAYOUT_RENAMES:
        renamed = pattern.sub(repl, renamed)
    return (tensor,) if renamed == tensor else (tensor, renamed)


def gradient_at(anchors: list[float], fraction: float) -> float:
    """Anchors spread evenly over [0, 1], linearly interpolated at `fraction`."""
    if len(anchors) == 1:
        return float(anchors[0])
    x = fraction * (len(anchors) - 1)
    i = min(int(x), len(anchors) - 2)
    f = x - i
    return float(anchors[i]) * (1 - f) + float(anchors[i + 1]) * f


def as_number(v: Any) -> Any:
    """A numeric string ('1e-5': YAML 1.1 reads exponents without a dot as strings) → float."""
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


_TRUE = {"true", "t", "yes", "y", "on", "1"}      # the strings pydantic (the reference) reads as bools
_FALSE = {"false", "f", "no", "n", "off", "0"}


def as_bool(v: Any) -> Any:
    """'true', 'no', 1, ... → a bool, as the reference's schema reads them; anything else as is."""
    if isinstance(v, str) and v.strip().lower() in _TRUE | _FALSE:
        return v.strip().lower() in _TRUE
    if not isinstance(v, bool) and isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    return v


def filter_matches(f: Optional[str], tensor: str) -> bool:
    if f is None or f == "*":
        return True
    return any(f in name for name in layout_names(tensor))


def evaluate(value: Any, pos: Position) -> Any:
    """A level's value for this tensor, or _MISSING when a conditional list has no match."""
    if isinstance(value, dict):   # one conditional entry given without a list
        value = [value]
    if isinstance(value, list):
        if value and isinstance(value[0], dict):
            for entry in value:
                if filter_matches(entry.get("filter"), pos.tensor):
                    return evaluate(entry["value"], pos)
            return _MISSING
        anchors = [as_number(v) for v in value]
        if not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in anchors):
            # strings or booleans: a step function, as the reference picks them
            return anchors[int(pos.fraction * (len(anchors) - 1))]
        if pos.layer is None:
            return float(anchors[0])  # outside the layers (embeddings, head): the first anchor
        return gradient_at(anchors, pos.fraction)
    return value


def resolve(levels: list[tuple[str, Optional[dict]]], name: str, pos: Position):
    """(value, field path) from the first level that defines `name` for this tensor, else None."""
    for path, params in levels:
        if params and name in params:
            v = evaluate(params[name], pos)
            if v is not _MISSING and v is not None:
                return v, f"{path}.{name}"
    return None
