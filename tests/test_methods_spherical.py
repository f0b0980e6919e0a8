"""The spherical, fusion and RAM methods: each semantic that mergekit 0.1.5 fixes, pinned by a
direct torch computation of the formula in docs/methods.md (no reference toolkit needed), plus
degenerate inputs. Kernels are called with `MergeInputs` on small random tensors; a few tests build
a plan on the tiny family to check what a config may say.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from merge.config import MergeConfig
from merge.methods import METHODS, MergeInputs
from merge.plan import build_plan

NAME = "model.layers.0.mlp.up_proj.weight"


def run(method, tensors, base=None, model_params=None, params=None, out_dtype=torch.float32):
    """Call a kernel with the method's declared defaults filled in, as the planner does."""
    m = METHODS[method]
    mp = [dict(p) for p in (model_params or [{} for _ in tensors])]
    params = dict(params or {})
    for spec in m.params.values():
        if not spec.required:
            if spec.per_model:
                for p in mp:
                    p.setdefault(spec.name, spec.default)
            else:
                params.setdefault(spec.name, spec.default)
    return m.kernel(MergeInputs(NAME, list(tensors), base, mp, params, 0, out_dtype))


def family(shape=(24, 20), n=2, scale=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + scale * torch.randn(shape, generator=g) for _ in range(n)]


def close(a, b, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol)


def slerp64(t, a, b, colinear=6e-8, min_norm=1e-7):
    """nuslerp's interpolation of two vectors, in float64 from the formula."""
    a, b = a.double(), b.double()
    cos = float((a @ b) / (a.norm().clamp_min(min_norm) * b.norm().clamp_min(min_norm)))
    cos = max(-1.0, min(1.0, cos))
    if 1 - cos * cos <= colinear:
        return (1 - t) * a + t * b
    th = math.acos(cos)
    return (math.sin((1 - t) * th) * a + math.sin(t * th) * b) / math.sin(th)


def plan(fam, method, models, base=True, parameters=None):
    cfg = {"merge_method": method,
           "models": [{"model": str(fam[m]), "parameters": p} for m, p in models]}
    if base:
        cfg["base_model"] = str(fam["base"])
    if parameters:
        cfg["parameters"] = parameters
    return build_plan(MergeConfig.from_dict(cfg))


# --- nuslerp --------------------------------------------------------------------------------------

def test_nuslerp_row_wise_false_is_rows_and_true_is_columns():
    base, (x, y) = family()
    w = [{"weight": 0.7}, {"weight": 0.3}]
    a, b = x - base, y - base
    rows = run("nuslerp", [x, y], base, w, {"nuslerp_flatten": False, "nuslerp_row_wise": False})
    cols = run("nuslerp", [x, y], base, w, {"nuslerp_flatten": False, "nuslerp_row_wise": True})
    close(rows, base + torch.stack([slerp64(0.3, a[r], b[r]) for r in range(a.shape[0])]))
    close(cols, base + torch.stack([slerp64(0.3, a[:, c], b[:, c]) for c in range(a.shape[1])], 1))


def test_nuslerp_rows_of_a_3d_tensor_run_along_the_last_dimension():
    base, (x, y) = family((3, 4, 10))
    w = [{"weight": 1.0}, {"weight": 2.0}]
    out = run("nuslerp", [x, y], None, w, {"nuslerp_flatten": False})
    ref = torch.stack([torch.stack([slerp64(2 / 3, x[i, j], y[i, j]) for j in range(4)])
                       for i in range(3)])
    close(out, ref)
    # columns: vectors along dim 0, one per index of the remaining dimensions
    out = run("nuslerp", [x, y], None, w, {"nuslerp_flatten": False, "nuslerp_row_wise": True})
    xf, yf = x.reshape(3, -1), y.reshape(3, -1)
    ref = torch.stack([slerp64(2 / 3, xf[:, c], yf[:, c]) for c in range(40)], 1).view(3, 4, 10)
    close(out, ref)


def test_nuslerp_slerps_nearly_parallel_vectors_and_lerps_only_at_fp32_precision():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(4000, generator=g, dtype=torch.float64)
    b = torch.randn(4000, generator=g, dtype=torch.float64)
    b = b - (b @ a) / (a @ a) * a
    th = 0.03                                    # cos θ = 0.99955: above slerp's 0.9995 cut-off
    v1 = (math.cos(th) * a / a.norm() + math.sin(th) * b / b.norm()) * 5.0
    v0 = a / a.norm()
    out = run("nuslerp", [v0.float(), v1.float()], None, [{"weight": 1.0}, {"weight": 1.0}])
    sl = (math.sin(th / 2) * v0 + math.sin(th / 2) * v1) / math.sin(th)
    lerp = 0.5 * v0 + 0.5 * v1
    assert (sl - lerp).abs().max() > 1e-5      # the two are distinguishable at this tolerance
    close(out, sl, rtol=1e-6, atol=1e-7)


def test_nuslerp_zero_vector_is_interpolated_at_a_right_angle():
    base, (x, _) = family()
    out = run("nuslerp", [base, x], base, [{"weight": 1.0}, {"weight": 1.0}])
    close(out, base + math.sin(math.pi / 4) * (x - base))
    both_zero = run("nuslerp", [base, base], base, [{"weight": 1.0}, {"weight": 3.0}],
                    {"nuslerp_flatten": False})
    assert torch.equal(both_zero, base)


def test_nuslerp_weights_summing_to_zero_interpolate_halfway(family_path):
    base, (x, y) = family()
    out = run("nuslerp", [x, y], base, [{"weight": 2.0}, {"weight": -2.0}])
    close(out, base + slerp64(0.5, (x - base).reshape(-1), (y - base).reshape(-1)).view(x.shape))
    p = plan(family_path, "nuslerp", [("c0", {"weight": 1.0}), ("c1", {"weight": -1.0})])
    assert p.tensors


def test_nuslerp_antipodal_is_linear():
    base, (x, _) = family()
    out = run("nuslerp", [x, 2 * base - x], base, [{"weight": 1.0}, {"weight": 3.0}])
    close(out, base + (0.25 - 0.75) * (x - base))


# --- multislerp -----------------------------------------------------------------------------------

@pytest.mark.parametrize("with_base", [True, False])
def test_multislerp_is_the_normalised_weighted_mean_of_directions(with_base):
    base, xs = family(n=3, scale=1.0)
    w = torch.tensor([1.0, 0.3, 0.5], dtype=torch.float64)
    out = run("multislerp", xs, base if with_base else None,
              [{"weight": float(v)} for v in w])
    vs = [(x - base if with_base else x).reshape(-1).double() for x in xs]
    wn = w / w.sum()
    mean = sum(wi * v / (v.norm() + 1e-8) for wi, v in zip(wn, vs))
    ref = mean / mean.norm() * sum(wi * v.norm() for wi, v in zip(wn, vs))
    close(out, ref.view(base.shape) + (base if with_base else 0))


def test_multislerp_eps_and_unnormalised_weights():
    base, xs = family(n=2, scale=1.0)
    eps = 0.1
    out = run("multislerp", xs, base, [{"weight": 0.6}, {"weight": 0.3}],
              {"normalize_weights": False, "eps": eps})
    vs = [(x - base).reshape(-1).double() for x in xs]
    mean = 0.6 * vs[0] / (vs[0].norm() + eps) + 0.3 * vs[1] / (vs[1].norm() + eps)
    # the exponential map reads the (zero) tangent's length as eps: a factor cos(eps)
    ref = mean / mean.norm() * (0.6 * vs[0].norm() + 0.3 * vs[1].norm()) * math.cos(eps)
    close(out, ref.view(base.shape) + base)


def test_multislerp_degenerate_inputs(family_path):
    base, (x, y) = family(scale=1.0)
    close(run("multislerp", [x], base, [{"weight": 0.2}]), x)      # one model: that model
    assert plan(family_path, "multislerp", [("c0", {"weight": 1.0})]).tensors
    # directions that cancel exactly: the weighted linear sum (here: zero)
    zero = torch.zeros_like(x)
    assert torch.equal(run("multislerp", [x, -x], zero, [{"weight": 1.0}] * 2), zero)
    assert torch.equal(run("multislerp", [x, -x, x, -x], None, [{"weight": 1.0}] * 4), zero)
    for n in (2, 3):                                 # identical models: the model back
        out = run("multislerp", [base] * n, base, [{"weight": 1.0}] * n)
        assert torch.isfinite(out).all() and torch.equal(out, base)
    # a zero task vector has no direction but its weight counts in the norm
    close(run("multislerp", [x, base], base, [{"weight": 1.0}] * 2), base + 0.5 * (x - base))


# --- karcher --------------------------------------------------------------------------------------

def karcher64(vs, max_iter=10, tol=1e-5):
    """The Karcher mean with equal weights on full float64 vectors."""
    vs = [v.reshape(-1).double() for v in vs]
    norms = [float(v.norm()) for v in vs]
    units = [v / nv for v, nv in zip(vs, norms) if nv > tol]
    a = 1.0 / len(units)
    m = sum(a * u for u in units)
    m = units[0] if m.norm() < tol else m / m.norm()
    for _ in range(max_iter):
        T = torch.zeros_like(m)
        for u in units:
            c = float((m @ u).clamp(-1, 1))
            th = math.acos(c)
            if th >= tol:
                T += a * th / math.sin(th) * (u - c * m)
        s = float(T.norm())
        if s < tol:
            break
        m = math.cos(s) * m + math.sin(s) * T / s
        m = m / m.norm()
    return m * (sum(norms) / len(norms))


def test_karcher_ignores_weights_and_iterates_to_the_equal_weight_mean():
    _, xs = family(n=3, scale=1.0)
    out = run("karcher", xs, params={"max_iter": 10, "tol": 1e-5})
    weighted = run("karcher", xs, model_params=[{"weight": 5.0}, {"weight": 1.0}, {"weight": 0.1}],
                   params={"max_iter": 10, "tol": 1e-5})
    assert torch.equal(out, weighted)
    close(out, karcher64(xs).view(xs[0].shape))


def test_karcher_of_two_is_the_slerp_midpoint_of_the_directions():
    _, (x, y) = family(scale=2.0)
    out = run("karcher", [x, y], params={"max_iter": 100, "tol": 1e-9})
    a, b = x.reshape(-1).double(), y.reshape(-1).double()
    mid = slerp64(0.5, a / a.norm(), b / b.norm())
    close(out, (mid * (a.norm() + b.norm()) / 2).view(x.shape), rtol=1e-5, atol=1e-6)


def test_karcher_averages_the_base_like_any_other_input(family_path):
    base, (x, y) = family(scale=1.0)
    close(run("karcher", [x, y], base), run("karcher", [x, y, base]))
    close(run("karcher", [x], base), karcher64([x, base]).view(x.shape))
    # a config naming a base: the base is an input of every tensor
    p = plan(family_path, "karcher", [("c0", None)])
    assert all(t.base is not None for t in p.tensors if not t.copy_only)


def test_karcher_tol_is_also_the_norm_below_which_an_input_has_no_direction():
    _, (x, y) = family(scale=1.0)
    tiny = 1e-6 * y / y.norm()                  # norm 1e-6 < tol = 1e-5: no direction
    out = run("karcher", [x, y, tiny], params={"tol": 1e-5})
    m = karcher64([x, y]) / ((x.norm() + y.norm()) / 2).double()
    close(out, (m * float(x.norm() + y.norm() + 1e-6) / 3).view(x.shape))


def test_karcher_degenerate_inputs():
    _, (x, _) = family(scale=1.0)
    # antipodal: the chordal mean vanishes, the mean starts at (and stays on) the first direction
    close(run("karcher", [x, -x]), x)
    assert torch.equal(run("karcher", [torch.zeros_like(x)] * 3), torch.zeros_like(x))
    close(run("karcher", [x, x, x]), x)
    # max_iter 0: the normalised chordal mean, scaled by the mean norm
    _, xs = family(n=3, scale=1.0)
    vs = [v.reshape(-1).double() for v in xs]
    m = sum(v / v.norm() for v in vs)
    close(run("karcher", xs, params={"max_iter": 0}),
          (m / m.norm() * sum(v.norm() for v in vs) / 3).view(xs[0].shape))


# --- slerp, nearswap ------------------------------------------------------------------------------

def test_slerp_treats_a_norm_below_1e_8_as_one():
    base, (x, _) = family()
    tiny = 1e-10 * x                     # parallel to x, but its norm counts as 1: cos ≈ 0
    out = run("slerp", [tiny], base, params={"t": 0.3})
    b, v = base.reshape(-1).double(), tiny.reshape(-1).double()
    cos = float(b @ v / b.norm())
    th = math.acos(cos)
    close(out, ((math.sin(0.7 * th) * b + math.sin(0.3 * th) * v) / math.sin(th)).view(x.shape))


def test_nearswap_floors_the_distance_at_1e_6_and_accepts_any_t(family_path):
    base = torch.linspace(-1e-3, 1e-3, 64)
    d = torch.full_like(base, 1e-7)
    d[::2] = 0.5
    other = base + d
    t = 1e-7
    out = run("nearswap", [other], base, params={"t": t})
    w = (t / (other - base).abs().clamp_min(1e-6)).clamp(0, 1)
    close(out, w * other + (1 - w) * base, rtol=0, atol=1e-9)
    assert abs(float(w[1]) - 0.1) < 1e-3        # |Δ| = 1e-7 is read as 1e-6: w = 0.1, not 1
    assert torch.equal(run("nearswap", [other], base, params={"t": -0.5}), base)
    assert plan(family_path, "nearswap", [("c0", None)], parameters={"t": -1.0}).tensors


# --- arcee_fusion ---------------------------------------------------------------------------------

def fusion64(x, base):
    """The fusion rule written out on the whole tensor (fp32, as the formula states)."""
    p = F.softmax(x, dim=-1) + 1e-8
    q = F.softmax(base, dim=-1) + 1e-8
    imp = (x - base).abs() * (p * torch.log(p / q)).sum(-1, keepdim=True)
    s = imp.reshape(-1).sort().values
    n = s.numel()
    q1, med, q3 = (s[math.floor(f * (n - 1))] for f in (0.25, 0.5, 0.75))
    thr = med + 1.5 * (q3 - q1)
    return base + (x - base) * (imp >= thr)


@pytest.mark.parametrize("shape", [(48, 40), (600, 500), (301,)])
def test_arcee_fusion_keeps_what_reaches_the_fence_of_lower_quartiles(shape):
    base, (x,) = family(shape, n=1, scale=0.3)
    out = run("arcee_fusion", [x], base)
    assert torch.equal(out, fusion64(x, base))
    kept = float((out != base).float().mean())
    assert 0 < kept < 0.3


def test_arcee_fusion_keeps_entries_tied_at_the_threshold():
    base = torch.zeros(40, 16)
    x = base.clone()
    x[:, 0] = 1.0                       # every row: one changed entry, identical KL
    out = run("arcee_fusion", [x], base)
    # Q1 = median = Q3 = 0: the threshold is 0, so everything (changed or not) passes it
    assert torch.equal(out, x)
    assert torch.equal(run("arcee_fusion", [base.clone()], base), base)   # identical models


# --- ram, ramplus_tl ------------------------------------------------------------------------------

def sparse_family(n=3, shape=(40, 30), density=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    xs = [base + 0.01 * torch.randn(shape, generator=g)
          * (torch.rand(shape, generator=g) < density) for _ in range(n)]
    return base, xs


def ram64(xs, base, eps=1e-5, lambdas=None):
    tv = torch.stack([x - base for x in xs]).double()
    m = (tv.abs() > eps).double()
    c = m.sum(0)
    mean = (tv * m).sum(0) / c.clamp_min(1)
    if lambdas is None:
        return base.double() + mean
    boosted = (tv * m * torch.tensor(lambdas, dtype=torch.float64).view(-1, 1, 1)).sum(0)
    return base.double() + torch.where(c == 1, boosted, mean)


def test_ram_averages_shared_changes_and_keeps_unique_ones():
    base, xs = sparse_family()
    close(run("ram", xs, base), ram64(xs, base))
    # by hand: one entry changed by one model, one by two, one by none, one below epsilon
    b = torch.zeros(4)
    a1 = torch.tensor([0.2, 0.4, 0.0, 1e-6])
    a2 = torch.tensor([0.0, 0.2, 0.0, 0.0])
    close(run("ram", [a1, a2], b), torch.tensor([0.2, 0.3, 0.0, 0.0]))
    close(run("ram", [a1, a2], b, params={"epsilon": 0.3}), torch.tensor([0.0, 0.4, 0.0, 0.0]))


def test_ramplus_tl_boosts_unique_changes_by_the_overlap_ratio():
    b = torch.zeros(6)
    a1 = torch.tensor([0.2, 0.4, 0.5, 0.0, 0.0, 0.0])     # unique: 0, 2; shared: 1
    a2 = torch.tensor([0.0, 0.2, 0.0, 0.3, 0.0, 0.0])     # unique: 3;    shared: 1
    r, alpha = 0.5, 0.8
    lam1 = 1 + r * min(1 / 2, alpha)                       # ρ₁ = 1/2
    lam2 = 1 + r * min(1 / 1, alpha)                       # ρ₂ = 1, capped at alpha
    out = run("ramplus_tl", [a1, a2], b, params={"r": r, "alpha": alpha})
    close(out, torch.tensor([0.2 * lam1, 0.3, 0.5 * lam1, 0.3 * lam2, 0.0, 0.0]))
    base, xs = sparse_family(seed=1)
    out = run("ramplus_tl", xs, base, params={"r": 0.4, "alpha": 2.0})
    tv = torch.stack([x - base for x in xs])
    m = tv.abs() > 1e-5
    c = m.sum(0)
    lams = [1 + 0.4 * min(max(float((mi & (c > 1)).sum()) / max(float((mi & (c == 1)).sum()),
                                                                  1e-5), 0), 2.0) for mi in m]
    close(out, ram64(xs, base, lambdas=lams))


@pytest.mark.parametrize("method", ["ram", "ramplus_tl"])
def test_ram_degenerate_inputs(method):
    base, xs = sparse_family(n=2)
    assert torch.equal(run(method, [base.clone(), base.clone()], base), base)   # identical
    zeros = torch.zeros(30, 20)
    out = run(method, [zeros, zeros, zeros], zeros)
    assert torch.isfinite(out).all() and torch.equal(out, zeros)
    # one model identical to the base: the other's changes are all unique and kept (RAM+: λ)
    out = run(method, [base.clone(), xs[1]], base)
    tv = xs[1] - base                           # RAM+: no shared entries, ρ = 0, λ = 1
    close(out, base + tv * (tv.abs() > 1e-5))
    before = [x.clone() for x in xs]
    run(method, xs, base)
    assert all(torch.equal(a, b) for a, b in zip(before, xs))
    half = run(method, [x.bfloat16() for x in xs], base.bfloat16(), out_dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.isfinite(half.float()).all()


# --- shared fixture -------------------------------------------------------------------------------

@pytest.fixture()
def family_path(family):
    return family
