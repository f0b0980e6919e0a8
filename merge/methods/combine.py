"""Whole-tensor geometry in the span of the inputs.

Spherical means, SLERP and Model Stock only ever need inner products between the inputs (or their
task vectors) and produce a linear combination of them. So a kernel computes the Gram matrix
Gᵢⱼ = ⟨vᵢ, vⱼ⟩ in one chunked pass (fp32 GEMM per chunk, accumulated in fp64), does all its
geometry on N×N numbers, and writes the output in a second pass as Σ cᵢ·xᵢ + c_b·base — memory is
the inputs, the output and per-thread chunk buffers, and iterating (Karcher) costs nothing.
"""
from __future__ import annotations

from typing import Optional, Sequence

from merge.methods.chunks import flat, output_like, row_spans
from merge.methods.parallel import buffer, map_chunks


def stacked_chunk(xs: Sequence, base, s: slice, name: str = "combine.stack"):
    """(N, k) fp32 chunk of the inputs over span `s`, minus the base when one is given."""
    k = s.stop - s.start
    out = buffer(name, len(xs) * k, xs[0].device).view(len(xs), k)
    for i, x in enumerate(xs):
        out[i].copy_(flat(x)[s])
    if base is not None:
        b = buffer(name + ".base", k, xs[0].device).copy_(flat(base)[s])
        out.sub_(b.unsqueeze(0))
    return out


def gram(xs: Sequence, base=None):
    """Gᵢⱼ = ⟨vᵢ, vⱼ⟩ (float64, N×N, on the CPU) with vᵢ = xᵢ − base (or xᵢ without a base)."""
    import torch

    shape = xs[0].shape

    def part(s):
        v = stacked_chunk(xs, base, s)
        return (v @ v.T).double().cpu()

    parts = map_chunks(part, row_spans(shape), xs[0].device)
    total = torch.zeros((len(xs), len(xs)), dtype=torch.float64)
    for p in parts:          # fixed order: the result does not depend on scheduling
        total += p
    return total


def combine(xs: Sequence, coeffs: Sequence[float], base=None, out_dtype=None, out=None):
    """out = base + Σ cᵢ·(xᵢ − base) with a base, Σ cᵢ·xᵢ without; chunked fp32, in `out_dtype`.

    With a base the task vectors are formed first, so identical models give the base back exactly
    and small task vectors keep their precision.
    """
    ref = base if base is not None else xs[0]
    out = output_like(ref, out_dtype, out)
    out_flat = flat(out)
    coeffs = [float(c) for c in coeffs]

    def part(s):
        k = s.stop - s.start
        acc = buffer("combine.acc", k, ref.device)
        tmp = buffer("combine.tmp", k, ref.device)
        if base is not None:
            b = buffer("combine.base", k, ref.device).copy_(flat(base)[s])
            acc.copy_(b)
            for c, x in zip(coeffs, xs):
                acc.add_(tmp.copy_(flat(x)[s]).sub_(b), alpha=c)
        else:
            acc.zero_()
            for c, x in zip(coeffs, xs):
                acc.add_(tmp.copy_(flat(x)[s]), alpha=c)
        out_flat[s].copy_(acc)

    map_chunks(part, row_spans(ref.shape), ref.device)
    return out


def check_weight_sum(model_params, key: str = "weight", what: str = "weights") -> Optional[str]:
    total = sum(float(mp[key]) for mp in model_params)
    if abs(total) < 1e-12:
        return f"the {what} sum to zero; they set the interpolation position, change them"
    return None
