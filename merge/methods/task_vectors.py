"""The task-vector family shares one pipeline:

    τᵢ = θᵢ − θ_base → sparsify (per model) → δᵢ = wᵢ·τᵢ → sign consensus (optional)
       → Σδᵢ, normalised by the summed weights (optional) → ×λ → + θ_base

Methods differ only in how they sparsify and which defaults they take, so a new one is a
`Sparsifier` plus a `register` call. Global statistics (magnitude thresholds) are computed once per
model over the whole tensor; everything else runs chunk by chunk in fp32.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from merge.methods.chunks import flat, output_like, spans
from merge.methods.registry import MergeInputs, Param, register
from merge.methods.selection import magnitude_threshold

EPS = 1e-8

# A sparsifier is prepared once per (tensor, model) and then applied to chunks of that model's τ.
ChunkFn = Callable[[object, slice], object]   # (τ chunk fp32, span) -> sparsified τ chunk
Sparsifier = Callable[[MergeInputs, int], Optional[ChunkFn]]


def abs_task_vector(inp: MergeInputs, i: int):
    """|τᵢ| over the whole tensor, as one fp32 buffer (the only full-size temporary)."""
    import torch

    x, b = flat(inp.tensors[i]), flat(inp.base)
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    for s in spans(x.numel()):
        torch.sub(x[s].float(), b[s].float(), out=out[s])
    return out.abs_()


def magnitude(inp: MergeInputs, i: int) -> Optional[ChunkFn]:
    """TIES: keep the top-`density` fraction of |τᵢ| (per tensor)."""
    density = float(inp.model_params[i]["density"])
    if density >= 1.0:
        return None
    if density <= 0.0:
        return lambda d, s: d.zero_()
    thr = magnitude_threshold(abs_task_vector(inp, i), density)
    return lambda d, s: d.mul_(d.abs() >= thr)


@dataclass(frozen=True)
class Pipeline:
    sparsify: Optional[Sparsifier] = None
    consensus: bool = False


def task_vector_merge(inp: MergeInputs, pipeline: Pipeline):
    import torch

    weights = [float(w) for w in inp.per_model("weight")]
    lam = float(inp.params.get("lambda", 1.0))
    normalize = bool(inp.params.get("normalize", False))
    fns = [pipeline.sparsify(inp, i) if pipeline.sparsify else None
           for i in range(len(inp.tensors))]
    base = flat(inp.base)
    xs = [flat(x) for x in inp.tensors]
    w = torch.tensor(weights, dtype=torch.float32, device=base.device)
    out = output_like(inp.base, inp.out_dtype)
    out_flat = flat(out)
    for s in spans(base.numel()):
        b = base[s].float()
        deltas = []
        for i, x in enumerate(xs):
            d = x[s].float() - b
            if fns[i] is not None:
                d = fns[i](d, s)
            deltas.append(d.mul_(weights[i]))
        d = torch.stack(deltas)
        if pipeline.consensus:
            elected = torch.sign(d.sum(dim=0))
            agree = torch.sign(d) == elected
            d.mul_(agree)
            divisor = (w[:, None] * agree).sum(dim=0)
        else:
            divisor = w.sum().expand(d.shape[1])
        merged = d.sum(dim=0)
        if normalize:
            merged.div_(torch.where(divisor.abs() < EPS, torch.ones_like(divisor), divisor))
        out_flat[s] = b.add_(merged, alpha=lam)
    return out


WEIGHT = Param("weight", per_model=True, doc="scale of this model's task vector")
DENSITY = Param("density", default=1.0, per_model=True, min=0.0, max=1.0,
                doc="fraction of the task vector kept")
LAMBDA = Param("lambda", default=1.0, doc="scale of the merged task vector")


def _normalize(default: bool) -> Param:
    return Param("normalize", default=default, kind=bool,
                 doc="divide the merged task vector by the sum of the weights")


@register("task_arithmetic", [WEIGHT, _normalize(False), LAMBDA], needs_base=True,
          paper="https://arxiv.org/abs/2212.04089",
          summary="base + λ·Σ wᵢ(θᵢ − base)")
def task_arithmetic(inp: MergeInputs):
    return task_vector_merge(inp, Pipeline())


@register("ties", [WEIGHT, DENSITY, _normalize(True), LAMBDA], needs_base=True,
          paper="https://arxiv.org/abs/2306.01708",
          summary="trim task vectors to their top-density magnitudes, elect a sign per entry, "
                  "average the agreeing ones")
def ties(inp: MergeInputs):
    return task_vector_merge(inp, Pipeline(sparsify=magnitude, consensus=True))
