"""Arcee Fusion: keep the other model's change only where it matters most.

    δ          = θ_other − θ_base
    KL_r       = KL( softmax(θ_other[r, :]) ‖ softmax(θ_base[r, :]) )    per row r (last dim)
    importance = |δ| · KL_r                                               per entry
    threshold  = median + 1.5·IQR of the importance over the whole tensor (quantiles as
                 torch.quantile: linear interpolation between order statistics)
    out        = θ_base + δ · [importance > threshold]

A 1-D tensor is one row. The KL is computed from log-softmaxes (no epsilon) and clamped at 0
against rounding. Identical models give importance 0 everywhere, so nothing passes the (zero)
threshold and the output is the base. The quantiles are exact but streamed: no full-size buffer
of importances is kept (merge/methods/order_stats.py).
"""
from __future__ import annotations

from merge.methods.chunks import flat, row_spans
from merge.methods.order_stats import SMALL, quantiles, sample_positions
from merge.methods.parallel import buffer, map_chunks
from merge.methods.registry import MergeInputs, register


def row_kl(x, b):
    """KL(softmax(x) ‖ softmax(b)) per row of (rows, L) fp32 tensors, ≥ 0."""
    import torch

    logp = torch.log_softmax(x, dim=1)
    logq = torch.log_softmax(b, dim=1)
    return (logp.exp() * (logp - logq)).sum(dim=1).clamp_min_(0.0)


@register("arcee_fusion", [], needs_base=True, min_models=1, max_models=1,
          summary="keep the other model's changes only where |Δ| × per-row KL of softmaxes "
                  "exceeds median + 1.5·IQR")
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
    q1, median, q3 = quantiles(importance, spans, n, [0.25, 0.5, 0.75], sample, device)
    threshold = median + 1.5 * (q3 - q1)

    out = inp.output(inp.base)
    out_flat = flat(out)

    def write(s):
        k = s.stop - s.start
        keep = importance(s).gt_(threshold)                 # fp32 0/1, in fusion.imp
        b = buffer("fusion.b", k, device).copy_(base[s])
        d = buffer("fusion.x", k, device).copy_(other[s]).sub_(b)
        out_flat[s].copy_(b.addcmul_(d, keep))

    map_chunks(write, spans, device)
    return out
