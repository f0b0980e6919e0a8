"""Model Stock (Jang et al., 2024): how far to move from the base towards the average of the
fine-tuned models, from the angle between their task vectors.

    cos θ = mean over pairs i<j of cos(τᵢ, τⱼ)        (τᵢ = θᵢ − θ_base)
    t     = N·cos θ / (1 + (N−1)·cos θ)
    out   = t·mean(θᵢ) + (1 − t)·θ_base  =  θ_base + t·mean(τᵢ)

cos θ is clamped to [0, 1], so t stays in [0, 1]: the paper's geometry assumes task vectors at
equal acute angles; an obtuse mean angle would make t negative or unbounded (it diverges at
cos θ = −1/(N−1)), which amounts to extrapolating away from the fine-tuned models. A zero task
vector has no direction: its pairs count as cosine 0. Identical models give t = 1 (the common
model); orthogonal task vectors give t = 0 (the base).
"""
from __future__ import annotations

from merge.methods.chunks import flat, row_length, row_spans
from merge.methods.combine import combine, gram, stacked_chunk
from merge.methods.parallel import buffer, map_chunks
from merge.methods.registry import MergeInputs, Param, register


def mean_pairwise_cosine(G):
    """Mean cosine over pairs i<j from Gram matrices (..., N, N); 0 for pairs with a zero vector."""
    import torch

    n = G.shape[-1]
    norms = torch.sqrt(torch.diagonal(G, dim1=-2, dim2=-1).clamp_min(0))
    denom = norms[..., :, None] * norms[..., None, :]
    cos = torch.where(denom > 0, G / torch.where(denom > 0, denom, torch.ones_like(denom)),
                      torch.zeros_like(G))
    iu = torch.triu_indices(n, n, offset=1)
    return cos[..., iu[0], iu[1]].mean(dim=-1).clamp(-1.0, 1.0)


def stock_ratio(cos, n: int):
    """t = N·cos/(1+(N−1)·cos) with cos clamped to [0, 1] (works on tensors)."""
    c = cos.clamp(0.0, 1.0)
    return n * c / (1 + (n - 1) * c)


@register("model_stock",
          [Param("filter_wise", default=False, kind=bool,
                 doc="compute the angle and t per row of each weight instead of per tensor")],
          needs_base=True, min_models=2,
          paper="https://arxiv.org/abs/2403.19522",
          summary="move from the base towards the models' average by a ratio set by the angle "
                  "between their task vectors")
def model_stock(inp: MergeInputs):
    import torch

    xs, base = inp.tensors, inp.base
    n = len(xs)
    if not inp.params.get("filter_wise", False) or len(base.shape) < 2:
        t = float(stock_ratio(mean_pairwise_cosine(gram(xs, base)), n))
        return combine(xs, [t / n] * n, base, inp.out_dtype, inp.out)

    length = row_length(base.shape)
    out = inp.output(base)
    out_flat = flat(out)

    def part(s):
        v = stacked_chunk(xs, base, s).view(n, -1, length)          # (N, rows, L)
        rows = v.permute(1, 0, 2)                                    # (rows, N, L)
        G = torch.bmm(rows, rows.transpose(1, 2)).double()           # per-row Gram (rows, N, N)
        t = stock_ratio(mean_pairwise_cosine(G), n).float()          # (rows,)
        res = buffer("model_stock.res", s.stop - s.start, v.device).view(-1, length)
        torch.sum(v, dim=0, out=res)
        res.mul_((t / n)[:, None]).add_(flat(base)[s].view(-1, length))
        out_flat[s].copy_(res.view(-1))

    map_chunks(part, row_spans(base.shape), base.device)
    return out

