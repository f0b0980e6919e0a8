"""Every merge method against a direct torch computation of its formula (docs/methods.md).

Kernels are called with `MergeInputs` on small random tensors; the references below are written
from the formulas, on whole tensors, without the kernels' chunking, streaming or Gram tricks.
Tensors larger than `order_stats.SMALL` exercise the streamed thresholds and quantiles.
"""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import yaml

from merge.config import MergeConfig
from merge.errors import ConfigError
from merge.methods import METHODS
from merge.methods import order_stats
from merge.methods.sparsify import (LEVELS, bernoulli, chunks_of, descending_order,
                                    keep_levels, magprune, rank_values)
from merge.plan import build_plan

from kernel_inputs import inputs  # tests/ is on sys.path (conftest)

BIG = (600, 500)          # 300k entries > order_stats.SMALL: the streaming path


# --- helpers --------------------------------------------------------------------------------------

def run(method, tensors, base=None, model_params=None, params=None, **kw):
    return METHODS[method].kernel(inputs(method, tensors, base, model_params, params, **kw))


def rand_family(shape=(48, 40), n=3, scale=0.05, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    xs = [base + scale * torch.randn(shape, generator=g) for _ in range(n)]
    return base.to(dtype), [x.to(dtype) for x in xs]


def close(a, b, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=atol)


def consensus(deltas, weights, normalize):
    """TIES sign election over weighted deltas (N, ...): a zero sum elects +; a divisor of exactly
    0 becomes 1 (mergekit 0.1.5)."""
    s = torch.where(deltas.sum(0) >= 0, 1.0, -1.0)
    keep = (deltas * s) > 0
    merged = (deltas * keep).sum(0)
    if normalize:
        div = (torch.tensor(weights, dtype=deltas.dtype).view(-1, *[1] * (deltas.dim() - 1))
               * keep).sum(0)
        merged = merged / torch.where(div == 0, torch.ones_like(div), div)
    return merged


def descending_positions(tau):
    """Flat positions by descending |τ|, equal magnitudes by position (the kernels' tie-break)."""
    return tau.abs().reshape(-1).sort(descending=True, stable=True).indices


def topk_mask(tau, density):
    """The max(1, ⌊density·n⌋) largest |τ| (exactly that many; ties by position)."""
    n = tau.numel()
    mask = torch.zeros(n, dtype=torch.bool)
    if density >= 1:
        mask[:] = True
    elif density > 0:
        mask[descending_positions(tau)[:max(1, int(density * n))]] = True
    return mask.view(tau.shape)


def sparsified(sparsifier, inp, i):
    """τᵢ after a kernel's own sparsifier (weight 1): the real random mask, chunk by chunk."""
    tau = (inp.tensors[i].float() - inp.base.float()).reshape(-1).clone()
    fn = sparsifier(inp, i)
    if fn is not None:
        tmp = torch.empty_like(tau)
        for ch in chunks_of(inp.base.shape):
            fn(tau[ch.span], ch, 1.0, tmp[:ch.size])
    return tau.view(inp.base.shape)


def ref_slerp(t, a, b):
    """SLERP of raw vectors with the sine weights; linear where the angle is degenerate."""
    a64, b64 = a.double(), b.double()
    na, nb = a64.norm(), b64.norm()
    if na == 0 or nb == 0:
        return (1 - t) * a64 + t * b64
    cos = float((a64 @ b64) / (na * nb))
    if abs(cos) > 0.9995:
        return (1 - t) * a64 + t * b64
    th = math.acos(max(-1.0, min(1.0, cos)))
    return math.sin((1 - t) * th) / math.sin(th) * a64 + math.sin(t * th) / math.sin(th) * b64


# --- linear, slerp, passthrough, task_arithmetic --------------------------------------------------

def test_linear_is_the_normalised_weighted_sum():
    base, xs = rand_family()
    w = [0.5, 0.3, 0.7]
    out = run("linear", xs, model_params=[{"weight": v} for v in w])
    close(out, sum(wi * x for wi, x in zip(w, xs)) / sum(w))
    out = run("linear", xs, model_params=[{"weight": v} for v in w], params={"normalize": False})
    close(out, sum(wi * x for wi, x in zip(w, xs)))


def test_slerp_matches_sine_formula_and_lerps_parallel_vectors():
    base, xs = rand_family(scale=1.0)
    out = run("slerp", xs[:1], base, params={"t": 0.3})
    close(out, ref_slerp(0.3, base.reshape(-1), xs[0].reshape(-1)).view(base.shape))
    out = run("slerp", [2 * base], base, params={"t": 0.25})   # parallel: linear interpolation
    close(out, 1.25 * base)


def test_passthrough_scales():
    base, xs = rand_family()
    close(run("passthrough", xs[:1], model_params=[{"scale": 0.5}]), 0.5 * xs[0])


@pytest.mark.parametrize("normalize", [False, True])
def test_task_arithmetic(normalize):
    base, xs = rand_family()
    w = [1.0, 0.5, -0.25]
    out = run("task_arithmetic", xs, base, [{"weight": v} for v in w],
              {"normalize": normalize, "lambda": 0.8})
    delta = sum(wi * (x - base) for wi, x in zip(w, xs))
    if normalize:
        delta = delta / sum(w)
    close(out, base + 0.8 * delta)


# --- ties ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(48, 40), BIG, (1001,)])
@pytest.mark.parametrize("normalize", [True, False])
def test_ties_trims_elects_and_normalises(shape, normalize):
    base, xs = rand_family(shape)
    w, dens = [0.6, 0.9, 0.4], [0.5, 0.2, 0.8]
    out = run("ties", xs, base, [{"weight": a, "density": d} for a, d in zip(w, dens)],
              {"normalize": normalize, "lambda": 1.1})
    deltas = torch.stack([wi * (x - base) * topk_mask(x - base, d)
                          for wi, x, d in zip(w, xs, dens)])
    close(out, base + 1.1 * consensus(deltas, w, normalize))


def test_ties_keeps_exactly_density_and_rescale_preserves_l1():
    base, xs = rand_family(BIG, n=1)
    tau = xs[0] - base
    out = run("ties", xs, base, [{"weight": 1.0, "density": 0.3}], {"normalize": False})
    assert int(((out - base) != 0).sum()) == round(0.3 * tau.numel())
    out = run("ties", xs, base, [{"weight": 1.0, "density": 0.3}],
              {"normalize": False, "rescale": True})
    kept = (out - base).double()
    assert kept.abs().sum() == pytest.approx(float(tau.double().abs().sum()), rel=1e-4)


def test_kept_magnitude_order_gives_the_streamed_thresholds_exactly():
    """MagnitudeOrder (in-memory merges) answers every k-th largest |τ| like the streamed search,
    with many equal magnitudes, zeros, and the extreme ranks."""
    from merge.methods.magnitude_order import MagnitudeOrder
    from merge.methods.sparsify import magnitude_thresholds

    base, xs = rand_family(BIG, n=2)
    xs[1] = base + (xs[1] - base).round(decimals=2)      # many ties, and exact zeros
    for x in xs:
        inp = inputs("ties", [x], base)
        n = base.numel()
        ks = [1, 2, n // 3, n // 2, n - 1, n]
        order = MagnitudeOrder(x, base)
        assert [order.kth_largest(k) for k in ks] == magnitude_thresholds(inp, 0, ks)
    with pytest.raises(ValueError):
        order.kth_largest(0)


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties", "breadcrumbs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merges_with_kept_magnitude_orders_are_bit_identical(method, dtype):
    from merge.methods.magnitude_order import MagnitudeOrder

    base, xs = rand_family(BIG, dtype=dtype)
    mp = [{"weight": w, "density": d} for w, d in zip([0.6, 0.9, 0.4], [0.5, 0.0, 0.8])]
    plain = inputs(method, xs, base, mp, {"lambda": 0.9}, out_dtype=dtype)
    built = []
    cached = inputs(method, xs, base, mp, {"lambda": 0.9}, out_dtype=dtype)
    cached.orders = lambda i: built.append(i) or MagnitudeOrder(xs[i], base)
    assert torch.equal(METHODS[method].kernel(cached), METHODS[method].kernel(plain))
    assert built      # the kept orders were used


# --- breadcrumbs ------------------------------------------------------------------------------------

def band_mask(tau, density, gamma):
    """Descending magnitude ranks [top, top + keep), keep = ⌊density·n⌋, top = min(⌊gamma·n⌋,
    n − keep) (ties by position)."""
    n = tau.numel()
    mask = torch.zeros(n, dtype=torch.bool)
    if density >= 1:
        return ~mask.view(tau.shape)
    keep = int(density * n)
    top = min(int(gamma * n), n - keep)
    mask[descending_positions(tau)[top:top + keep]] = True
    return mask.view(tau.shape)


@pytest.mark.parametrize("shape", [(48, 40), BIG])
def test_breadcrumbs_drops_outliers_and_small_entries(shape):
    base, xs = rand_family(shape)
    mp = [{"weight": 0.5, "density": 0.6, "gamma": 0.05},
          {"weight": 0.3, "density": 0.9, "gamma": 0.2},     # density + gamma > 1: density wins
          {"weight": 0.2, "density": 0.5, "gamma": 0.0}]
    out = run("breadcrumbs", xs, base, mp)
    delta = sum(p["weight"] * (x - base) * band_mask(x - base, p["density"], p["gamma"])
                for p, x in zip(mp, xs))
    close(out, base + delta)
    out = run("breadcrumbs_ties", xs, base, mp, {"normalize": True})
    deltas = torch.stack([p["weight"] * (x - base) * band_mask(x - base, p["density"], p["gamma"])
                          for p, x in zip(mp, xs)])
    close(out, base + consensus(deltas, [p["weight"] for p in mp], True))


def test_breadcrumbs_density_wins_over_gamma():
    base, xs = rand_family(n=1)
    out = run("breadcrumbs", xs, base, [{"weight": 1.0, "density": 0.9, "gamma": 0.3}])
    kept = (out - base) != 0
    assert int(kept.sum()) == round(0.9 * base.numel())
    # only 10% can go, and it is the largest 10% (the outliers gamma asked for, as many as fit)
    tau = (xs[0] - base).abs()
    assert tau[kept].max() < tau[~kept].min()


# --- DARE ----------------------------------------------------------------------------------------

def test_dare_kept_fraction_rescale_and_l1_in_expectation():
    base, xs = rand_family((512, 512), n=1, scale=1.0)
    tau = xs[0] - base
    p = 0.3
    out = run("dare_linear", xs, base, [{"weight": 1.0, "density": p}], seed=7)
    delta = out - base
    kept = delta != 0
    n = tau.numel()
    frac = float(kept.float().mean())
    assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / n)
    # rescaled as the reference does: by ‖τ‖₁ / ‖τ kept‖₁, so the L1 norm is preserved exactly
    ratio = tau.double().abs().sum() / tau.double()[kept].abs().sum()
    close(delta[kept], (tau.double()[kept] * ratio).float())
    assert float(delta.double().abs().sum() / tau.double().abs().sum()) == pytest.approx(1, abs=1e-5)
    out = run("dare_linear", xs, base, [{"weight": 1.0, "density": p}], {"rescale": False}, seed=7)
    close((out - base)[kept], tau[kept])                     # same mask, no rescale
    assert torch.equal((out - base) != 0, kept)


def test_dare_masks_are_reproducible_and_independent():
    base, xs = rand_family((256, 300), n=2, scale=1.0)
    mp = [{"weight": 1.0, "density": 0.5}] * 2
    a = run("dare_ties", xs, base, mp, seed=1, name="a.weight")
    assert torch.equal(a, run("dare_ties", xs, base, mp, seed=1, name="a.weight"))
    assert not torch.equal(a, run("dare_ties", xs, base, mp, seed=2, name="a.weight"))
    assert not torch.equal(a, run("dare_ties", xs, base, mp, seed=1, name="b.weight"))
    # two identical models get independent masks (salted by the model index)
    one = inputs("dare_linear", [xs[0], xs[0]], base, mp, seed=1)
    m0, m1 = (sparsified(bernoulli, one, i) != 0 for i in (0, 1))
    agree = float((m0 == m1).float().mean())
    assert 0.45 < agree < 0.55                               # p² + (1−p)² = 0.5


def test_dare_does_not_depend_on_thread_count_or_order():
    base, xs = rand_family((700, 600), n=2, scale=1.0)             # several chunks
    mp = [{"weight": 0.7, "density": 0.4}, {"weight": 0.3, "density": 0.6}]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = run("dare_ties", xs, base, mp, seed=3)
        torch.set_num_threads(2)
        other_first = run("dare_ties", xs, base, mp, seed=3, name="other.weight")
        parallel = run("dare_ties", xs, base, mp, seed=3)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(serial, parallel)
    assert not torch.equal(other_first, parallel)


@pytest.mark.parametrize("method,consensus_", [("dare_linear", False), ("dare_ties", True)])
def test_dare_merges_its_masked_task_vectors(method, consensus_):
    base, xs = rand_family((300, 200), scale=1.0)
    w = [0.5, 0.3, 0.2]
    mp = [{"weight": a, "density": d} for a, d in zip(w, [0.3, 0.5, 0.7])]
    inp = inputs(method, xs, base, mp, {"lambda": 0.9, "normalize": consensus_}, seed=5)
    out = METHODS[method].kernel(inp)
    deltas = torch.stack([wi * sparsified(bernoulli, inp, i) for i, wi in enumerate(w)])
    merged = consensus(deltas, w, True) if consensus_ else deltas.sum(0) / sum(w)
    close(out, base + 0.9 * merged)


# --- DELLA ---------------------------------------------------------------------------------------

def distinct_rows(rows, length, seed=0):
    """Rows whose magnitudes differ by 0.2% steps (random order and signs), within a factor 8:
    the 16-bit rank keys (2^-12 relative) resolve them, so the exact ranks are the kernel's."""
    g = torch.Generator().manual_seed(seed)
    mags = 1.002 ** torch.arange(length, dtype=torch.float64) * 1e-3
    out = torch.stack([mags[torch.randperm(length, generator=g)] for _ in range(rows)])
    signs = torch.randint(0, 2, (rows, length), generator=g) * 2 - 1
    return (out * signs).float()


def test_della_probabilities_follow_exact_magnitude_ranks():
    a = distinct_rows(64, 300).abs()
    levels = keep_levels(0.5, 0.2, 300)
    out = torch.empty_like(a)
    rank_values(a, levels, out)
    desc = a.argsort(dim=1, descending=True).argsort(dim=1)   # exact descending ranks
    assert torch.equal(out, levels[desc])
    assert levels[0] == round(0.7 * LEVELS) and levels[-1] == round(0.3 * LEVELS)
    # ties (equal magnitudes) still give a permutation per row
    order = descending_order(torch.zeros(4, 50))
    assert torch.equal(order.sort(dim=1).values, torch.arange(50).expand(4, 50))


def test_della_statistics_kept_fraction_by_rank_and_rescale():
    rows, length, p, eps = 256, 1024, 0.5, 0.2
    tau = distinct_rows(rows, length, seed=1)
    base = torch.zeros_like(tau)
    out = run("della_linear", [tau], base, [{"weight": 1.0, "density": p, "epsilon": eps}],
              seed=11)
    kept = out != 0
    assert abs(float(kept.float().mean()) - p) < 0.005
    asc = tau.abs().argsort(dim=1).argsort(dim=1).float() / (length - 1)   # ascending rank in [0,1]
    top, bottom = asc >= 0.9, asc < 0.1
    assert float(kept[top].float().mean()) == pytest.approx(p - eps + 2 * eps * 0.95, abs=0.015)
    assert float(kept[bottom].float().mean()) == pytest.approx(p - eps + 2 * eps * 0.05, abs=0.015)
    # rescaled as the reference does: one factor ‖τ‖₁ / ‖τ kept‖₁ for the whole tensor
    ratio = tau.double().abs().sum() / tau.double()[kept].abs().sum()
    close(out[kept], (tau.double()[kept] * ratio).float())
    assert float(out.double().abs().sum() / tau.double().abs().sum()) == pytest.approx(1, abs=1e-5)


@pytest.mark.parametrize("method,consensus_", [("della", True), ("della_linear", False)])
def test_della_merges_its_masked_task_vectors(method, consensus_):
    base, xs = rand_family((120, 256), scale=1.0)
    w = [0.6, 0.4, 0.3]
    mp = [{"weight": a, "density": 0.5, "epsilon": e} for a, e in zip(w, [0.1, 0.3, 0.0])]
    inp = inputs(method, xs, base, mp, {"lambda": 1.2}, seed=9)
    out = METHODS[method].kernel(inp)
    deltas = torch.stack([wi * sparsified(magprune, inp, i) for i, wi in enumerate(w)])
    merged = consensus(deltas, w, True) if consensus_ else deltas.sum(0)
    close(out, base + 1.2 * merged)


# --- SCE -------------------------------------------------------------------------------------------

def ref_sce(xs, base, topk):
    """SCE as mergekit 0.1.5 computes it: ⌊nnz·topk⌋ positions of largest variance (ties by
    position), weights ∝ mean(τᵢ²) (uniform when their sum is below 1e-6), a zero sum elects +,
    the divisor is clamped to 1e-6."""
    tau = torch.stack([x - base for x in xs]).double()
    var = tau.float().var(0, unbiased=False)
    if topk < 1:
        k = int(torch.tensor(int(torch.count_nonzero(var))) * topk)
        mask = torch.zeros(var.numel(), dtype=torch.bool)
        mask[var.reshape(-1).sort(descending=True, stable=True).indices[:k]] = True
        tau = tau * mask.view(var.shape)
    means = (tau ** 2).reshape(len(xs), -1).mean(1)
    w = means / means.sum() if means.sum() >= 1e-6 else torch.full_like(means, 1 / len(xs))
    s = torch.where(tau.sum(0) >= 0, 1.0, -1.0).double()
    wk = w.view(-1, *[1] * (tau.dim() - 1)) * ((tau * s) > 0)
    return base.double() + (tau * wk).sum(0) / wk.sum(0).clamp_min(1e-6)


@pytest.mark.parametrize("shape,topk", [((48, 40), 0.3), ((48, 40), 1.0), (BIG, 0.5)])
def test_sce(shape, topk):
    base, xs = rand_family(shape, scale=0.1)
    xs[1] = base + 3 * (xs[1] - base)                         # unequal energies → unequal weights
    close(run("sce", xs, base, params={"select_topk": topk}), ref_sce(xs, base, topk))


def test_sce_select_nothing_gives_base():
    base, xs = rand_family()
    assert torch.equal(run("sce", xs, base, params={"select_topk": 0.0}), base)


# --- model_stock ----------------------------------------------------------------------------------

def ref_ratio(taus):
    """t = N·c/(1 + (N−1)·c), c the mean pairwise cosine (norm product floored at 1e-6), not
    clamped; 0 at the singularity."""
    n = len(taus)
    cos = [float((taus[i].double() @ taus[j].double())
                 / max(float(taus[i].double().norm() * taus[j].double().norm()), 1e-6))
           for i in range(n) for j in range(i + 1, n)]
    c = sum(max(-1.0, min(1.0, x)) for x in cos) / len(cos)
    d = 1 + (n - 1) * c
    return 0.0 if abs(d) < 1e-6 else n * c / d


def correlated(shape=(48, 40), n=3, seed=0):
    """Task vectors sharing a common direction (positive cosines)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    common = torch.randn(shape, generator=g)
    return base, [base + 0.1 * (common + torch.randn(shape, generator=g)) for _ in range(n)]


def test_model_stock_whole_tensor():
    base, xs = correlated()
    t = ref_ratio([(x - base).reshape(-1) for x in xs])
    assert 0.3 < t < 1
    close(run("model_stock", xs, base), t * sum(xs) / len(xs) + (1 - t) * base)


def test_model_stock_filter_wise():
    base, xs = correlated((30, 64))
    out = run("model_stock", xs, base, params={"filter_wise": True})
    for r in range(base.shape[0]):
        t = ref_ratio([(x - base)[r] for x in xs])
        close(out[r], t * sum(x[r] for x in xs) / len(xs) + (1 - t) * base[r])


def test_model_stock_degenerate_angles():
    base, xs = rand_family()
    x = xs[0]
    close(run("model_stock", [x, x], base), x)                      # identical: t = 1
    close(run("model_stock", [x, 2 * base - x], base), base)        # opposite: singular, t = 0
    close(run("model_stock", [x, base], base), base)                # a zero task vector: cos 0
    close(run("model_stock", [base, base], base), base)


# --- nuslerp ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("mode", ["flatten", "rows", "columns"])
def test_nuslerp(with_base, mode):
    base, xs = rand_family((20, 16), n=2, scale=1.0)
    w1, w2 = 0.7, 0.3
    t = w2 / (w1 + w2)
    # as mergekit 0.1.5: row_wise false interpolates rows W[r, :], true columns W[:, c]
    params = {"flatten": {}, "rows": {"nuslerp_flatten": False, "nuslerp_row_wise": False},
              "columns": {"nuslerp_flatten": False, "nuslerp_row_wise": True}}[mode]
    out = run("nuslerp", xs, base if with_base else None, [{"weight": w1}, {"weight": w2}],
              params)
    a, b = (x - base if with_base else x for x in xs)
    if mode == "flatten":
        ref = ref_slerp(t, a.reshape(-1), b.reshape(-1)).view(a.shape)
    elif mode == "rows":
        ref = torch.stack([ref_slerp(t, a[r], b[r]) for r in range(a.shape[0])])
    else:
        ref = torch.stack([ref_slerp(t, a[:, c], b[:, c]) for c in range(a.shape[1])], dim=1)
    close(out, ref + (base if with_base else 0))


def test_nuslerp_without_base_equals_slerp():
    base, xs = rand_family(n=2, scale=1.0)
    out = run("nuslerp", xs, model_params=[{"weight": 2.0}, {"weight": 1.0}])
    close(out, run("slerp", [xs[1]], xs[0], params={"t": 1 / 3}))


def test_spherical_methods_on_antipodal_and_zero_vectors():
    base, xs = rand_family(n=1, scale=1.0)
    x = xs[0]
    equal = [{"weight": 1.0}, {"weight": 1.0}]
    for mode in ({}, {"nuslerp_flatten": False, "nuslerp_row_wise": True},
                 {"nuslerp_flatten": False}):
        close(run("nuslerp", [x, -x], model_params=equal, params=mode), torch.zeros_like(x))
        close(run("nuslerp", [x, 2 * base - x], base, equal, mode), base)   # antipodal τ
        # a zero τ has cos θ = 0: interpolated at θ = π/2, c₁ = sin(π/4)
        close(run("nuslerp", [base, x], base, equal, mode),
              base + math.sin(math.pi / 4) * (x - base))
    close(run("multislerp", [x, -x], model_params=equal), torch.zeros_like(x))
    close(run("karcher", [x, -x]), x)        # no chordal mean: it starts and stays at the first
    close(run("multislerp", [base, base], base, equal), base)
    # a zero vector has no direction: the mean is the other one's, norm halved
    close(run("multislerp", [x, base], base, equal), base + 0.5 * (x - base))
    close(run("slerp", [-x], x, params={"t": 0.5}), torch.zeros_like(x))


# --- multislerp, karcher --------------------------------------------------------------------------

def ref_spherical_mean(vs, w, steps, tol=0.0):
    """Full-dimensional reference: unit vectors, chordal mean start, log/exp maps."""
    vs = [v.reshape(-1).double() for v in vs]
    w = torch.tensor(w, dtype=torch.float64)
    w = w / w.sum()
    us = [v / v.norm() for v in vs]
    m = sum(wi * u for wi, u in zip(w, us))
    m = m / m.norm()
    for _ in range(steps):
        logs = []
        for u in us:
            cos = float((u @ m).clamp(-1, 1))
            v = u - cos * m
            logs.append(v * (math.acos(cos) / v.norm()) if v.norm() > 1e-12 else v * 0)
        step = sum(wi * lg for wi, lg in zip(w, logs))
        if step.norm() <= tol:
            break
        length = step.norm()
        m = math.cos(length) * m + math.sin(length) * step / length
        m = m / m.norm()
    return m, float(sum(wi * v.norm() for wi, v in zip(w, vs)))


@pytest.mark.parametrize("with_base", [False, True])
def test_multislerp(with_base):
    base, xs = rand_family(scale=1.0)
    w = [0.5, 0.3, 0.2]
    out = run("multislerp", xs, base if with_base else None, [{"weight": v} for v in w])
    vs = [x - base for x in xs] if with_base else xs
    # mergekit 0.1.5's tangent step at the chordal mean is zero: the result is the chordal mean
    m, norm = ref_spherical_mean(vs, w, steps=0)
    close(out, (m * norm).view(base.shape) + (base if with_base else 0))


def test_karcher_iterates_to_the_frechet_mean():
    base, xs = rand_family(scale=1.0)
    # weights are accepted by the kernel but ignored: the mean has equal weights (as 0.1.5)
    out = run("karcher", xs, model_params=[{"weight": v} for v in [1.0, 2.0, 0.5]],
              params={"max_iter": 10, "tol": 1e-5})
    m, norm = ref_spherical_mean(xs, [1.0, 1.0, 1.0], steps=10, tol=1e-5)
    close(out, (m * norm).view(base.shape))


def test_karcher_of_two_is_slerp_of_the_directions():
    _, xs = rand_family(n=2, scale=3.0)
    out = run("karcher", xs, params={"max_iter": 100, "tol": 1e-12})
    a, b = (x.reshape(-1).double() for x in xs)
    direction = ref_slerp(0.5, a / a.norm(), b / b.norm())
    norm = (a.norm() + b.norm()) / 2
    close(out, (direction * norm).view(xs[0].shape), rtol=1e-4, atol=1e-5)


# --- nearswap, arcee_fusion ------------------------------------------------------------------------

def test_nearswap():
    base, xs = rand_family(n=1)
    x = xs[0]
    t = 0.03
    w = (t / (base - x).abs().clamp_min(1e-6)).clamp(0, 1)
    close(run("nearswap", [x], base, params={"t": t}), w * x + (1 - w) * base)
    assert torch.equal(run("nearswap", [x], base, params={"t": 0.0}), base)
    close(run("nearswap", [base], base, params={"t": 0.0}), base)
    close(run("nearswap", [x], base, params={"t": 1e9}), x)


@pytest.mark.parametrize("shape", [(48, 40), BIG, (300,)])
def test_arcee_fusion(shape):
    base, xs = rand_family(shape, n=1, scale=0.3)
    x = xs[0]
    p, q = F.softmax(x, -1) + 1e-8, F.softmax(base, -1) + 1e-8
    imp = (x - base).abs() * (p * torch.log(p / q)).sum(-1, keepdim=True)
    ordered = imp.reshape(-1).sort().values
    q1, q2, q3 = (ordered[math.floor(f * (ordered.numel() - 1))] for f in (0.25, 0.5, 0.75))
    ref = base + (x - base) * (imp >= q2 + 1.5 * (q3 - q1))     # mergekit 0.1.5's fence
    out = run("arcee_fusion", [x], base)
    assert torch.equal(out, ref)
    assert 0 < int((out != base).sum()) < base.numel() * 0.25


# --- order statistics -----------------------------------------------------------------------------

def test_streamed_order_statistics_are_exact_even_when_the_bracket_misses():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(400_000, generator=g).abs().round(decimals=2)   # many ties
    spans = [slice(i, min(len(v), i + 65_536)) for i in range(0, len(v), 65_536)]
    n = len(v)
    ordered = v.sort(descending=True).values
    ks = [1, 17, n // 3, n // 2, n - 5, n]
    good = v[order_stats.sample_positions(n, "cpu")]
    for sample in (good, torch.zeros(order_stats.SAMPLE), torch.full((order_stats.SAMPLE,), 9.0)):
        got = order_stats.kth_largest_many(lambda s: v[s], spans, n, ks, sample)
        assert got == [float(ordered[k - 1]) for k in ks]
    qs = [0.0, 0.25, 0.5, 0.9, 1.0]
    got = order_stats.quantiles(lambda s: v[s], spans, n, qs, good)
    close(torch.tensor(got), torch.quantile(v, torch.tensor(qs)))


# --- properties shared by every method ------------------------------------------------------------

def example_call(method, xs, base):
    """A representative call of every method on (up to) three inputs."""
    m = METHODS[method]
    k = m.max_models or 3
    k = max(m.min_models, min(k, 3))
    xs = xs[:k]
    mp = [{} for _ in xs]
    params = {}
    if "weight" in m.params:
        mp = [{"weight": 0.5 + 0.25 * i} for i in range(len(xs))]
    if "density" in m.params:
        for p in mp:
            p["density"] = 0.5
    if "epsilon" in m.params:
        for p in mp:
            p["epsilon"] = 0.2
    if "gamma" in m.params:
        for p in mp:
            p["density"], p["gamma"] = 0.8, 0.05
    if method in ("slerp",):
        params["t"] = 0.4
    if method == "nearswap":
        params["t"] = 0.01
    if method == "sce":
        params["select_topk"] = 0.5
    return xs, (base if m.takes_base else None), mp, params


@pytest.mark.parametrize("method", sorted(METHODS))
def test_identical_models_give_the_model_back(method):
    base, _ = rand_family()
    xs = [base.clone() for _ in range(3)]
    xs_, b, mp, params = example_call(method, xs, base)
    out = run(method, xs_, b, mp, params)
    assert torch.isfinite(out).all()
    expected = base * (mp[0].get("scale", 1.0) if method == "passthrough" else 1.0)
    if method == "linear":
        expected = base
    close(out, expected)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_no_nan_on_zero_tensors_and_inputs_untouched(method):
    base, xs = rand_family()
    for base_, xs_all in ((torch.zeros_like(base), [torch.zeros_like(base)] * 3), (base, xs)):
        xs_, b, mp, params = example_call(method, xs_all, base_)
        before = [x.clone() for x in xs_] + ([b.clone()] if b is not None else [])
        out = run(method, xs_, b, mp, params)
        assert torch.isfinite(out).all(), method
        after = list(xs_) + ([b] if b is not None else [])
        assert all(torch.equal(p, q) for p, q in zip(before, after)), "a kernel modified an input"


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties", "breadcrumbs",
                                    "breadcrumbs_ties", "della", "della_linear"])
def test_density_zero_is_the_base_and_one_keeps_everything(method):
    base, xs = rand_family()
    mp = [{"weight": 0.5, "density": 0.0} for _ in xs]
    assert torch.equal(run(method, xs, base, mp, {"normalize": False}), base)
    mp = [{"weight": 0.5, "density": 1.0, "gamma": 0.0} for _ in xs]
    out = run(method, xs, base, [{k: v for k, v in p.items() if k in METHODS[method].params}
                                 for p in mp], {"normalize": False})
    if method.endswith("ties") or method == "della":
        deltas = torch.stack([0.5 * (x - base) for x in xs])
        close(out, base + consensus(deltas, [0.5] * 3, False))
    else:
        close(out, base + sum(0.5 * (x - base) for x in xs))


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(method, dtype):
    base, xs = rand_family(dtype=dtype)
    xs_, b, mp, params = example_call(method, xs, base)
    out = run(method, xs_, b, mp, params, out_dtype=dtype)
    assert out.dtype == dtype and torch.isfinite(out.float()).all()
    # the same inputs in fp32 give the same result up to the output rounding
    ref = run(method, [x.float() for x in xs_], None if b is None else b.float(), mp, params)
    close(out, ref.to(dtype), rtol=1e-2, atol=1e-2)


# --- bad inputs, before any tensor is loaded ------------------------------------------------------

def plan_error(family, method, models, base=True, parameters=None) -> str:
    cfg = {"merge_method": method,
           "models": [{"model": str(family[m]), "parameters": p} for m, p in models]}
    if base:
        cfg["base_model"] = str(family["base"])
    if parameters:
        cfg["parameters"] = parameters
    with pytest.raises(ConfigError) as e:
        build_plan(MergeConfig.from_dict(cfg))
    return str(e.value)


def test_della_density_epsilon_outside_unit_interval(family):
    msg = plan_error(family, "della", [("c0", {"weight": 1.0, "density": 0.3}),
                                       ("c1", {"weight": 1.0, "density": 0.5})],
                     parameters={"epsilon": 0.3})
    assert "density ± epsilon" in msg and "\n" not in msg
    msg = plan_error(family, "della_linear", [("c0", {"weight": 1.0, "density": 0.9,
                                                      "epsilon": 0.1})])
    assert "density ± epsilon" in msg
    # inside (0, 1), and density 1 with any epsilon, are fine
    cfg = {"merge_method": "della", "base_model": str(family["base"]),
           "models": [{"model": str(family["c0"]), "parameters": {"weight": 1, "density": 0.5}},
                      {"model": str(family["c1"]), "parameters": {"weight": 1}}],
           "parameters": {"epsilon": 0.4}}
    build_plan(MergeConfig.from_dict(cfg))


def test_model_stock_needs_two_models(family):
    msg = plan_error(family, "model_stock", [("c0", None)])
    assert "model_stock takes at least 2" in msg
    # the base listed among the models does not count
    msg = plan_error(family, "model_stock", [("base", None), ("c0", None)])
    assert "at least 2" in msg


@pytest.mark.parametrize("method", ["nearswap", "arcee_fusion"])
def test_two_model_methods_refuse_more(method, family):
    params = {"t": 0.1} if method == "nearswap" else None
    msg = plan_error(family, method, [("c0", None), ("c1", None)], parameters=params)
    assert f"{method} takes exactly 1" in msg


def test_negative_gamma_and_bad_weights(family):
    msg = plan_error(family, "breadcrumbs", [("c0", {"weight": 1.0, "density": 0.9,
                                                     "gamma": -0.1})])
    assert "gamma" in msg and "outside" in msg
    msg = plan_error(family, "multislerp", [("c0", {"weight": 1.0}), ("c1", {"weight": -1.0})])
    assert "sum to zero" in msg
    msg = plan_error(family, "nearswap", [("c0", None)])
    assert "parameters.t" in msg


@pytest.mark.parametrize("case", ["della", "gamma"])
def test_cli_reports_bad_method_parameters_in_one_line(case, family, tmp_path):
    if case == "della":
        cfg = {"merge_method": "della", "base_model": str(family["base"]),
               "models": [{"model": str(family["c0"]),
                           "parameters": {"weight": 1, "density": 0.1, "epsilon": 0.2}}]}
    else:
        cfg = {"merge_method": "breadcrumbs_ties", "base_model": str(family["base"]),
               "models": [{"model": str(family["c0"]), "parameters": {"weight": 1}}],
               "parameters": {"gamma": -0.5}}
    path = tmp_path / "bad.yml"
    path.write_text(yaml.safe_dump(cfg))
    exe = str(__import__("pathlib").Path(sys.executable).parent / "mergekit-yaml")
    r = subprocess.run([exe, str(path), str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()
