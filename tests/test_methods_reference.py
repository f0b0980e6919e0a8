"""The task-vector family pinned to mergekit 0.1.5's semantics, each from a case small enough to
work out by hand (no reference install needed; tests/test_reference_parity.py runs the reference).

What is pinned: keep counts ⌊density·n⌋ (at least one entry for TIES magnitude pruning), exactly k
entries kept with equal magnitudes at the cut-off taken by position, a zero sign sum elects +, a
normalising divisor of exactly 0 becomes 1 (a tiny one is used as is), L1 rescaling of the whole
tensor for every sparsifier (none below 1e-7), SCE's count of non-zero-variance positions and its
uniform weights for small task vectors, Model Stock's unclamped ratio, its 1e-6 norm floor and its
filter-wise vectors along the last dimension.
"""
from __future__ import annotations

import pytest
import torch

from merge.config import MergeConfig
from merge.methods import METHODS
from merge.methods.magnitude_order import MagnitudeOrder
from merge.plan import build_plan

from kernel_inputs import inputs

BIG = (700, 500)      # 350k entries: more than order_stats.SMALL, so thresholds are streamed


def call(method, xs, base, model_params=None, params=None, seed=0, orders=None):
    inp = inputs(method, xs, base, model_params, params, seed=seed)
    inp.orders = orders
    return METHODS[method].kernel(inp)


def equal_magnitudes(shape, value=0.5, seed=0):
    """A task vector whose entries all have magnitude `value`, random signs."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, shape, generator=g) * 2 - 1).float() * value


# --- keep counts ----------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["ties", "breadcrumbs"])
def test_keep_count_is_the_floor_of_density_times_n(method):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(1001, generator=g)
    x = base + torch.randn(1001, generator=g)
    out = call(method, [x], base, [{"weight": 1.0, "density": 0.8, "gamma": 0.0}],
               {"normalize": False})
    assert int((out != base).sum()) == 800          # ⌊800.8⌋, not round(800.8) = 801


def test_ties_keeps_at_least_one_entry():
    base = torch.zeros(1000)
    x = torch.linspace(-1, 2, 1000)
    out = call("ties", [x], base, [{"weight": 1.0, "density": 0.0004}], {"normalize": False})
    assert int((out != 0).sum()) == 1 and float(out.abs().max()) == 2.0   # the largest |τ|


# --- equal magnitudes at the cut-off --------------------------------------------------------------

@pytest.mark.parametrize("shape", [(40, 25), BIG])
def test_ties_with_equal_magnitudes_keep_exactly_k_by_position(shape):
    tau = equal_magnitudes(shape)
    base = torch.zeros(shape)
    n = tau.numel()
    out = call("ties", [tau], base, [{"weight": 1.0, "density": 0.3}], {"normalize": False})
    kept = (out != 0).reshape(-1)
    k = int(0.3 * n)
    assert int(kept.sum()) == k and bool(kept[:k].all())      # the first k positions
    assert torch.equal(out.reshape(-1)[:k], tau.reshape(-1)[:k])


def test_ties_split_tie_group_with_larger_entries_elsewhere():
    """Entries above the cut-off are all kept; the rest of the k are the earliest ties."""
    n = 400_000
    tau = equal_magnitudes((n,), 0.25, seed=3)
    big = torch.arange(7, n, 1000)                           # 400 entries above the tie value
    tau[big] = 1.0
    out = call("ties", [tau], torch.zeros(n), [{"weight": 1.0, "density": 0.01}],
               {"normalize": False})
    kept = out != 0
    assert int(kept.sum()) == 4000 and bool(kept[big].all())
    ties_kept = (kept & (tau.abs() == 0.25)).nonzero().reshape(-1)
    others = torch.ones(n, dtype=torch.bool)
    others[big] = False
    first = others.nonzero().reshape(-1)[:3600]               # the 3600 earliest tie positions
    assert torch.equal(ties_kept, first)


def test_breadcrumbs_ties_at_both_ends_by_position():
    n = 1000
    tau = equal_magnitudes((n,), 0.5)
    out = call("breadcrumbs", [tau], torch.zeros(n),
               [{"weight": 1.0, "density": 0.5, "gamma": 0.1}])
    kept = (out != 0).nonzero().reshape(-1)
    # descending ranks [100, 600): with every magnitude equal, positions 100 … 599
    assert torch.equal(kept, torch.arange(100, 600))


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
def test_kept_orders_break_ties_like_the_streamed_search(method):
    g = torch.Generator().manual_seed(5)
    base = torch.randn(BIG, generator=g)
    # bf16-like quantised task vectors: few distinct magnitudes, so cut-offs split tie groups
    xs = [base + (0.02 * torch.randn(BIG, generator=g) * 64).round() / 64 for _ in range(2)]
    mp = [{"weight": 0.6, "density": 0.37, "gamma": 0.013},
          {"weight": 0.4, "density": 0.52, "gamma": 0.021}]
    plain = call(method, xs, base, mp, {"rescale": True})
    used = []
    cached = call(method, xs, base, mp, {"rescale": True},
                  orders=lambda i: used.append(i) or MagnitudeOrder(xs[i], base))
    assert used and torch.equal(plain, cached)


def test_magnitude_order_counts():
    x = torch.tensor([0.0, 0.5, -0.5, 0.25, 1.0, 0.5, 0.0])
    order = MagnitudeOrder(x, torch.zeros(7))
    assert order.counts(0.5) == (1, 3)
    assert order.counts(0.0) == (5, 2)
    assert order.counts(1.0) == (0, 1)
    assert order.counts(0.3) == (4, 0)


# --- sign election and the divisor ----------------------------------------------------------------

def test_zero_sign_sum_elects_plus():
    base = torch.zeros(4)
    a = torch.tensor([0.5, -0.5, 0.2, 0.0])
    b = torch.tensor([-0.5, 0.5, 0.2, 0.0])
    out = call("ties", [a, b], base, [{"weight": 1.0}, {"weight": 1.0}])
    # entries 0 and 1 sum to 0: + is elected, the positive delta survives (divided by its weight)
    assert torch.equal(out, torch.tensor([0.5, 0.5, 0.2, 0.0]))


def test_divisor_exactly_zero_becomes_one_but_a_tiny_one_is_used():
    base = torch.zeros(3)
    tau = torch.tensor([0.3, -0.2, 0.1])
    # a single tiny weight: the survivors' weight sum is 1e-9, and the reference divides by it
    out = call("ties", [tau], base, [{"weight": 1e-9}])
    torch.testing.assert_close(out, tau)
    # weights 1 and −1 that both survive: divisor exactly 0 → 1
    out = call("ties", [tau, -tau], base, [{"weight": 1.0}, {"weight": -1.0}])
    torch.testing.assert_close(out, 2 * tau)


# --- rescaling ------------------------------------------------------------------------------------

@pytest.mark.parametrize("method,extra", [("dare_linear", {}), ("della_linear", {"epsilon": 0.2}),
                                          ("ties", {}), ("breadcrumbs", {"gamma": 0.05})])
def test_rescale_preserves_the_l1_norm_of_the_whole_tensor(method, extra):
    g = torch.Generator().manual_seed(2)
    base = torch.randn(32, 24, generator=g)
    x = base + torch.randn(32, 24, generator=g)
    out = call(method, [x], base, [{"weight": 1.0, "density": 0.4, **extra}],
               {"rescale": True, "normalize": False}, seed=4)
    tau, delta = (x - base).double(), (out - base).double()
    kept = delta != 0
    ratio = tau.abs().sum() / tau[kept].abs().sum()
    torch.testing.assert_close(delta[kept], tau[kept] * ratio, rtol=1e-5, atol=1e-6)
    assert float(delta.abs().sum() / tau.abs().sum()) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("method", ["ties", "dare_linear"])
def test_no_rescale_when_the_norms_are_below_1e_7(method):
    tau = torch.full((100,), 1e-10)
    tau[::3] = -2e-10
    out = call(method, [tau], torch.zeros(100), [{"weight": 1.0, "density": 0.5}],
               {"rescale": True, "normalize": False}, seed=1)
    kept = out != 0
    assert 0 < int(kept.sum()) < 100
    assert torch.equal(out[kept], tau[kept])                  # masked, not scaled


# --- SCE ------------------------------------------------------------------------------------------

def test_sce_selects_from_the_positions_of_nonzero_variance():
    g = torch.Generator().manual_seed(0)
    n = 2000
    base = torch.randn(n, generator=g)
    common = torch.randn(n, generator=g)
    xs = [base + common + torch.randn(n, generator=g) * (torch.arange(n) < 800) for _ in range(3)]
    out = call("sce", xs, base, params={"select_topk": 0.5})
    # 800 positions vary across the models: ⌊800·0.5⌋ = 400 are selected; elsewhere the base
    assert int((out != base).sum()) == 400
    assert torch.equal(out[800:], base[800:])


def test_sce_uniform_weights_for_small_task_vectors():
    g = torch.Generator().manual_seed(0)
    base = torch.zeros(64, 32)
    taus = [s * (torch.rand(64, 32, generator=g) + 0.5) for s in (1e-4, 5e-4)]  # Σ mean τ² < 1e-6
    out = call("sce", [base + t for t in taus], base)
    torch.testing.assert_close(out, base + (taus[0] + taus[1]) / 2)    # positive: all survive
    big = [t * 1e3 for t in taus]                                       # now ∝ mean τ²
    out = call("sce", [base + t for t in big], base)
    m = torch.tensor([float((t.double() ** 2).mean()) for t in big])
    w = m / m.sum()
    torch.testing.assert_close(out, base + (w[0] * big[0] + w[1] * big[1]) / w.sum(),
                               rtol=1e-5, atol=1e-6)


# --- Model Stock ----------------------------------------------------------------------------------

def test_model_stock_ratio_goes_negative_at_obtuse_angles():
    base = torch.zeros(2)
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([-0.5, 0.8660254])     # cos = −0.5
    out = call("model_stock", [a, b], base)
    t = 2 * -0.5 / (1 - 0.5)                                             # −2
    torch.testing.assert_close(out, t * (a + b) / 2, rtol=1e-5, atol=1e-6)


def test_model_stock_norm_floor_shrinks_tiny_task_vectors():
    base = torch.zeros(8)
    tau = torch.full((8,), 1e-4 / 8 ** 0.5)                  # ‖τ‖ = 1e-4: norm product 1e-8
    out = call("model_stock", [tau, tau], base)
    c = 1e-8 / 1e-6                                          # ⟨τ, τ⟩ / 1e-6 = 0.01
    t = 2 * c / (1 + c)
    torch.testing.assert_close(out, t * tau, rtol=1e-5, atol=1e-12)


def test_model_stock_filter_wise_along_the_last_dimension():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(2, 3, 16, generator=g)
    xs = [base + torch.randn(2, 3, 16, generator=g) for _ in range(3)]
    out = call("model_stock", xs, base, params={"filter_wise": True})
    for i in range(2):
        for j in range(3):
            taus = [(x - base)[i, j].double() for x in xs]
            cos = [float(taus[p] @ taus[q] / (taus[p].norm() * taus[q].norm()))
                   for p in range(3) for q in range(p + 1, 3)]
            c = sum(cos) / 3
            t = 3 * c / (1 + 2 * c)
            torch.testing.assert_close(out[i, j].double(), base[i, j].double()
                                       + t * sum(taus) / 3, rtol=1e-5, atol=1e-5)


# --- parameters the reference declares ------------------------------------------------------------

def test_task_arithmetic_accepts_density_and_rescale(family):
    cfg = {"merge_method": "task_arithmetic", "base_model": str(family["base"]),
           "models": [{"model": str(family["c0"]),
                       "parameters": {"weight": 1.0, "density": 0.5}}],
           "parameters": {"rescale": True, "int8_mask": True}}
    build_plan(MergeConfig.from_dict(cfg))
    g = torch.Generator().manual_seed(0)
    base = torch.randn(30, generator=g)
    x = base + torch.randn(30, generator=g)
    out = call("task_arithmetic", [x], base, [{"weight": 1.0, "density": 0.5}], {"rescale": True})
    torch.testing.assert_close(out, x)                       # no effect: nothing is dropped
