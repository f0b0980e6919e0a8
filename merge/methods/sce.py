"""SCE (FuseChat, Wan et al., 2024): Select, Calculate, Erase.

    τᵢ   = θᵢ − θ_base
    Select:    keep the positions whose variance across the models, Var_i(τᵢ) (population
               variance), is among the top `select_topk` fraction of the tensor (ties at the
               threshold are kept); τᵢ is zeroed elsewhere
    Calculate: wᵢ = mean(τᵢ²) / Σⱼ mean(τⱼ²) over the selected τ (uniform when all are zero)
    Erase:     elected sign s = sign(Σᵢ τᵢ); τᵢ survives where τᵢ·s > 0
    out  = θ_base + Σᵢ wᵢ·τᵢ·[survives] / Σᵢ wᵢ·[survives]       (0 where nothing survives)

Three streaming passes (variance threshold, weights, output); no full-size buffer.
"""
from __future__ import annotations

from merge.methods.chunks import flat, row_spans
from merge.methods.combine import stacked_chunk
from merge.methods.order_stats import SMALL, kth_largest_many, sample_positions
from merge.methods.parallel import buffer, map_chunks
from merge.methods.registry import MergeInputs, Param, register
from merge.methods.task_vectors import INT8_MASK

EPS = 1e-8


@register("sce",
          [Param("select_topk", default=1.0, min=0.0, max=1.0,
                 doc="fraction of positions kept, by variance of the task vectors across models"),
           INT8_MASK],
          needs_base=True, min_models=1,
          paper="https://arxiv.org/abs/2408.07990",
          summary="select high-variance positions, weight models by their task vectors' energy, "
                  "TIES sign consensus")
def sce(inp: MergeInputs):
    import torch

    xs, base = inp.tensors, inp.base
    n_models, n = len(xs), base.numel()
    device = base.device
    spans = list(row_spans(base.shape))
    topk = float(inp.params.get("select_topk", 1.0))
    keep = int(round(topk * n))
    out = inp.output(base)
    if keep <= 0:                                      # nothing selected: the base
        out.copy_(base)
        return out

    def variance(s):
        v = stacked_chunk(xs, base, s, "sce.tau")
        var = buffer("sce.var", s.stop - s.start, device)
        return torch.var(v, dim=0, correction=0, out=var)

    threshold = None
    if keep < n:
        sample = None
        if n > SMALL:
            idx = sample_positions(n, device)
            taus = torch.stack([flat(x)[idx].float() - flat(base)[idx].float() for x in xs])
            sample = taus.var(dim=0, correction=0)
        (threshold,) = kth_largest_many(variance, spans, n, [keep], sample, device)

    def selected(s):
        """(N, k) selected task vectors over span s (in the sce.tau buffer)."""
        if threshold is None:
            return stacked_chunk(xs, base, s, "sce.tau")
        mask = variance(s).ge_(threshold)              # fp32 0/1 in the sce.var buffer
        return buffer("sce.tau", n_models * (s.stop - s.start), device) \
            .view(n_models, -1).mul_(mask.unsqueeze(0))

    def energy(s):
        v = selected(s)
        return (v * v).sum(dim=1, dtype=torch.float64).cpu()

    ssq = torch.zeros(n_models, dtype=torch.float64)
    for part in map_chunks(energy, spans, device):
        ssq += part
    total = float(ssq.sum())
    weights = (ssq / total if total > 0 else torch.full((n_models,), 1.0 / n_models,
                                                        dtype=torch.float64))
    w = weights.float().to(device)
    out_flat = flat(out)

    def write(s):
        k = s.stop - s.start
        v = selected(s)
        elected = buffer("sce.sign", k, device)
        torch.sum(v, dim=0, out=elected).sign_()
        agree = buffer("sce.agree", n_models * k, device).view(n_models, k)
        torch.mul(v, elected.unsqueeze(0), out=agree).gt_(0.0)        # fp32 0/1
        agree.mul_(w[:, None])                                       # wᵢ where τᵢ survives
        div = buffer("sce.div", k, device)
        torch.sum(agree, dim=0, out=div)
        merged = buffer("sce.merged", k, device)
        torch.sum(v.mul_(agree), dim=0, out=merged)
        div.add_(torch.abs(div, out=elected).lt_(EPS))               # nothing survives: /~1
        merged.div_(div).add_(buffer("sce.base", k, device).copy_(flat(base)[s]))
        out_flat[s].copy_(merged)

    map_chunks(write, spans, device)
    return out
