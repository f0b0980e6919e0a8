"""Methods that interpolate whole weights rather than task vectors: linear, slerp, passthrough."""
from __future__ import annotations

import math

from merge.errors import EvomergeError
from merge.methods.chunks import flat, spans
from merge.methods.parallel import buffer, map_chunks
from merge.methods.registry import MergeInputs, Param, register

DOT_THRESHOLD = 0.9995  # |cos| above this: the vectors are (anti)parallel, slerp degenerates to lerp
NORM_EPS = 1e-8         # a norm at or below this is taken as 1 when normalising


@register("linear", [Param("weight", per_model=True, doc="this model's weight"),
                     Param("normalize", default=True, kind=bool,
                           doc="divide by the sum of the weights")],
          paper="https://arxiv.org/abs/2203.05482", summary="weighted average Σwᵢθᵢ / Σwᵢ")
def linear(inp: MergeInputs):
    weights = [float(w) for w in inp.per_model("weight")]
    total = sum(weights)
    if inp.params.get("normalize", True):
        if abs(total) < 1e-8:
            raise EvomergeError(f"linear: the weights sum to zero for tensor '{inp.name}'; change "
                                f"the weights or set normalize: false")
        weights = [w / total for w in weights]
    xs = [flat(x) for x in inp.tensors]
    out = inp.output(inp.tensors[0])
    out_flat = flat(out)

    def chunk(s):
        n = s.stop - s.start
        acc, tmp = buffer("acc", n, xs[0].device), buffer("tmp", n, xs[0].device)
        acc.copy_(xs[0][s]).mul_(weights[0])
        for w, x in zip(weights[1:], xs[1:]):
            acc.add_(tmp.copy_(x[s]), alpha=w)
        out_flat[s].copy_(acc)

    map_chunks(chunk, spans(xs[0].numel()), xs[0].device)
    return out


def _dot_and_norms(a, b):
    """⟨a,b⟩, ‖a‖², ‖b‖² in float64, chunk by chunk."""
    dot = na = nb = 0.0
    for s in spans(a.numel()):
        x, y = a[s].double(), b[s].double()
        dot += float(x @ y)
        na += float(x @ x)
        nb += float(y @ y)
    return dot, na, nb


def slerp_coefficients(t: float, dot: float, na: float, nb: float) -> tuple[float, float]:
    """Coefficients (c0, c1) so that slerp = c0·v0 + c1·v1 on the raw (unnormalised) tensors,
    from ⟨v0,v1⟩, ‖v0‖², ‖v1‖². A norm at or below NORM_EPS counts as 1 (so a zero vector has
    cos θ = 0 and is interpolated at θ = π/2)."""
    la, lb = math.sqrt(max(na, 0.0)), math.sqrt(max(nb, 0.0))
    la, lb = (la if la > NORM_EPS else 1.0), (lb if lb > NORM_EPS else 1.0)
    cos = max(-1.0, min(1.0, dot / (la * lb)))
    if abs(cos) > DOT_THRESHOLD:
        return 1.0 - t, t
    theta = math.acos(cos)
    sin_theta = math.sin(theta)
    return math.sin((1 - t) * theta) / sin_theta, math.sin(t * theta) / sin_theta


@register("slerp", [Param("t", doc="interpolation position: 0 = base, 1 = the other model")],
          needs_base=True, min_models=1, max_models=1,
          paper="https://en.wikipedia.org/wiki/Slerp",
          summary="spherical interpolation between the base and one other model")
def slerp(inp: MergeInputs):
    t = float(inp.params["t"])
    v0, v1 = flat(inp.base), flat(inp.tensors[0])
    c0, c1 = slerp_coefficients(t, *_dot_and_norms(v0, v1))
    out = inp.output(inp.base)
    out_flat = flat(out)

    def chunk(s):
        n = s.stop - s.start
        acc, tmp = buffer("acc", n, v0.device), buffer("tmp", n, v0.device)
        out_flat[s].copy_(acc.copy_(v0[s]).mul_(c0).add_(tmp.copy_(v1[s]), alpha=c1))

    map_chunks(chunk, spans(v0.numel()), v0.device)
    return out


@register("passthrough", [Param("scale", default=1.0, per_model=True,
                                doc="multiply the copied tensor by this")],
          min_models=1, max_models=1, summary="copy one source unchanged (frankenmerges)")
def passthrough(inp: MergeInputs):
    scale = float(inp.model_params[0].get("scale", 1.0))
    x = inp.tensors[0]
    if scale == 1.0:
        return x if inp.out_dtype in (None, x.dtype) else x.to(inp.out_dtype)
    out = inp.output(x)
    out_flat, x_flat = flat(out), flat(x)

    def chunk(s):
        acc = buffer("acc", s.stop - s.start, x.device)
        out_flat[s].copy_(acc.copy_(x_flat[s]).mul_(scale))

    map_chunks(chunk, spans(x.numel()), x.device)
    return out
