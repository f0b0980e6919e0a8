"""Spherical methods: nuslerp, multislerp, karcher.

    nuslerp     SLERP of two tensors (or their task vectors) at t = w₂/(w₁+w₂): whole tensors,
                per row, or per column
    multislerp  weighted spherical mean of N directions in one tangent-space step at their
                normalised weighted (chordal) mean; norm restored as Σwᵢ‖xᵢ‖
    karcher     the Riemannian (Karcher / Fréchet) mean of the unit directions, iterated to
                convergence; norm = the weighted mean of the norms

SLERP here interpolates the raw vectors with sine weights: c₀ = sin((1−t)θ)/sin θ,
c₁ = sin(tθ)/sin θ, θ the angle between them. Where the angle is degenerate — either vector is zero,
or |cos θ| > 0.9995 (parallel, or antipodal where no great circle is preferred) — it is the linear
interpolation (1−t)·v₀ + t·v₁, so no input ever produces NaN.

The spherical means run on the Gram matrix of the inputs (merge/methods/combine.py): every point
of the computation is a linear combination of the inputs, so iterating is free.
"""
from __future__ import annotations

import math
from typing import Optional

from merge.methods.chunks import flat, row_length, row_spans
from merge.methods.combine import check_weight_sum, combine, gram, stacked_chunk
from merge.methods.parallel import buffer, map_chunks
from merge.methods.registry import MergeInputs, Param, register

DOT_THRESHOLD = 0.9995


def slerp_coefficients(t: float, dot, na, nb):
    """Vectorised (c₀, c₁) for slerp(t) = c₀·v₀ + c₁·v₁ from ⟨v₀,v₁⟩, ‖v₀‖², ‖v₁‖² (float64)."""
    import torch

    dot, na, nb = (torch.as_tensor(v, dtype=torch.float64) for v in (dot, na, nb))
    denom = torch.sqrt(na.clamp_min(0) * nb.clamp_min(0))
    valid = denom > 0
    cos = torch.where(valid, dot / torch.where(valid, denom, torch.ones_like(denom)),
                      torch.ones_like(denom)).clamp(-1.0, 1.0)
    lerp = ~valid | (cos.abs() > DOT_THRESHOLD)
    theta = torch.acos(cos)
    sin = torch.where(lerp, torch.ones_like(theta), torch.sin(theta))
    c0 = torch.where(lerp, torch.full_like(theta, 1.0 - t), torch.sin((1.0 - t) * theta) / sin)
    c1 = torch.where(lerp, torch.full_like(theta, t), torch.sin(t * theta) / sin)
    return c0, c1


# --- nuslerp --------------------------------------------------------------------------------------

def _nuslerp_check(model_params, params) -> Optional[str]:
    return check_weight_sum(model_params)


@register("nuslerp",
          [Param("weight", per_model=True, min=-math.inf, max=math.inf,
                 doc="relative weight; t = w₂/(w₁+w₂)"),
           Param("nuslerp_flatten", default=True, kind=bool,
                 doc="interpolate whole tensors as single vectors; false: per row or column"),
           Param("nuslerp_row_wise", default=False, kind=bool,
                 doc="with nuslerp_flatten false: interpolate rows (true) or columns (false)")],
          uses_base=True, min_models=2, max_models=2, check=_nuslerp_check,
          paper="https://en.wikipedia.org/wiki/Slerp",
          summary="SLERP of two models (or, with a base, of their task vectors) at "
                  "t = w₂/(w₁+w₂), over whole tensors, rows or columns")
def nuslerp(inp: MergeInputs):
    w1, w2 = (float(w) for w in inp.per_model("weight"))
    t = w2 / (w1 + w2)
    xs, base = inp.tensors, inp.base
    shape = xs[0].shape
    if inp.params.get("nuslerp_flatten", True) or len(shape) < 2:
        g = gram(xs, base)
        c0, c1 = slerp_coefficients(t, g[0, 1], g[0, 0], g[1, 1])
        return combine(xs, [float(c0), float(c1)], base, inp.out_dtype, inp.out)
    if inp.params.get("nuslerp_row_wise", False):
        return _nuslerp_rows(inp, t)
    return _nuslerp_columns(inp, t)


def _nuslerp_rows(inp: MergeInputs, t: float):
    """Each row W[r, :] is interpolated on its own; chunks hold whole rows, so one pass."""
    xs, base = inp.tensors, inp.base
    shape, length = xs[0].shape, row_length(xs[0].shape)
    out = inp.output(xs[0])
    out_flat = flat(out)

    def part(s):
        v = stacked_chunk(xs, base, s).view(2, -1, length)
        a, b = v[0], v[1]
        c0, c1 = slerp_coefficients(t, (a * b).sum(1, dtype=_f64()), (a * a).sum(1, dtype=_f64()),
                                    (b * b).sum(1, dtype=_f64()))
        res = buffer("nuslerp.res", s.stop - s.start, a.device).view(-1, length)
        res.copy_(a).mul_(c0.float().to(a.device)[:, None])
        res.addcmul_(b, c1.float().to(a.device)[:, None])
        if base is not None:
            res.add_(flat(base)[s].view(-1, length))
        out_flat[s].copy_(res.view(-1))

    map_chunks(part, row_spans(shape), xs[0].device)
    return out


def _nuslerp_columns(inp: MergeInputs, t: float):
    """Each column W[:, j] is interpolated on its own: one pass for the per-column products,
    one to write."""
    import torch

    xs, base = inp.tensors, inp.base
    shape, length = xs[0].shape, row_length(xs[0].shape)
    spans = list(row_spans(shape))

    def stats(s):
        v = stacked_chunk(xs, base, s).view(2, -1, length)
        a, b = v[0], v[1]
        return torch.stack([(a * b).sum(0, dtype=_f64()), (a * a).sum(0, dtype=_f64()),
                            (b * b).sum(0, dtype=_f64())]).cpu()

    totals = torch.zeros((3, length), dtype=torch.float64)
    for p in map_chunks(stats, spans, xs[0].device):
        totals += p
    c0, c1 = slerp_coefficients(t, totals[0], totals[1], totals[2])
    c0, c1 = c0.float().to(xs[0].device), c1.float().to(xs[0].device)
    out = inp.output(xs[0])
    out_flat = flat(out)

    def write(s):
        v = stacked_chunk(xs, base, s).view(2, -1, length)
        res = buffer("nuslerp.res", s.stop - s.start, v.device).view(-1, length)
        res.copy_(v[0]).mul_(c0).addcmul_(v[1], c1.expand_as(res))
        if base is not None:
            res.add_(flat(base)[s].view(-1, length))
        out_flat[s].copy_(res.view(-1))

    map_chunks(write, spans, xs[0].device)
    return out


def _f64():
    import torch

    return torch.float64


# --- spherical means on the Gram matrix -----------------------------------------------------------

class SphereInSpan:
    """Points of the unit sphere written as coefficient vectors c over the inputs vᵢ:
    the point is Σ cᵢvᵢ and ⟨p, q⟩ = pᵀGq."""

    def __init__(self, G):
        self.G = G

    def dot(self, p, q):
        return float(p @ self.G @ q)

    def norm(self, p):
        return math.sqrt(max(self.dot(p, p), 0.0))

    def log(self, m, u):
        """Tangent vector at m pointing to u with length = the angle; zero when u = ±m
        (the antipodal direction is undefined, so it pulls nowhere)."""
        cos = max(-1.0, min(1.0, self.dot(u, m)))
        v = u - cos * m
        sin = self.norm(v)
        if sin < 1e-12:
            return v * 0.0
        return v * (math.acos(cos) / sin)

    def exp(self, m, v):
        length = self.norm(v)
        if length < 1e-15:
            return m
        p = m * math.cos(length) + v * (math.sin(length) / length)
        return p / self.norm(p)


def spherical_mean(G, weights, eps: float, iterations: int, tol: float = 0.0):
    """Coefficients of the weighted spherical mean direction of the inputs (unit vector, as a
    combination of the raw inputs), or None when the inputs give no preferred direction (all zero,
    or they cancel: e.g. two antipodal vectors with equal weights).

    Zero vectors (norm <= eps·largest norm) have no direction: they are left out of the average.
    The mean starts at the normalised weighted chordal mean and takes `iterations` tangent-space
    steps (stopping early once the mean tangent is shorter than `tol`).
    """
    import torch

    n = G.shape[0]
    norms = torch.sqrt(torch.diagonal(G).clamp_min(0))
    top = float(norms.max()) if n else 0.0
    valid = [i for i in range(n) if top > 0 and float(norms[i]) > eps * top]
    wsum = sum(weights[i] for i in valid)
    if not valid or abs(wsum) < 1e-12:
        return None
    w = {i: weights[i] / wsum for i in valid}
    sphere = SphereInSpan(G)
    units = {}
    for i in valid:
        u = torch.zeros(n, dtype=torch.float64)
        u[i] = 1.0 / float(norms[i])
        units[i] = u
    chord = sum(w[i] * units[i] for i in valid)
    length = sphere.norm(chord)
    if length < 1e-6:
        return None
    m = chord / length
    for _ in range(iterations):
        step = sum(w[i] * sphere.log(m, units[i]) for i in valid)
        if sphere.norm(step) <= tol:
            break
        m = sphere.exp(m, step)
    return m


def _weight_check(model_params, params) -> Optional[str]:
    if params.get("normalize_weights", True):
        return check_weight_sum(model_params)
    return None


@register("multislerp",
          [Param("weight", per_model=True, min=-math.inf, max=math.inf,
                 doc="this model's weight in the spherical mean"),
           Param("normalize_weights", default=True, kind=bool,
                 doc="divide the weights by their sum"),
           Param("eps", default=1e-8, min=0.0, max=1.0,
                 doc="a vector whose norm is at most eps × the largest norm counts as zero")],
          uses_base=True, min_models=2, check=_weight_check,
          paper="https://en.wikipedia.org/wiki/Slerp",
          summary="weighted spherical mean of N models (or task vectors): one tangent-space "
                  "average at the chordal mean, norm Σwᵢ‖xᵢ‖")
def multislerp(inp: MergeInputs):
    weights = [float(w) for w in inp.per_model("weight")]
    if inp.params.get("normalize_weights", True):
        total = sum(weights)
        weights = [w / total for w in weights]
    return _spherical_merge(inp, weights, float(inp.params.get("eps", 1e-8)), iterations=1,
                            norm_scale=1.0)


@register("karcher",
          [Param("weight", default=1.0, per_model=True, min=0.0, max=math.inf,
                 doc="this model's weight in the mean"),
           Param("max_iter", default=10.0, min=1.0, max=10000.0,
                 doc="most Riemannian gradient steps"),
           Param("tol", default=1e-5, min=0.0, max=math.inf,
                 doc="stop once the mean tangent vector is shorter than this (radians)")],
          min_models=2, check=lambda mp, p: check_weight_sum(mp),
          paper="https://en.wikipedia.org/wiki/Fr%C3%A9chet_mean",
          summary="Riemannian (Karcher) mean of the models' directions, scaled by the mean norm")
def karcher(inp: MergeInputs):
    weights = [float(w) for w in inp.per_model("weight")]
    total = sum(weights)
    weights = [w / total for w in weights]
    return _spherical_merge(inp, weights, 1e-8, iterations=int(inp.params.get("max_iter", 10)),
                            tol=float(inp.params.get("tol", 1e-5)), norm_scale=1.0)


def _spherical_merge(inp: MergeInputs, weights, eps, iterations, norm_scale, tol=0.0):
    import torch

    xs, base = inp.tensors, inp.base
    G = gram(xs, base)
    m = spherical_mean(G, weights, eps, iterations, tol)
    if m is None:   # no preferred direction: the weighted linear average (zero if they cancel)
        return combine(xs, weights, base, inp.out_dtype, inp.out)
    norms = torch.sqrt(torch.diagonal(G).clamp_min(0))
    scale = norm_scale * sum(w * float(nv) for w, nv in zip(weights, norms))
    return combine(xs, (m * scale).tolist(), base, inp.out_dtype, inp.out)
