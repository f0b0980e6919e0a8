"""Sparsifiers: which entries of a task vector τᵢ = θᵢ − θ_base survive, and how they are rescaled.

A sparsifier is prepared once per (tensor, model) — it may stream over τᵢ once to find thresholds —
and returns a chunk function `apply(d, chunk, w, tmp)` that turns a chunk `d` of τᵢ (fp32, in place)
into `w · sparsified(d)`; `tmp` is a scratch buffer of the same length. `None` means "keep all".
A chunk function may carry two flags: `writes_delta` (it writes w · sparsified(τ) from what its
pre-pass kept, without reading `d`: the merge then skips θᵢ − θ_base) and `elementwise` (no draw or
per-row statistic: it may be called on any piece of a chunk, as `Chunk(index, sub-span)`).

    magnitude       TIES: keep the max(1, ⌊density·n⌋) largest |τ| (per tensor)
    band            breadcrumbs: drop the ⌊gamma·n⌋ largest and the smallest, keep ⌊density·n⌋
    bernoulli       DARE: keep each entry with probability `density`
    magprune        DELLA: keep-probability from density−ε to density+ε by per-row magnitude rank

Keep counts and rescaling are the reference's (mergekit 0.1.5): magnitude keeps exactly
max(1, ⌊density·n⌋) entries, breadcrumbs ⌊density·n⌋ after ⌊gamma·n⌋ outliers; `rescale` multiplies
the kept entries by ‖τ‖₁ / ‖τ kept‖₁ of the whole tensor (the L1 norm is preserved exactly), for the
random methods too (not 1/p per entry), and not at all when either norm is below 1e-7.

Random masks come from 16-bit draws: a keep-probability p is realised as the level
round(p·2¹⁶)/2¹⁶ (within 2⁻¹⁷ of p). Drawing
full 64-bit integers and splitting them in four costs 0.8 ns per entry against 2.8 ns for
`uniform_` (the Mersenne Twister would otherwise dominate a DARE merge). Each chunk has its own
generator, derived from --random-seed, the tensor name, the model's index and the chunk's index.
"""
from __future__ import annotations

import math
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Optional

from merge.methods.chunks import (SUM_BLOCK, flat, row_length, row_spans, stable_sum,
                                  stable_sum_halves)
from merge.methods.order_stats import SMALL, equal_counts, kth_largest_ranked, sample_positions
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
    return [c.value for c in top_cuts(inp, i, ks)]


@dataclass(frozen=True)
class Cut:
    """The k entries of largest |τ|, ties at the cut-off broken by position: an entry is kept when
    |τ| > value, or |τ| == value at a flat index below `split`.

    The reference (mergekit 0.1.5) keeps `torch.argsort(|τ|, descending=True)[:k]`, whose order among
    equal magnitudes is unspecified (on CPU an unstable SIMD quicksort that depends on the
    instruction set); we keep the lowest positions first, which is deterministic and independent of
    chunking. Only ties at a non-zero cut-off can differ: kept zeros contribute nothing.
    """
    value: float
    split: int

    def mask_(self, a, chunk: Chunk) -> None:
        """a ← 1.0 where this chunk's entry (|τ| in `a`) is kept, else 0.0 (in place)."""
        j = min(max(self.split - chunk.span.start, 0), chunk.size)
        if j > 0:
            a[:j].ge_(self.value)
        if j < chunk.size:
            a[j:].gt_(self.value)


def top_cuts(inp: MergeInputs, i: int, ks: list[int]) -> list[Cut]:
    """The cut keeping exactly the k largest |τᵢ| for each k (1 <= k <= n)."""
    return cuts_of(abs_delta_of(inp, i), list(row_spans(inp.base.shape)), inp.base.numel(), ks,
                   lambda: abs_delta_sample(inp, i), inp.base.device, inp.magnitude_order(i))


def cuts_of(values_of, spans, n: int, ks: list[int], sample_of, device, order=None) -> list[Cut]:
    """Cuts keeping exactly the k largest values (of `values_of` over `spans`), ties by position.

    The k-th largest value and the per-chunk counts of greater and equal entries come from a kept
    order (`MagnitudeOrder`, lookups only) when given, else from the streamed search (no extra
    pass); when a tie group at a non-zero value is split, one chunk is read to place the split.
    """
    found = []
    if order is not None:
        same_chunks = getattr(order, "spans", None) == spans
        for k in ks:
            v = order.kth_largest(k)
            greater, equal = order.span_counts(v)   # per chunk: no pass over τ
            found.append((k, v, sum(greater), sum(equal), equal if same_chunks else None))
    else:
        for k, r in zip(ks, kth_largest_ranked(values_of, spans, n, ks, sample_of(), device)):
            found.append((k, r.value, sum(r.greater), sum(r.equal), r.equal))
    cuts = []
    for k, v, greater, equal, per_span in found:
        need = k - greater                     # how many of the ties at v are kept (1 … equal)
        if v == 0.0 or need >= equal:          # all ties kept (or they are zeros: no effect)
            cuts.append(Cut(v, n))
            continue
        if per_span is None:
            per_span = equal_counts(values_of, spans, v, device)
        cuts.append(Cut(v, _split_after(values_of, spans, per_span, need, v)))
    return cuts


def _split_after(values_of, spans, equal: list[int], need: int, v: float) -> int:
    """The flat index just after the `need`-th entry equal to v (in position order)."""
    before = 0
    for s, e in zip(spans, equal):
        if before + e >= need:
            positions = (values_of(s).reshape(-1) == v).nonzero().reshape(-1)
            return s.start + int(positions[need - before - 1]) + 1
        before += e
    raise AssertionError("fewer ties than counted")


def l1_ratio(total: float, kept: float) -> float:
    """The reference's L1 rescale factor ‖τ‖₁ / ‖τ kept‖₁, as an fp32 quotient; 1 when either norm
    is below 1e-7 (then the reference leaves the masked tensor unscaled)."""
    import numpy as np

    if total < 1e-7 or kept < 1e-7:
        return 1.0
    return float(np.float32(total) / np.float32(kept))


def l1_rescale(inp: MergeInputs, i: int, mask_) -> float:
    """‖τ‖₁ / ‖τ kept‖₁ for a deterministic keep rule `mask_(|τ| chunk, chunk)` (in place, 0/1)."""
    import torch

    values_of = abs_delta_of(inp, i)

    def sums(ch: Chunk):
        a = values_of(ch.span)
        m = buffer("l1.mask", ch.size, a.device).copy_(a)
        mask_(m, ch)
        return stable_sum(a), stable_sum(m.mul_(a))

    parts = map_chunks(sums, chunks_of(inp.base.shape), inp.base.device)
    return l1_ratio(sum(p[0] for p in parts), sum(p[1] for p in parts))


def _zero(d, chunk, w, tmp):
    d.zero_()


# --- TIES magnitude -------------------------------------------------------------------------------

def magnitude(inp: MergeInputs, i: int) -> Optional[ChunkFn]:
    """Keep exactly k = max(1, ⌊density·n⌋) entries of largest |τᵢ| (the reference's count: a
    positive density keeps at least one entry); ties at the cut-off by position (`Cut`)."""
    density = float(inp.model_params[i]["density"])
    n = inp.base.numel()
    if density >= 1.0:
        return None
    if density <= 0.0 or n == 0:
        return _zero
    k = max(1, int(density * n))
    if k >= n:
        return None
    (cut,) = top_cuts(inp, i, [k])
    scale = l1_rescale(inp, i, cut.mask_) if inp.params.get("rescale", False) else 1.0

    def apply(d, chunk, w, tmp):
        import torch

        cut.mask_(torch.abs(d, out=tmp), chunk)
        d.mul_(tmp.mul_(w * scale))

    return apply


# --- breadcrumbs ----------------------------------------------------------------------------------

def band(inp: MergeInputs, i: int) -> Optional[ChunkFn]:
    """Keep ⌊density·n⌋ entries after dropping the ⌊gamma·n⌋ largest |τᵢ| (outliers): descending
    ranks [top, top + keep). When density + gamma > 1 the density wins: fewer outliers are dropped
    (top = n − keep), as in the reference."""
    density = float(inp.model_params[i]["density"])
    gamma = float(inp.model_params[i]["gamma"])
    n = inp.base.numel()
    if density >= 1.0:
        return None
    keep = min(n, int(density * n))
    if keep <= 0:
        return _zero
    top = min(int(gamma * n), n - keep)
    if top == 0 and keep == n:
        return None
    ks = ([top] if top > 0 else []) + ([top + keep] if top + keep < n else [])
    found = top_cuts(inp, i, ks)
    outliers = found.pop(0) if top > 0 else None      # the `top` largest: dropped
    kept = found.pop(0) if top + keep < n else None   # the `top + keep` largest (None: all)

    def mask_(a, chunk):
        if outliers is not None:
            o = buffer("band.outliers", chunk.size, a.device).copy_(a)
            outliers.mask_(o, chunk)
        if kept is None:
            a.fill_(1.0)
        else:
            kept.mask_(a, chunk)
        if outliers is not None:
            a.sub_(o)
        return a

    scale = l1_rescale(inp, i, mask_) if inp.params.get("rescale", False) else 1.0

    def apply(d, chunk, w, tmp):
        import torch

        mask_(torch.abs(d, out=tmp), chunk)
        d.mul_(tmp.mul_(w * scale))

    return apply


# --- random draws ---------------------------------------------------------------------------------

LEVELS = 1 << 16


def random_levels(generator, out):
    """out ← uniform integers in [−2¹⁵, 2¹⁵) as fp32, four per full-range 64-bit draw: a draw
    u + 2¹⁵ (uniform in [0, 2¹⁶)) is below a level L exactly when u < L − 2¹⁵ (`keep_`); the
    offset is folded into the level (all values are small integers, exact in fp32)."""
    import torch

    k = out.numel()
    words = buffer("random.words", (k + 3) // 4, out.device, torch.int64)
    words.random_(-(1 << 63), None, generator=generator)
    return out.copy_(words.view(torch.int16)[:k])


def keep_(draws, level):
    """draws (from `random_levels`) ← 1.0 where the draw keeps an entry of keep-level `level`
    (of 2¹⁶; a number, or a tensor already offset by −2¹⁵), else 0.0."""
    return draws.lt_(level - LEVELS // 2 if isinstance(level, int) else level)


def level_of(p: float) -> int:
    """How many of the 2¹⁶ equally likely draws keep an entry with probability p."""
    return min(LEVELS, max(0, int(round(p * LEVELS))))


# --- DARE -----------------------------------------------------------------------------------------

_joint = threading.local()


@contextmanager
def joint_prepass(inp: MergeInputs):
    """Within it, the random sparsifiers made for `inp` (in this thread) defer their rescale
    pre-passes; on leaving, one pass over the chunks runs them all and reads each base chunk once
    (instead of once per model). Their chunk functions may be used only after it is left."""
    pending = (inp, [])
    outer = getattr(_joint, "pending", None)
    _joint.pending = pending
    try:
        yield
    finally:
        _joint.pending = outer
    runs = pending[1]
    if not runs:
        return
    device, b = inp.base.device, flat(inp.base)

    def all_models(ch: Chunk):
        bf = buffer("random.base", ch.size, device).copy_(b[ch.span])
        return [pre(ch, bf) for pre, _ in runs]

    parts = map_chunks(all_models, chunks_of(inp.base.shape), device)
    for j, (_, finish) in enumerate(runs):
        finish([p[j] for p in parts])


SUB = 1 << 18           # entries per cache-sized piece of a pre-pass chunk
STORE_LIMIT = 1 << 24   # entries: up to this size the rescale pre-pass keeps fp32 masked deltas


def random_sparsifier(inp: MergeInputs, i: int, draw, by_magnitude: bool = False) -> ChunkFn:
    """A random keep-mask, rescaled (when `rescale`) as the reference does: the kept entries are
    multiplied by ‖τ‖₁ / ‖τ kept‖₁ of the whole tensor, so the L1 norm is preserved exactly.

    `draw(a, chunk, out)` writes the chunk's 0/1 keep-mask (fp32) into `out`; `a` is |τ| over the
    chunk when `by_magnitude` (read only), else None. Masks come from per-chunk generators, so they
    are the same with and without rescaling. With rescaling one pass over τ draws the masks and sums
    both norms; it keeps the masked task vector τ·m in fp32 (4 bytes per entry for this tensor and
    model), and the merge pass only scales it (`writes_delta`: it reads neither θᵢ nor the base for
    this model). τ·m·s equals τ·(m·s) bit for bit (m is 0 or 1; the sign of a zero is the XOR of
    the signs either way). Above STORE_LIMIT entries the mask is kept as one byte per entry instead
    and the merge pass re-reads τ. The fp32 stores are reused by the calling thread's next tensors
    (at most STORE_LIMIT × 4 bytes per model and merging thread stay allocated).
    """
    import torch

    if not inp.params.get("rescale", True):
        def apply_plain(d, chunk, w, tmp):
            a = torch.abs(d, out=buffer("random.abs", chunk.size, d.device)) if by_magnitude else None
            draw(a, chunk, tmp)
            d.mul_(tmp.mul_(w))

        return apply_plain

    device = inp.base.device
    n = inp.base.numel()
    x, b = flat(inp.tensors[i]), flat(inp.base)
    store = n <= STORE_LIMIT
    if store:
        # kept per calling thread between tensors: writing a fresh 46 MB allocation costs page
        # faults that took 5x the time of the multiply itself
        keep = buffer(f"random.kept{i}", n, device)
    else:
        # uint8, not bool: converting uint8 to fp32 is about 7x faster than bool to fp32 here
        keep = torch.empty(n, dtype=torch.uint8, device=device)

    state = {}

    def pre(ch: Chunk, bf):
        """The pre-pass over one chunk, `bf` the base chunk in fp32: (‖τ‖₁, ‖τ kept‖₁) there."""
        s, k = ch.span, ch.size
        if not by_magnitude and k % SUB == 0 and k > SUB:
            return pre_blocked(ch, bf)
        d = buffer("random.delta", k, device).copy_(x[s]).sub_(bf)
        pair = buffer("random.abs", 2 * k, device)   # |τ| and |τ|·m side by side: one sum
        a = torch.abs(d, out=pair[:k])
        m = buffer("random.mask", k, device)
        draw(a if by_magnitude else None, ch, m)
        if store:
            torch.mul(d, m, out=keep[s])
        else:
            keep[s].copy_(m)
        if k % SUM_BLOCK == 0:
            torch.mul(a, m, out=pair[k:])
            return stable_sum_halves(pair)
        return stable_sum(a), stable_sum(a.mul_(m))

    def pre_blocked(ch: Chunk, bf):
        """`pre` for a mask that does not depend on τ: the whole chunk's mask is drawn first (one
        generator per chunk), the rest runs over SUB-entry pieces whose buffers stay in the
        per-core cache (a third faster); the fp32 block sums are gathered and added in fp64 as
        `stable_sum_halves` adds them, so the norms are the same bits."""
        s, k = ch.span, ch.size
        m = buffer("random.mask", k, device)
        draw(None, ch, m)
        nb = k // SUM_BLOCK
        sums = buffer("random.blocks", 2 * nb, device)
        d = buffer("random.delta", SUB, device)
        pair = buffer("random.abs", 2 * SUB, device)
        per = SUB // SUM_BLOCK
        for j in range(0, k, SUB):
            piece = slice(s.start + j, s.start + j + SUB)
            mj = m[j:j + SUB]
            d.copy_(x[piece]).sub_(bf[j:j + SUB])
            a = torch.abs(d, out=pair[:SUB])
            if store:
                torch.mul(d, mj, out=keep[piece])
            else:
                keep[piece].copy_(mj)
            torch.mul(a, mj, out=pair[SUB:])
            blocks = pair.view(2, per, SUM_BLOCK).sum(dim=2)
            sums[j // SUM_BLOCK:j // SUM_BLOCK + per].copy_(blocks[0])
            sums[nb + j // SUM_BLOCK:nb + j // SUM_BLOCK + per].copy_(blocks[1])
        return (float(sums[:nb].sum(dtype=torch.float64)),
                float(sums[nb:].sum(dtype=torch.float64)))

    def finish(parts):
        state["scale"] = l1_ratio(sum(p[0] for p in parts), sum(p[1] for p in parts))

    pending = getattr(_joint, "pending", None)
    if pending is not None and pending[0] is inp:
        pending[1].append((pre, finish))     # run by `joint_prepass`, one base read for all
    else:
        finish(map_chunks(lambda ch: pre(ch, buffer("random.base", ch.size, device)
                                         .copy_(b[ch.span])),
                          chunks_of(inp.base.shape), device))

    if store:
        def apply_stored(d, chunk, w, tmp):
            torch.mul(keep[chunk.span], w * state["scale"], out=d)

        apply_stored.writes_delta = True
        apply_stored.elementwise = True
        return apply_stored

    def apply(d, chunk, w, tmp):
        d.mul_(tmp.copy_(keep[chunk.span]).mul_(w * state["scale"]))

    apply.elementwise = True
    return apply


def bernoulli(inp: MergeInputs, i: int, salt: str = "dare") -> Optional[ChunkFn]:
    """DARE: keep each entry independently with probability `density`."""
    level = level_of(float(inp.model_params[i]["density"]))
    if level >= LEVELS:
        return None
    if level <= 0:
        return _zero

    def draw(a, chunk, out):
        keep_(random_levels(inp.generator(f"{salt}/{i}/{chunk.index}"), out), level)

    return random_sparsifier(inp, i, draw)


# --- DELLA ----------------------------------------------------------------------------------------

KEY_SHIFT = 11            # 16-bit rank keys: magnitudes relative to the row maximum, 2^-12 apart
KEY_SPAN = (1 << 27) - 1  # 16 octaves below the row maximum; smaller entries share the last key


def magprune(inp: MergeInputs, i: int) -> Optional[ChunkFn]:
    """DELLA's MagPrune: in each row, the entry of ascending magnitude rank r (0 … L−1) is kept with
    probability pᵣ = density − ε + 2ε·r/(L−1) (the reference's formula); the kept entries are then
    rescaled like DARE's (L1 norm of the tensor preserved)."""
    p = float(inp.model_params[i]["density"])
    eps = float(inp.model_params[i]["epsilon"])
    if p >= 1.0:
        return None
    if p <= 0.0:
        return _zero
    if eps == 0.0:
        return bernoulli(inp, i, salt="della")   # every rank gets the same probability
    length = row_length(inp.base.shape)
    # offset by −2¹⁵ like the draws of `random_levels` (exact: integers below 2¹⁷)
    by_rank = (keep_levels(p, eps, length) - LEVELS // 2).to(inp.base.device)

    def draw(a, chunk, out):
        level = buffer("della.level", chunk.size, a.device)
        rank_values(a.view(-1, length), by_rank, level.view(-1, length))
        keep_(random_levels(inp.generator(f"della/{i}/{chunk.index}"), out), level)

    return random_sparsifier(inp, i, draw, by_magnitude=True)


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
