"""Model Stock (Jang et al., 2024): how far to move from the base towards the average of the
fine-tuned models, from the angle between their task vectors (mergekit 0.1.5's numbers).

    cos θ = mean over pairs i<j of ⟨τᵢ, τⱼ⟩ / max(‖τᵢ‖·‖τⱼ‖, 1e-6), each clamped to [−1, 1]
    t     = N·cos θ / (1 + (N−1)·cos θ),   0 where |1 + (N−1)·cos θ| < 1e-6
    out   = t·mean(θᵢ) + (1 − t)·θ_base  =  θ_base + t·mean(τᵢ)          (τᵢ = θᵢ − θ_base)

t is not clamped: task vectors at an obtuse mean angle give a negative t (a step away from the
models' average) and t grows without bound as the denominator approaches 0, as in the reference
(whose only guard is t = 0 at the singularity). The 1e-6 floor on the norm product is the
reference's too: task vectors whose norms multiply to less than 1e-6 get a cosine shrunk towards 0.
Identical models give t = 1 (the common model); orthogonal task vectors give t = 0 (the base).

`filter_wise` computes cos θ and t per vector along the last dimension (the rows of a matrix); a
1-D tensor is one vector.
"""
from __future__ import annotations

from merge.methods.chunks import flat, row_spans
from merge.methods.combine import combine, gram, stacked_chunk
from merge.methods.parallel import buffer, map_chunks
from merge.methods.registry import MergeInputs, Param, register

NORM_FLOOR = 1e-6      # the reference clamps ‖τᵢ‖·‖τⱼ‖ to at least this
SINGULAR = 1e-6        # |1 + (N−1)·cos θ| below this: t = 0 (keep the base)


def mean_pairwise_cosine(G):
    """Mean cosine over pairs i<j from Gram matrices (..., N, N)."""
    import torch

    n = G.shape[-1]
    norms = torch.sqrt(torch.diagonal(G, dim1=-2, dim2=-1).clamp_min(0))
    denom = (norms[..., :, None] * norms[..., None, :]).clamp_min(NORM_FLOOR)
    cos = (G / denom).clamp(-1.0, 1.0)
    iu = torch.triu_indices(n, n, offset=1)
    return cos[..., iu[0], iu[1]].mean(dim=-1)


def stock_ratio(cos, n: int):
    """t = N·cos/(1+(N−1)·cos), 0 at the singularity (works on tensors)."""
    import torch

    denom = 1 + (n - 1) * cos
    singular = denom.abs() < SINGULAR
    safe = torch.where(singular, torch.ones_like(denom), denom)
    return torch.where(singular, torch.zeros_like(cos), n * cos / safe)


@register("model_stock",
          [Param("filter_wise", default=False, kind=bool,
                 doc="compute the angle and t per vector along the last dimension (per row of a "
                     "matrix) instead of per tensor")],
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

    length = base.shape[-1]
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

    map_chunks(part, row_spans(base.shape, length), base.device)
    return out
