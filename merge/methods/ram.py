"""RAM and RAM+ (Reinforced Agent Merging, arXiv 2601.13572): average the task vectors only where
several models changed a parameter; keep (and, in RAM+, amplify) the changes only one model made.

RL fine-tuning changes few parameters, and different tasks change different ones, so a plain
average divides each model's unique changes by N. Per entry, with τᵢ = θᵢ − θ_base:

    mᵢ  = [|τᵢ| > epsilon]                 did model i change this entry
    c   = Σᵢ mᵢ                            how many models changed it
    ram:        out = θ_base + Σᵢ mᵢτᵢ / max(c, 1)
                (c = 1: that model's change unchanged; c > 1: the mean of the changes; c = 0: base)
    ramplus_tl: the entries with c = 1 are scaled by a per-model factor
                λᵢ = 1 + r·clamp(ρᵢ, 0, alpha),  ρᵢ = sharedᵢ / max(uniqueᵢ, epsilon)
                sharedᵢ = #entries with mᵢ and c > 1, uniqueᵢ = #entries with mᵢ and c = 1,
                counted over this tensor ("tensor-local": the paper's RAM+ counts over the model)

A model that overlaps much with the others loses more of its signal to averaging, so its unique
entries are boosted more, by at most r·alpha. Identical models (all τ = 0) give the base; no input
gives NaN (λᵢ only scales model i's unique entries, so a model without any has λᵢ = 1).
"""
from __future__ import annotations

import math

from merge.methods.chunks import flat, row_spans
from merge.methods.combine import stacked_chunk
from merge.methods.parallel import buffer, map_chunks
from merge.methods.registry import MergeInputs, Param, register

EPSILON = Param("epsilon", default=1e-5, min=-math.inf, max=math.inf,
                doc="a task-vector entry counts as changed when |τ| > epsilon")


def _masked(xs, base, s, eps: float):
    """(masked task vectors mᵢτᵢ, masks mᵢ as fp32 0/1, counts c) over span s; chunk buffers."""
    import torch

    v = stacked_chunk(xs, base, s, "ram.stack")          # (N, k) τ, a scratch copy
    mask = buffer("ram.mask", v.numel(), v.device).view_as(v)
    torch.abs(v, out=mask)
    torch.gt(mask, eps, out=mask)
    v.mul_(mask)
    counts = buffer("ram.count", v.shape[1], v.device)
    torch.sum(mask, dim=0, out=counts)
    return v, mask, counts


def _ram_write(inp: MergeInputs, eps: float, lambdas=None):
    import torch

    xs, base = inp.tensors, inp.base
    out = inp.output(base)
    out_flat, base_flat = flat(out), flat(base)

    def part(s):
        v, mask, counts = _masked(xs, base, s, eps)
        merged = buffer("ram.merged", v.shape[1], v.device)
        torch.sum(v, dim=0, out=merged)
        if lambdas is not None:
            unique = counts == 1
            boosted = lambdas @ v                              # Σ λᵢ·mᵢτᵢ
            merged.div_(counts.clamp_min_(1.0))
            merged = torch.where(unique, boosted, merged)
        else:
            merged.div_(counts.clamp_min_(1.0))
        out_flat[s].copy_(merged.add_(base_flat[s]))

    map_chunks(part, row_spans(base.shape), base.device)
    return out


@register("ram", [EPSILON], needs_base=True, min_models=1,
          paper="https://arxiv.org/abs/2601.13572",
          summary="per entry: the mean of the task vectors that changed it (|τ| > epsilon); "
                  "a change only one model made is kept whole")
def ram(inp: MergeInputs):
    return _ram_write(inp, float(inp.params.get("epsilon", 1e-5)))


@register("ramplus_tl",
          [Param("r", default=0.1, min=-math.inf, max=math.inf,
                 doc="strength of the boost of each model's unique changes"),
           Param("alpha", default=0.2, min=-math.inf, max=math.inf,
                 doc="cap on the overlap ratio ρ"),
           EPSILON],
          needs_base=True, min_models=1,
          paper="https://arxiv.org/abs/2601.13572",
          summary="ram, with each model's unique changes scaled by 1 + r·clamp(shared/unique, "
                  "0, alpha), counted per tensor")
def ramplus_tl(inp: MergeInputs):
    import torch

    eps = float(inp.params.get("epsilon", 1e-5))
    r, alpha = float(inp.params.get("r", 0.1)), float(inp.params.get("alpha", 0.2))
    xs, base = inp.tensors, inp.base

    def count(s):
        _, mask, counts = _masked(xs, base, s, eps)
        # fp32 sums of 0/1 are exact below 2^24 entries per chunk
        shared, unique = mask @ (counts > 1).float(), mask @ (counts == 1).float()
        return torch.stack([shared, unique]).double().cpu()

    parts = map_chunks(count, row_spans(base.shape), base.device)
    totals = sum(parts) if parts else torch.zeros((2, len(xs)), dtype=torch.float64)
    lambdas = []
    for shared, unique in totals.T.tolist():
        if unique > 0:
            rho = shared / max(unique, eps)
            lambdas.append(1.0 + r * min(max(rho, 0.0), alpha))   # clamp(ρ, 0, α) as torch does
        else:
            lambdas.append(1.0)       # no unique entries: λ scales nothing
    return _ram_write(inp, eps, torch.tensor(lambdas, dtype=torch.float32, device=base.device))
