"""Spherical methods: nuslerp, multislerp, karcher (numbers as mergekit 0.1.5 computes them).

    nuslerp     SLERP of two tensors (or their task vectors) at t = w₂/(w₁+w₂) (t = ½ when
                |w₁+w₂| < 1e-6): whole tensors, each row W[r, :] (`nuslerp_row_wise: false`), or
                each column W[:, c] (`nuslerp_row_wise: true`)
    multislerp  normalised weighted mean of the unit directions, scaled by Σwᵢ‖vᵢ‖
    karcher     the Karcher (Fréchet) mean of the unit directions with equal weights, iterated;
                scaled by the mean norm

nuslerp interpolates the raw vectors with sine weights c₀ = sin((1−t)θ)/sin θ, c₁ = sin(tθ)/sin θ,
cos θ = ⟨v₀,v₁⟩ / (max(‖v₀‖,1e-7)·max(‖v₁‖,1e-7)). Only vectors (anti)parallel to fp32 precision
(1 − cos²θ ≤ 6e-8) fall back to the linear interpolation (1−t)·v₀ + t·v₁; a zero vector has
cos θ = 0, so it is interpolated at θ = π/2 (c₁ = sin(tπ/2)), never NaN.

The whole-tensor methods run on the Gram matrix of the inputs (`gram_blocked`, written out with
merge/methods/combine.py): every point of the computation is a linear combination of the inputs,
so the geometry is N×N numbers in float64 and iterating (Karcher) costs no pass over the tensors.
"""
from __future__ import annotations

import math

from merge.methods.chunks import flat, row_length, row_spans
from merge.methods.combine import check_weight_sum, combine, stacked_chunk
from merge.methods.parallel import buffer, map_chunks
from merge.methods.registry import MergeInputs, Param, register

NUSLERP_MIN_NORM = 1e-7      # norms are clamped to this before normalising
NUSLERP_COLINEAR = 6e-8      # 1 − cos² at or below this: (anti)parallel to fp32 precision (the
                             # reference's fp32 cos rounds to ±1 there), interpolate linearly


def sine_weights(t: float, cos, linear):
    """Vectorised (c₀, c₁) so that slerp(t) = c₀·v₀ + c₁·v₁: the sine weights at θ = acos(cos), or
    (1−t, t) where `linear` (float64 tensors; `cos` already clamped to [−1, 1])."""
    import torch

    theta = torch.acos(torch.where(linear, torch.zeros_like(cos), cos))
    sin = torch.where(linear, torch.ones_like(theta), torch.sin(theta))
    c0 = torch.where(linear, torch.full_like(theta, 1.0 - t), torch.sin((1.0 - t) * theta) / sin)
    c1 = torch.where(linear, torch.full_like(theta, t), torch.sin(t * theta) / sin)
    return c0, c1


def nuslerp_coefficients(t: float, dot, na, nb):
    """nuslerp's (c₀, c₁) from ⟨v₀,v₁⟩, ‖v₀‖², ‖v₁‖² (vectorised, float64)."""
    import torch

    dot, na, nb = (torch.as_tensor(v, dtype=torch.float64) for v in (dot, na, nb))
    la = torch.sqrt(na.clamp_min(0)).clamp_min(NUSLERP_MIN_NORM)
    lb = torch.sqrt(nb.clamp_min(0)).clamp_min(NUSLERP_MIN_NORM)
    cos = (dot / (la * lb)).clamp(-1.0, 1.0)
    return sine_weights(t, cos, (1.0 - cos * cos) <= NUSLERP_COLINEAR)


GRAM_BLOCK = 256   # elements per fp32 partial dot product; the partials are summed in float64


def gram_blocked(xs, base=None):
    """Gᵢⱼ = ⟨vᵢ, vⱼ⟩ (float64, N×N, CPU), vᵢ = xᵢ − base (or xᵢ), from fp32 products summed in
    blocks of GRAM_BLOCK and accumulated in float64.

    One fp32 GEMM over a ~1M-element chunk carries relative errors ~1e-5 in G; the spherical
    methods need differences such as ‖uᵢ − m‖² = 2 − 2cos θ, which for the small angles between
    fine-tunes (1e-2 rad and less) that error would swamp. Blocked, G is accurate to ~1e-9 at the
    cost of an fp32 GEMM (measured: 1M × 3 elements, 0.9 ms blocked, 0.8 ms plain, 11 ms in fp64).
    """
    import torch

    def part(s):
        v = stacked_chunk(xs, base, s)
        n, k = v.shape
        blocks = k // GRAM_BLOCK
        g = torch.zeros((n, n), dtype=torch.float64, device=v.device)
        if blocks:
            a = v[:, :blocks * GRAM_BLOCK].view(n, blocks, GRAM_BLOCK).transpose(0, 1)
            g += torch.bmm(a, a.transpose(1, 2)).sum(0, dtype=torch.float64)
        if blocks * GRAM_BLOCK < k:
            rest = v[:, blocks * GRAM_BLOCK:]
            g += (rest @ rest.T).double()
        return g.cpu()

    total = torch.zeros((len(xs), len(xs)), dtype=torch.float64)
    for p in map_chunks(part, row_spans(xs[0].shape), xs[0].device):   # fixed order
        total += p
    return total


# --- nuslerp --------------------------------------------------------------------------------------

@register("nuslerp",
          [Param("weight", per_model=True, min=-math.inf, max=math.inf,
                 doc="relative weight; t = w₂/(w₁+w₂), ½ when the weights sum to zero"),
           Param("nuslerp_flatten", default=True, kind=bool,
                 doc="interpolate whole tensors as single vectors; false: per row or column"),
           Param("nuslerp_row_wise", default=False, kind=bool,
                 doc="with nuslerp_flatten false: interpolate columns W[:, c] (true) or rows "
                     "W[r, :] (false)")],
          uses_base=True, min_models=2, max_models=2,
          paper="https://en.wikipedia.org/wiki/Slerp",
          summary="SLERP of two models (or, with a base, of their task vectors) at "
                  "t = w₂/(w₁+w₂), over whole tensors, rows or columns")
def nuslerp(inp: MergeInputs):
    w1, w2 = (float(w) for w in inp.per_model("weight"))
    total = w1 + w2
    t = 0.5 if abs(total) < 1e-6 else w2 / total
    xs, base = inp.tensors, inp.base
    shape = xs[0].shape
    if inp.params.get("nuslerp_flatten", True) or len(shape) < 2:
        g = gram_blocked(xs, base)
        c0, c1 = nuslerp_coefficients(t, g[0, 1], g[0, 0], g[1, 1])
        return combine(xs, [float(c0), float(c1)], base, inp.out_dtype, inp.out)
    if inp.params.get("nuslerp_row_wise", False):
        return _nuslerp_columns(inp, t)
    return _nuslerp_rows(inp, t)


def _nuslerp_rows(inp: MergeInputs, t: float):
    """Each vector along the last dimension (a matrix's row W[r, :]) is interpolated on its own;
    chunks hold whole rows, so one pass."""
    xs, base = inp.tensors, inp.base
    shape = xs[0].shape
    length = shape[-1]
    out = inp.output(xs[0])
    out_flat = flat(out)

    def part(s):
        v = stacked_chunk(xs, base, s).view(2, -1, length)
        a, b = v[0], v[1]
        c0, c1 = nuslerp_coefficients(t, (a * b).sum(1, dtype=_f64()),
                                      (a * a).sum(1, dtype=_f64()), (b * b).sum(1, dtype=_f64()))
        res = buffer("nuslerp.res", s.stop - s.start, a.device).view(-1, length)
        res.copy_(a).mul_(c0.float().to(a.device)[:, None])
        res.addcmul_(b, c1.float().to(a.device)[:, None])
        if base is not None:
            res.add_(flat(base)[s].view(-1, length))
        out_flat[s].copy_(res.view(-1))

    map_chunks(part, row_spans(shape, length), xs[0].device)
    return out


def _nuslerp_columns(inp: MergeInputs, t: float):
    """Each vector along the first dimension (a matrix's column W[:, c]) is interpolated on its
    own: one pass for the per-column products, one to write."""
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
    c0, c1 = nuslerp_coefficients(t, totals[0], totals[1], totals[2])
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


# --- multislerp -----------------------------------------------------------------------------------

def _multislerp_check(model_params, params):
    if params.get("normalize_weights", True) and len(model_params) > 1:
        return check_weight_sum(model_params)
    return None


@register("multislerp",
          [Param("weight", per_model=True, min=-math.inf, max=math.inf,
                 doc="this model's weight in the mean"),
           Param("normalize_weights", default=True, kind=bool,
                 doc="divide the weights by their sum"),
           Param("eps", default=1e-8, min=0.0, max=math.inf,
                 doc="added to each norm before normalising; a mean direction shorter than "
                     "this has no direction")],
          uses_base=True, min_models=1, check=_multislerp_check,
          paper="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
          summary="normalised weighted mean of N models' (or task vectors') directions, "
                  "norm Σwᵢ‖vᵢ‖")
def multislerp(inp: MergeInputs):
    import torch

    xs, base = inp.tensors, inp.base
    if len(xs) == 1:           # nothing to interpolate: the model itself (with or without base)
        return combine(xs, [1.0], None, inp.out_dtype, inp.out)
    weights = [float(w) for w in inp.per_model("weight")]
    if inp.params.get("normalize_weights", True):
        total = sum(weights)
        weights = [w / total for w in weights]
    eps = float(inp.params.get("eps", 1e-8))
    G = gram_blocked(xs, base)
    norms = torch.sqrt(torch.diagonal(G).clamp_min(0))
    w = torch.tensor(weights, dtype=torch.float64)
    # the mean of the unit vectors uᵢ = vᵢ/(‖vᵢ‖+eps), as coefficients over the vᵢ
    c = w / (norms + eps)
    mean_norm = math.sqrt(max(float(c @ G @ c), 0.0))
    if mean_norm < 1e-3:
        # The directions nearly cancel: cᵀGc is a difference of O(1) terms, which leaves ‖M‖
        # an absolute error of ~1e-5. Measure the mean vector itself (one more pass, only here).
        mean_norm = _norm_of_combination(xs, base, c.tolist())
    if mean_norm < eps:
        # no mean direction (all zero, or directions that cancel): the weighted linear sum
        return combine(xs, weights, base, inp.out_dtype, inp.out)
    # The tangent-space step at this mean is Σwᵢuᵢ − ⟨Σwᵢuᵢ, m⟩m = 0: the result is the mean
    # direction itself, scaled to the weighted mean norm.
    # exp_m(T) with ‖T‖ read as ‖T‖ + eps (mergekit 0.1.5): a factor cos(eps), 1 for the default
    scale = float(w @ norms) * math.cos(eps)
    return combine(xs, (c * (scale / mean_norm)).tolist(), base, inp.out_dtype, inp.out)


def _norm_of_combination(xs, base, coeffs) -> float:
    """‖Σ cᵢvᵢ‖ computed on the vectors (fp32 per chunk, squares summed in float64)."""
    def part(s):
        v = stacked_chunk(xs, base, s)
        acc = buffer("multislerp.acc", v.shape[1], v.device).zero_()
        for c, row in zip(coeffs, v):
            acc.add_(row.mul_(c))    # rounded product, then add (no FMA): exact cancellation is 0
        return float((acc * acc).sum(dtype=_f64()))

    return math.sqrt(sum(map_chunks(part, row_spans(xs[0].shape), xs[0].device)))


# --- karcher --------------------------------------------------------------------------------------

class SphereInSpan:
    """Vectors of the inputs' span written as coefficient vectors c over the inputs vᵢ:
    the vector is Σ cᵢvᵢ and ⟨p, q⟩ = pᵀGq."""

    def __init__(self, G):
        self.G = G

    def dot(self, p, q):
        return float(p @ self.G @ q)

    def norm(self, p):
        return math.sqrt(max(self.dot(p, p), 0.0))


def karcher_mean(G, max_iter: int, tol: float):
    """Coefficients (over the inputs) of the Karcher mean direction with equal weights, scaled by
    the mean norm of all inputs; None when every input is shorter than `tol` (the result is 0).

    Inputs with ‖vᵢ‖ ≤ tol have no direction and are left out of the mean (their norm still
    counts in the scale). Start: the normalised chordal mean (the first direction if that is
    shorter than tol). Each step m ← cos‖T‖·m + sin‖T‖·T/‖T‖ with
    T = Σ αᵢ·θᵢ/sin θᵢ·(uᵢ − cos θᵢ·m), skipping directions within tol of m, until ‖T‖ < tol or max_iter steps.
    """
    import torch

    n = G.shape[0]
    sphere = SphereInSpan(G)
    norms = torch.sqrt(torch.diagonal(G).clamp_min(0))
    valid = [i for i in range(n) if float(norms[i]) > tol]
    if not valid:
        return None
    alpha = 1.0 / len(valid)
    units = []
    for i in valid:
        u = torch.zeros(n, dtype=torch.float64)
        u[i] = 1.0 / float(norms[i])
        units.append(u)
    m = sum(alpha * u for u in units)
    length = sphere.norm(m)
    m = units[0].clone() if length < tol else m / length
    for _ in range(max_iter):
        tangent = torch.zeros(n, dtype=torch.float64)
        for u in units:
            cos = max(-1.0, min(1.0, sphere.dot(m, u)))
            theta = math.acos(cos)
            if theta < tol:
                continue
            v = u - cos * m
            sin = sphere.norm(v)     # = sin θ; measured, so nearly antipodal inputs stay finite
            if sin < 1e-12:          # exactly antipodal: no direction to pull towards
                continue
            tangent += alpha * (theta / sin) * v
        step = sphere.norm(tangent)
        if step < tol:
            break
        m = math.cos(step) * m + (math.sin(step) / step) * tangent
        length = sphere.norm(m)
        if length > tol:
            m = m / length
    return m * (float(norms.sum()) / n)


@register("karcher",
          [Param("max_iter", default=10.0, min=-math.inf, max=math.inf,
                 doc="most Riemannian gradient steps (≤ 0: the normalised chordal mean)"),
           Param("tol", default=1e-5, min=0.0, max=math.inf,
                 doc="convergence threshold (radians); also the norm below which an input has "
                     "no direction")],
          uses_base=True, min_models=1,
          paper="https://en.wikipedia.org/wiki/Fr%C3%A9chet_mean",
          summary="Karcher mean of the models' directions with equal weights (the base, when "
                  "given, is one of them), scaled by the mean norm")
def karcher(inp: MergeInputs):
    # The base is not special here: when a config names one, it is averaged like the others.
    xs = list(inp.tensors) + ([inp.base] if inp.base is not None else [])
    if len(xs) == 1:
        return combine(xs, [1.0], None, inp.out_dtype, inp.out)
    m = karcher_mean(gram_blocked(xs), int(min(float(inp.params.get("max_iter", 10)), 1e6)),
                     float(inp.params.get("tol", 1e-5)))
    coeffs = [0.0] * len(xs) if m is None else m.tolist()
    return combine(xs, coeffs, None, inp.out_dtype, inp.out)
