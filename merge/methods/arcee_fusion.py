"""Arcee Fusion: keep the other model's change only where it matters most.

    δ          = θ_other − θ_base
    p, q       = softmax(θ_other[r, :]) + 1e-8, softmax(θ_base[r, :]) + 1e-8   per row r (last dim)
    KL_r       = Σ p·log(p/q)
    importance = |δ| · KL_r                                               per entry
    threshold  = Q₂ + 1.5·(Q₃ − Q₁),  Q_q = the ⌊q·(n−1)⌋-th smallest importance (0-based)
    out        = θ_base + δ · [importance ≥ threshold]

This is mergekit 0.1.5's rule, computed with the same fp32 operations so that entries at the
threshold fall on the same side: its quantiles are order statistics without interpolation, the
threshold is formed in fp32 and the comparison keeps ties. A 1-D tensor is one row. Identical
models give importance 0 everywhere and threshold 0, so every (zero) change is kept: the output is
the base.
The order statistics are exact over the whole tensor and streamed (merge/methods/order_stats.py):
no full-size buffer of importances is kept. (The reference estimates them from 1M random entries
when a tensor is larger than that; see docs/compatibility.md.)
"""
from __future__ import annotations

import math

from merge.methods.chunks import flat, row_spans
from merge.methods.order_stats import SMALL, kth_largest_many, sample_positions
from merge.methods.parallel import buffer, map_chunks
from merge.methods.registry import MergeInputs, register

PROB_EPS = 1e-8
QUANTILES = (0.25, 0.5, 0.75)


def row_kl(x, b):
    """Σ p·log(p/q) per row of (rows, L) fp32 tensors, p = softmax(x) + 1e-8, q = softmax(b) + 1e-8.
    Not clamped: rounding may leave a row a hair below 0, as in the reference."""
    import torch

    p = torch.softmax(x, dim=-1).add_(PROB_EPS)
    q = torch.softmax(b, dim=-1).add_(PROB_EPS)
    return torch.sum(p * torch.log(p / q), dim=-1)


def fence(q1: float, median: float, q3: float) -> float:
    """median + 1.5·(q3 − q1) with every operation rounded to fp32."""
    import torch

    q1_, med_, q3_ = (torch.tensor(v, dtype=torch.float32) for v in (q1, median, q3))
    return float(med_ + 1.5 * (q3_ - q1_))


@register("arcee_fusion", [], needs_base=True, min_models=1, max_models=1,
          summary="keep the other model's changes only where |Δ| × per-row KL of softmaxes "
                  "reaches median + 1.5·IQR")
def arcee_fusion(inp: MergeInputs):
    import torch

    shape = inp.base.shape
    length = shape[-1] if len(shape) >= 1 else 1
    base, other = flat(inp.base), flat(inp.tensors[0])
    device = base.device
    n = base.numel()
    spans = list(row_spans(shape, length))

    def chunk_kl(s):
        b = buffer("fusion.b", s.stop - s.start, device).copy_(base[s]).view(-1, length)
        x = buffer("fusion.x", s.stop - s.start, device).copy_(other[s]).view(-1, length)
        return row_kl(x, b).cpu()

    kl = torch.cat(map_chunks(chunk_kl, spans, device)).to(device)   # one value per row

    def importance(s):
        k = s.stop - s.start
        b = buffer("fusion.b", k, device).copy_(base[s])
        imp = buffer("fusion.imp", k, device).copy_(other[s]).sub_(b).abs_()
        rows = kl[s.start // length:s.stop // length]
        return imp.view(-1, length).mul_(rows[:, None]).view(-1)

    sample = None
    if n > SMALL:
        idx = sample_positions(n, device)
        sample = (other[idx].float() - base[idx].float()).abs_() * kl[idx // length]
    # the ⌊q(n−1)⌋-th smallest (0-based) is the (n − ⌊q(n−1)⌋)-th largest
    ks = [n - math.floor(q * (n - 1)) for q in QUANTILES]
    q1, median, q3 = kth_largest_many(importance, spans, n, ks, sample, device)
    threshold = fence(q1, median, q3)

    out = inp.output(inp.base)
    out_flat = flat(out)

    def write(s):
        k = s.stop - s.start
        keep = importance(s).ge_(threshold)                 # fp32 0/1, in fusion.imp
        b = buffer("fusion.b", k, device).copy_(base[s])
        d = buffer("fusion.x", k, device).copy_(other[s]).sub_(b)
        out_flat[s].copy_(b.addcmul_(d, keep))

    map_chunks(write, spans, device)
    return out
