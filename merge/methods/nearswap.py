"""NearSwap: take the other model's value where it is close to the base, keep the base where the
two differ a lot.

    w   = clamp(t / max(|θ_base − θ_other|, 1e-6), 0, 1)     (element-wise)
    out = w·θ_other + (1 − w)·θ_base

Entries closer than t are swapped in completely (w = 1); farther ones are pulled in by t/|Δ|, i.e.
the output moves at most t away from the base at each entry. The 1e-6 floor on |Δ| keeps the
division finite (as mergekit 0.1.5 does); where the models agree (Δ = 0) the result is their
common value whatever w is. t ≤ 0 gives the base.
"""
from __future__ import annotations

import math

from merge.methods.chunks import flat, row_spans
from merge.methods.parallel import buffer, map_chunks
from merge.methods.registry import MergeInputs, Param, register

MIN_DISTANCE = 1e-6


@register("nearswap",
          [Param("t", min=-math.inf, max=math.inf,
                 doc="distance below which the other model's value is taken entirely "
                     "(≤ 0: the base)")],
          needs_base=True, min_models=1, max_models=1,
          summary="per entry, interpolate towards the other model by "
                  "clamp(t/max(|Δ|, 1e-6), 0, 1)")
def nearswap(inp: MergeInputs):
    import torch

    t = float(inp.params["t"])
    base, other = flat(inp.base), flat(inp.tensors[0])
    out = inp.output(inp.base)
    out_flat = flat(out)

    def part(s):
        k = s.stop - s.start
        b = buffer("nearswap.b", k, base.device).copy_(base[s])
        d = buffer("nearswap.d", k, base.device).copy_(other[s]).sub_(b)
        if t > 0:
            w = buffer("nearswap.w", k, base.device)
            torch.abs(d, out=w).clamp_min_(MIN_DISTANCE).reciprocal_().mul_(t).clamp_max_(1.0)
            b.addcmul_(d, w)
        out_flat[s].copy_(b)

    map_chunks(part, row_spans(inp.base.shape), base.device)
    return out
