"""The task-vector family shares one pipeline:

    τᵢ = θᵢ − θ_base → sparsify (per model) → δᵢ = wᵢ·τᵢ → sign consensus (optional)
       → Σδᵢ, normalised by the summed weights (optional) → ×λ → + θ_base

Methods differ only in how they sparsify and which defaults they take, so a new one is a
`Sparsifier` (merge/methods/sparsify.py) plus a `register` call. Thresholds are found by streaming
over τᵢ once per model (no full-size buffer); the merge itself runs chunk by chunk in fp32 in
reused scratch buffers.

Sign consensus (TIES, the reference's "sum" election): the elected sign is s = +1 where Σδᵢ >= 0
(a zero sum elects +) and −1 elsewhere; δᵢ survives where δᵢ·s > 0 (a zero δᵢ never does); with
`normalize` the sum of the survivors is divided by the sum of the weights of the models that
survive at that entry, or by 1 where that sum is exactly 0. Without consensus, `normalize` divides
by Σwᵢ (by 1 when |Σwᵢ| < 1e-8). λ multiplies the merged task vector (skipped when λ = 1), which is
then added to the base: the reference's order of operations, so fp32 results round alike.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

from merge.methods.chunks import flat
from merge.methods.parallel import buffer, map_chunks
from merge.methods.registry import MergeInputs, Param, register
from merge.methods.sparsify import (Chunk, ChunkFn, band, bernoulli, chunks_of, della_check,
                                    joint_prepass, magnitude, magprune)

EPS = 1e-8
PIECE = 1 << 18   # entries: a piece of a chunk whose fp32 buffers stay in the per-core cache

Sparsifier = Callable[[MergeInputs, int], Optional[ChunkFn]]


@dataclass(frozen=True)
class Pipeline:
    sparsify: Optional[Sparsifier] = None
    consensus: bool = False


def task_vector_merge(inp: MergeInputs, pipeline: Pipeline):
    weights = [float(w) for w in inp.per_model("weight")]
    lam = float(inp.params.get("lambda", 1.0))
    normalize = bool(inp.params.get("normalize", False))
    with joint_prepass(inp):   # DARE/DELLA rescale: one pre-pass over all models
        fns = [pipeline.sparsify(inp, i) if pipeline.sparsify else None
               for i in range(len(inp.tensors))]
    base = flat(inp.base)
    xs = [flat(x) for x in inp.tensors]
    out = inp.output(inp.base)
    out_flat = flat(out)
    total_w = _fp32_sum(weights)
    device = base.device

    # Chunk functions that are purely element-wise (`elementwise`: no draw, no per-row statistic)
    # run over cache-sized pieces of each chunk; the results are the same bits.
    pieces = all(fn is None or getattr(fn, "elementwise", False) for fn in fns)

    def merge_chunk(chunk: Chunk) -> None:
        if pieces and chunk.size % PIECE == 0 and chunk.size > PIECE:
            for j in range(chunk.span.start, chunk.span.stop, PIECE):
                merge_piece(Chunk(chunk.index, slice(j, j + PIECE)))
        else:
            merge_piece(chunk)

    def merge_piece(chunk: Chunk) -> None:
        s, k = chunk.span, chunk.size
        b = buffer("tv.base", k, device).copy_(base[s])
        tmp = buffer("tv.tmp", k, device)
        if pipeline.consensus:
            ds = [buffer(f"tv.delta{i}", k, device) for i in range(len(xs))]
            for i, x in enumerate(xs):
                _delta(x[s], b, ds[i], fns[i], chunk, weights[i], tmp)
            merged = _consensus(ds, weights, normalize, buffer("tv.div", k, device), tmp,
                                buffer("tv.tmp2", k, device))
        else:
            merged = buffer("tv.sum", k, device).zero_()
            d = buffer("tv.delta", k, device)
            for i, x in enumerate(xs):
                _delta(x[s], b, d, fns[i], chunk, weights[i], tmp)
                merged.add_(d)
            if normalize:
                merged.div_(total_w if abs(total_w) >= EPS else 1.0)
        if lam != 1.0:
            merged.mul_(lam)
        out_flat[s].copy_(b.add_(merged))

    map_chunks(merge_chunk, chunks_of(inp.base.shape), device)
    return out


def _fp32_sum(values) -> float:
    """Σ values accumulated in fp32, in order (as the reference sums its fp32 weight tensor)."""
    import numpy as np

    total = np.float32(0.0)
    for v in values:
        total = np.float32(total + np.float32(v))
    return float(total)


def _delta(x, b, d, fn, chunk, w, tmp) -> None:
    """d ← w · sparsify(x − b), in place (a sparsifier that `writes_delta` kept its own τ)."""
    if getattr(fn, "writes_delta", False):
        fn(d, chunk, w, tmp)
        return
    d.copy_(x).sub_(b)
    if fn is None:
        d.mul_(w)
    else:
        fn(d, chunk, w, tmp)


def _consensus(ds, weights, normalize, div, tmp, tmp2):
    """TIES sign consensus over the weighted deltas (consumed in place); returns the merged chunk.

    Masks are kept as fp32 0/1 values: element-wise compares into bool tensors and `masked_fill_`
    cost several times more than float ops on this path.
    """
    import torch

    elected = tmp.copy_(ds[0])
    for d in ds[1:]:
        elected.add_(d)
    elected.ge_(0.0).mul_(2.0).sub_(1.0)          # +1 where Σδᵢ >= 0, else −1
    if normalize:
        div.zero_()
    for d, w in zip(ds, weights):
        d.mul_(elected).clamp_min_(0.0)           # |δᵢ| where it agrees with the elected sign
        if normalize:
            div.add_(torch.sign(d, out=tmp2), alpha=w)   # 1 where δᵢ survives
    merged = ds[0]
    for d in ds[1:]:
        merged.add_(d)
    merged.mul_(elected)
    if normalize:
        div.add_(torch.eq(div, 0.0, out=tmp2))          # divisor exactly 0: divide by 1
        merged.div_(div)
    return merged


# --- parameters -----------------------------------------------------------------------------------

WEIGHT = Param("weight", per_model=True, doc="scale of this model's task vector")
DENSITY = Param("density", default=1.0, per_model=True, min=0.0, max=1.0,
                doc="fraction of the task vector kept")
LAMBDA = Param("lambda", default=1.0, min=-math.inf, max=math.inf,
               doc="scale of the merged task vector")
INT8_MASK = Param("int8_mask", default=False, kind=bool,
                  doc="accepted for compatibility; no effect (masks are never stored: the merge "
                      "runs in fp32 chunks)")
GAMMA = Param("gamma", default=0.01, per_model=True, min=0.0, max=1.0,
              doc="fraction of largest-magnitude entries dropped as outliers")
EPSILON = Param("epsilon", default=0.15, per_model=True, min=0.0, max=1.0,
                doc="keep-probabilities range over density ± epsilon by magnitude rank")


def _normalize(default: bool) -> Param:
    return Param("normalize", default=default, kind=bool,
                 doc="divide the merged task vector by the sum of the weights")


def _rescale(default: bool) -> Param:
    return Param("rescale", default=default, kind=bool,
                 doc="rescale kept entries so the L1 norm of each task vector is preserved")


def _params(normalize: bool, *extra: Param, rescale: Optional[bool] = None) -> list[Param]:
    out = [WEIGHT, *extra, _normalize(normalize)]
    if rescale is not None:
        out.append(_rescale(rescale))
    return out + [LAMBDA, INT8_MASK]


# --- methods --------------------------------------------------------------------------------------

# The reference declares density and rescale for task_arithmetic too (it has no sparsifier, so
# they do nothing there): configs that carry them are accepted.
UNUSED_DENSITY = Param("density", default=1.0, per_model=True, min=0.0, max=1.0, inert=True,
                       doc="accepted for compatibility; no effect (task_arithmetic keeps every "
                           "entry)")
UNUSED_RESCALE = Param("rescale", default=False, kind=bool, inert=True,
                       doc="accepted for compatibility; no effect (nothing is dropped)")


@register("task_arithmetic", [WEIGHT, UNUSED_DENSITY, _normalize(False), UNUSED_RESCALE, LAMBDA,
                              INT8_MASK], needs_base=True,
          paper="https://arxiv.org/abs/2212.04089",
          summary="base + λ·Σ wᵢ(θᵢ − base)")
def task_arithmetic(inp: MergeInputs):
    return task_vector_merge(inp, Pipeline())


@register("ties", _params(True, DENSITY, rescale=False), needs_base=True,
          paper="https://arxiv.org/abs/2306.01708",
          summary="trim task vectors to their top-density magnitudes, elect a sign per entry, "
                  "average the agreeing ones")
def ties(inp: MergeInputs):
    return task_vector_merge(inp, Pipeline(sparsify=magnitude, consensus=True))


@register("dare_linear", _params(False, DENSITY, rescale=True), needs_base=True,
          paper="https://arxiv.org/abs/2311.03099",
          summary="random Bernoulli(density) drop of task-vector entries, rescaled by 1/density, "
                  "then task arithmetic")
def dare_linear(inp: MergeInputs):
    return task_vector_merge(inp, Pipeline(sparsify=bernoulli))


@register("dare_ties", _params(False, DENSITY, rescale=True), needs_base=True,
          paper="https://arxiv.org/abs/2311.03099",
          summary="DARE random drop and rescale, then TIES sign consensus")
def dare_ties(inp: MergeInputs):
    return task_vector_merge(inp, Pipeline(sparsify=bernoulli, consensus=True))


@register("breadcrumbs", _params(False, DENSITY, GAMMA, rescale=False), needs_base=True,
          paper="https://arxiv.org/abs/2312.06795",
          summary="drop the largest (gamma) and smallest task-vector entries, keep density; "
                  "then task arithmetic")
def breadcrumbs(inp: MergeInputs):
    return task_vector_merge(inp, Pipeline(sparsify=band))


@register("breadcrumbs_ties", _params(False, DENSITY, GAMMA, rescale=False), needs_base=True,
          paper="https://arxiv.org/abs/2312.06795",
          summary="model breadcrumbs sparsification, then TIES sign consensus")
def breadcrumbs_ties(inp: MergeInputs):
    return task_vector_merge(inp, Pipeline(sparsify=band, consensus=True))


@register("della", _params(True, DENSITY, EPSILON, rescale=True), needs_base=True,
          check=della_check, paper="https://arxiv.org/abs/2406.11617",
          summary="magnitude-rank-dependent random drop (MagPrune) and rescale, then TIES sign "
                  "consensus")
def della(inp: MergeInputs):
    return task_vector_merge(inp, Pipeline(sparsify=magprune, consensus=True))


@register("della_linear", _params(False, DENSITY, EPSILON, rescale=True), needs_base=True,
          check=della_check, paper="https://arxiv.org/abs/2406.11617",
          summary="MagPrune random drop and rescale, then task arithmetic")
def della_linear(inp: MergeInputs):
    return task_vector_merge(inp, Pipeline(sparsify=magprune))
