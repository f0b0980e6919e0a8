"""Sparsifiers: which entries of a task vector τᵢ = θᵢ − θ_base survive, and how they are rescaled.

A sparsifier is prepared once per (tensor, model) — it may stream over τᵢ once to find thresholds —
and returns a chunk function `apply(d, chunk, w, tmp)` that turns a chunk `d` of τᵢ (fp32, in place)
into `w · sparsified(d)`; `tmp` is a scratch buffer of the same length. `None` means "keep all".

    magnitude       TIES: keep the top-`density` fraction of |τ| (per tensor)
    band            breadcrumbs: drop the top `gamma` fraction and the smallest, keep `density`
    bernoulli       DARE: keep each entry with probability `density`
    magprune        DELLA: keep-probability from density−ε to density+ε by per-row magnitude rank

`rescale` for the random ones divides kept entries by their keep-probability (the L1 norm, and every
entry, is preserved in expectation); for the deterministic ones it multiplies the kept entries by
‖τ‖₁ / ‖kept‖₁ (the L1 norm is preserved exactly).

Random masks come from 16-bit draws: a keep-probability p is realised as the level
round(p·2¹⁶)/2¹⁶ and rescaling divides by that same level, so every expectation is exact. Drawing
full 64-bit integers and splitting them in four costs 0.8 ns per entry against 2.8 ns for
`uniform_` (the Mersenne Twister would otherwise dominate a DARE merge). Each chunk has its own
generator, derived from --random-seed, the tensor name, the model's index and the chunk's index.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

from merge.methods.chunks import flat, row_length, row_spans
from merge.methods.order_stats import SMALL, kth_largest_many, sample_positions
from merge.methods.parallel import buffer, map_chunks
from merge.methods.registry import MergeInputs


@dataclass(frozen=True)
class Chunk:
    index: int      # position in the tensor's fixed chunk layout
    span: slice     # flat element range

    @property
    def size(self) -> int:
        return self.span.stop - self.span.start


ChunkFn = Callable[[object, Chunk, float, object], None]


def chunks_of(shape) -> list[Chunk]:
    return [Chunk(i, s) for i, s in enumerate(row_spans(shape))]


# --- streaming |τ| --------------------------------------------------------------------------------

def abs_delta_of(inp: MergeInputs, i: int):
    """span -> |τᵢ| over that span, in a per-thread buffer."""
    x, b = flat(inp.tensors[i]), flat(inp.base)

    def values_of(s: slice):
        k = s.stop - s.start
        d = buffer("abs_delta.d", k, x.device)
        bf = buffer("abs_delta.b", k, x.device)
        bf.copy_(b[s])
        return d.copy_(x[s]).sub_(bf).abs_()

    return values_of


def abs_delta_sample(inp: MergeInputs, i: int):
    n = inp.base.numel()
    if n <= SMALL:
        return None
    x, b = flat(inp.tensors[i]), flat(inp.base)
    idx = sample_positions(n, x.device)
    return (x[idx].float() - b[idx].float()).abs_()


def magnitude_thresholds(inp: MergeInputs, i: int, ks: list[int]) -> list[float]:
    """Exact k-th largest |τᵢ| for each k: looked up in a kept order (in-memory merges with
    `cache_magnitudes`), else streaming (no full-size buffer)."""
    order = inp.magnitude_order(i)
    if order is not None:
        return [order.kth_largest(k) for k in ks]
    spans = list(row_spans(inp.base.shape))
    return kth_largest_many(abs_delta_of(inp, i), spans, inp.base.numel(), ks,
                            abs_delta_sample(inp, i), inp.base.device)


def l1_rescale(inp: MergeInputs, i: int, lo: float, hi: float) -> float:
    """‖τ‖₁ / ‖τ kept‖₁ for the keep rule lo <= |τ| < hi (1 when nothing is kept)."""
    import torch

    values_of = abs_delta_of(inp, i)

    def sums(s):
        a = values_of(s)
        kept = a * ((a >= lo) & (a < hi))
        return float(a.sum(dtype=torch.float64)), float(kept.sum(dtype=torch.float64))

    parts = map_chunks(sums, row_spans(inp.base.shape), inp.base.device)
    total, kept = sum(p[0] for p in parts), sum(p[1] for p in parts)
    return total / kept if kept > 0 else 1.0


def _zero(d, chunk, w, tmp):
    d.zero_()


# --- TIES magnitude -------------------------------------------------------------------------------

def magnitude(inp: MergeInputs, i: int) -> Optional[ChunkFn]:
    """Keep the top-`density` fraction of |τᵢ|. Entries tied with the threshold are all kept."""
    density = float(inp.model_params[i]["density"])
    n = inp.base.numel()
    k = int(round(density * n))
    if k >= n:
        return None
    if k <= 0:
        return _zero
    (thr,) = magnitude_thresholds(inp, i, [k])
    scale = l1_rescale(inp, i, thr, math.inf) if inp.params.get("rescale", False) else 1.0

    def apply(d, chunk, w, tmp):
        import torch

        torch.abs(d, out=tmp).ge_(thr).mul_(w * scale)
        d.mul_(tmp)

    return apply


# --- breadcrumbs ----------------------------------------------------------------------------------

def band(inp: MergeInputs, i: int) -> Optional[ChunkFn]:
    """Drop the largest `gamma` fraction of |τᵢ| (outliers) and the smallest, so that a `density`
    fraction remains. When density + gamma > 1 the density wins: fewer outliers are dropped."""
    density = float(inp.model_params[i]["density"])
    gamma = float(inp.model_params[i]["gamma"])
    n = inp.base.numel()
    keep = min(n, int(round(density * n)))
    if keep <= 0:
        return _zero
    top = min(int(round(gamma * n)), n - keep)
    if top == 0 and keep == n:
        return None
    ks = ([top] if top > 0 else []) + ([top + keep] if top + keep < n else [])
    found = magnitude_thresholds(inp, i, ks)
    hi = found.pop(0) if top > 0 else math.inf         # drop |τ| >= hi (the top outliers)
    lo = found.pop(0) if top + keep < n else -math.inf  # drop |τ| < lo (the smallest)
    scale = l1_rescale(inp, i, lo, hi) if inp.params.get("rescale", False) else 1.0

    def apply(d, chunk, w, tmp):
        import torch

        torch.abs(d, out=tmp)
        torch.mul((tmp >= lo) & (tmp < hi), w * scale, out=tmp)
        d.mul_(tmp)

    return apply


# --- random draws ---------------------------------------------------------------------------------

LEVELS = 1 << 16


def random_levels(generator, out):
    """out ← uniform integers in [0, 2¹⁶) as fp32, four per full-range 64-bit draw."""
    import torch

    k = out.numel()
    words = buffer("random.words", (k + 3) // 4, out.device, torch.int64)
    words.random_(-(1 << 63), None, generator=generator)
    return out.copy_(words.view(torch.int16)[:k]).add_(LEVELS // 2)


def level_of(p: float) -> int:
    """How many of the 2¹⁶ equally likely draws keep an entry with probability p."""
    return min(LEVELS, max(0, int(round(p * LEVELS))))


# --- DARE -----------------------------------------------------------------------------------------

def bernoulli(inp: MergeInputs, i: int, salt: str = "dare") -> Optional[ChunkFn]:
    """Keep each entry independently with probability `density`; divide by it when rescaling."""
    level = level_of(float(inp.model_params[i]["density"]))
    if level >= LEVELS:
        return None
    if level <= 0:
        return _zero
    scale = LEVELS / level if inp.params.get("rescale", True) else 1.0

    def apply(d, chunk, w, tmp):
        g = inp.generator(f"{salt}/{i}/{chunk.index}")
        random_levels(g, tmp).lt_(level).mul_(w * scale)
        d.mul_(tmp)

    return apply


# --- DELLA ----------------------------------------------------------------------------------------

KEY_SHIFT = 11            # 16-bit rank keys: magnitudes relative to the row maximum, 2^-12 apart
KEY_SPAN = (1 << 27) - 1  # 16 octaves below the row maximum; smaller entries share the last key


def magprune(inp: MergeInputs, i: int) -> Optional[ChunkFn]:
    """DELLA's MagPrune: in each row, the entry of ascending magnitude rank r (0 … L−1) is kept with
    probability pᵣ = density − ε + 2ε·r/(L−1), and divided by pᵣ when rescaling."""
    import torch

    p = float(inp.model_params[i]["density"])
    eps = float(inp.model_params[i]["epsilon"])
    if p >= 1.0:
        return None
    if p <= 0.0:
        return _zero
    if eps == 0.0:
        return bernoulli(inp, i, salt="della")   # every rank gets the same probability
    rescale = inp.params.get("rescale", True)
    length = row_length(inp.base.shape)
    by_rank = keep_levels(p, eps, length).to(inp.base.device)

    def apply(d, chunk, w, tmp):
        level = buffer("della.level", chunk.size, d.device)
        torch.abs(d, out=tmp)
        rank_values(tmp.view(-1, length), by_rank, level.view(-1, length))
        keep = random_levels(inp.generator(f"della/{i}/{chunk.index}"), tmp).lt_(level)
        if rescale:
            keep.div_(level).mul_(LEVELS * w)
        else:
            keep.mul_(w)
        d.mul_(keep)

    return apply


def keep_levels(p: float, eps: float, length: int):
    """Keep-levels (probability × 2¹⁶, at least 1) by descending rank j = 0 … L−1: the largest
    entry gets density + ε, the smallest density − ε; a single-entry row gets density."""
    import torch

    if length == 1:
        probs = torch.full((1,), p, dtype=torch.float64)
    else:
        probs = (p + eps) - 2 * eps * torch.arange(length, dtype=torch.float64) / (length - 1)
    return (probs * LEVELS).round_().clamp_(1, LEVELS).float()


def descending_order(a):
    """Per row of `a` (≥ 0, fp32, rows × L): the column indices from the largest value down.

    Ranks come from 16-bit keys — the magnitude relative to the row maximum in steps of 2^-12
    (fp32 bit patterns of non-negative floats are ordered like the floats) — sorted with a stable
    radix sort, so entries whose magnitudes agree to about 12 significant bits (or are both below
    2^-16 of the row maximum) are ordered by position. A float argsort per row cost 0.6 s per 4M
    elements on 2 cores; the radix sort of 16-bit keys 0.015 s.
    """
    import torch

    bits = a.view(torch.int32)
    key = torch.sub(bits.amax(dim=1, keepdim=True), bits)   # 0 = the row maximum
    key.clamp_(max=KEY_SPAN).bitwise_right_shift_(KEY_SHIFT)
    if a.device.type == "cpu":
        import numpy as np

        keys = key.to(torch.int16).numpy().view(np.uint16)  # 0 … 65535, same bits
        return torch.from_numpy(np.argsort(keys, axis=1, kind="stable"))
    return torch.argsort(key, dim=1, stable=True)


def rank_values(a, by_rank, out) -> None:
    """out[r, c] = by_rank[descending rank of a[r, c] within row r]."""
    out.scatter_(1, descending_order(a), by_rank.expand(a.shape[0], -1))


def della_check(model_params: list[dict], params: dict) -> Optional[str]:
    """DELLA's keep-probabilities density ± epsilon must stay inside (0, 1) so that every entry can
    be both kept and dropped (and 1/p stays bounded); density 0 and 1 mean "drop all"/"keep all"."""
    for i, mp in enumerate(model_params):
        d, e = float(mp["density"]), float(mp["epsilon"])
        if 0.0 < d < 1.0 and (d - e <= 0.0 or d + e >= 1.0):
            return (f"density ± epsilon must stay inside (0, 1) (model #{i + 1}: density {d:g}, "
                    f"epsilon {e:g} gives [{d - e:g}, {d + e:g}]); use epsilon < "
                    f"{min(d, 1 - d):g} or change density")
    return None
