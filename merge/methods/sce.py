"""SCE (FuseChat, Wan et al., 2024): Select, Calculate, Erase — with mergekit 0.1.5's numbers.

    τᵢ   = θᵢ − θ_base
    Select:    when select_topk < 1, keep the k = ⌊nnz·select_topk⌋ positions of largest variance
               across the models, Var_i(τᵢ) (population variance), where nnz counts the positions
               of non-zero variance (the product is rounded to fp32 first, as the reference's
               tensor arithmetic does); ties at the cut-off by position; τᵢ is zeroed elsewhere
    Calculate: mᵢ = mean(τᵢ²) over the whole tensor (selected τ); wᵢ = mᵢ / Σⱼ mⱼ, or uniform 1/N
               when Σⱼ mⱼ < 1e-6 (small task vectors: the reference's cut-off)
    Erase:     elected sign s = +1 where Σᵢ τᵢ >= 0, else −1; τᵢ survives where τᵢ·s > 0
    out  = θ_base + Σᵢ wᵢ·τᵢ·[survives] / max(Σᵢ wᵢ·[survives], 1e-6)

Streaming passes (non-zero count and variance cut when selecting, weights, output); no full-size
buffer.
"""
from __future__ import annotations

from merge.methods.chunks import flat, row_spans
from merge.methods.combine import stacked_chunk
from merge.methods.order_stats import SMALL, sample_positions
from merge.methods.parallel import buffer, map_chunks
from merge.methods.registry import MergeInputs, Param, register
from merge.methods.sparsify import Chunk, cuts_of
from merge.methods.task_vectors import INT8_MASK

DIV_MIN = 1e-6      # the reference clamps the divisor (summed surviving weights) to this
UNIFORM_BELOW = 1e-6   # Σ mean(τᵢ²) below this: uniform weights (the reference's cut-off)


def select_count(nonzero: int, topk: float) -> int:
    """⌊nnz·select_topk⌋ with the product rounded to fp32 (an int64 tensor times a Python float
    is an fp32 tensor in torch, which the reference truncates)."""
    import numpy as np

    return int(np.float32(nonzero) * np.float32(topk))


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
    chunks = [Chunk(j, s) for j, s in enumerate(row_spans(base.shape))]
    spans = [c.span for c in chunks]
    topk = float(inp.params.get("select_topk", 1.0))
    out = inp.output(base)

    def variance(s):
        v = stacked_chunk(xs, base, s, "sce.tau")
        var = buffer("sce.var", s.stop - s.start, device)
        return torch.var(v, dim=0, correction=0, out=var)

    cut = None
    if topk < 1.0:
        keep = 0
        if topk > 0.0:
            nonzero = sum(map_chunks(lambda s: int(torch.count_nonzero(variance(s))), spans,
                                     device))
            keep = select_count(nonzero, topk)
        if keep <= 0:                                  # nothing selected: the base
            out.copy_(base)
            return out

        def sample_of():
            if n <= SMALL:
                return None
            idx = sample_positions(n, device)
            taus = torch.stack([flat(x)[idx].float() - flat(base)[idx].float() for x in xs])
            return taus.var(dim=0, correction=0)

        (cut,) = cuts_of(variance, spans, n, [keep], sample_of, device)

    def selected(chunk):
        """(N, k) selected task vectors over the chunk (in the sce.tau buffer)."""
        s = chunk.span
        if cut is None:
            return stacked_chunk(xs, base, s, "sce.tau")
        mask = variance(s)                             # fp32 0/1 in the sce.var buffer
        cut.mask_(mask, chunk)
        return buffer("sce.tau", n_models * (s.stop - s.start), device) \
            .view(n_models, -1).mul_(mask.unsqueeze(0))

    def energy(chunk):
        v = selected(chunk)
        return (v * v).sum(dim=1, dtype=torch.float64).cpu()

    ssq = torch.zeros(n_models, dtype=torch.float64)
    for part in map_chunks(energy, chunks, device):
        ssq += part
    means = ssq / max(n, 1)
    total = float(means.sum())
    weights = (means / total if abs(total) >= UNIFORM_BELOW
               else torch.full((n_models,), 1.0 / n_models, dtype=torch.float64))
    w = weights.float().to(device)
    out_flat = flat(out)

    def write(chunk):
        s = chunk.span
        k = s.stop - s.start
        v = selected(chunk)
        elected = buffer("sce.sign", k, device)
        torch.sum(v, dim=0, out=elected).ge_(0.0).mul_(2.0).sub_(1.0)   # a zero sum elects +
        agree = buffer("sce.agree", n_models * k, device).view(n_models, k)
        torch.mul(v, elected.unsqueeze(0), out=agree).gt_(0.0)        # fp32 0/1
        agree.mul_(w[:, None])                                       # wᵢ where τᵢ survives
        div = buffer("sce.div", k, device)
        torch.sum(agree, dim=0, out=div).clamp_min_(DIV_MIN)
        merged = buffer("sce.merged", k, device)
        torch.sum(v.mul_(agree), dim=0, out=merged)
        merged.div_(div).add_(buffer("sce.base", k, device).copy_(flat(base)[s]))
        out_flat[s].copy_(merged)

    map_chunks(write, chunks, device)
    return out
