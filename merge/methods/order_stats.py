"""Exact order statistics of a quantity that is computed chunk by chunk and never held in full.

Sparsifiers need thresholds such as "the k-th largest |τ|" or "the 75th percentile of importance"
over a whole tensor. Materialising the quantity costs a full-size fp32 buffer and a full-size
selection (`kthvalue` over 11.5M elements: 0.2 s, NOTES.md). Instead:

1. evaluate the quantity at a fixed random sample of positions and bracket each wanted order
   statistic between two sample quantiles (a margin of six standard errors);
2. stream the chunks once: count the entries above each bracket and keep the few inside it;
3. `kthvalue` inside the bracket gives the exact answer. If a bracket missed (astronomically rare),
   one more streaming pass keeps everything on the side where the answer lies, so the result is
   always exact.

The sample positions depend only on the number of elements, so results are reproducible.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

from merge.methods.parallel import buffer, map_chunks

SAMPLE = 1 << 16
SMALL = 4 * SAMPLE   # below this many elements, materialise and select directly

ValuesOf = Callable[[slice], object]   # span -> fp32 1-D values (may be a reused buffer)


def sample_positions(n: int, device):
    import torch

    g = torch.Generator(device="cpu").manual_seed(n)
    return torch.randint(0, n, (SAMPLE,), generator=g).to(device)


@dataclass(frozen=True)
class Ranked:
    """The k-th largest value and, per span (in span order), how many entries are greater than it
    and how many equal it: enough to keep exactly k entries with ties broken by position."""
    value: float
    greater: list[int]
    equal: list[int]


def kth_largest_many(values_of: ValuesOf, spans: Sequence[slice], n: int, ks: list[int],
                     sample=None, device="cpu") -> list[float]:
    """The k-th largest value (1 <= k <= n) for each k in `ks`, exactly, as Python floats.

    `values_of(span)` computes the quantity over one span (the spans cover all n entries);
    `sample` is the quantity at `sample_positions(n)` (used when n > SMALL).
    """
    return [r.value for r in kth_largest_ranked(values_of, spans, n, ks, sample, device)]


def kth_largest_ranked(values_of: ValuesOf, spans: Sequence[slice], n: int, ks: list[int],
                       sample=None, device="cpu") -> list[Ranked]:
    """`kth_largest_many` plus the per-span counts of entries greater than / equal to each answer.

    The counts come from the same streaming pass: an entry above a bracket is greater than any
    value inside it, so only the few entries inside the bracket are compared with the answer.
    """
    import torch

    spans = list(spans)
    for k in ks:
        if not 1 <= k <= n:
            raise ValueError(f"k={k} outside [1, {n}]")
    if n <= SMALL or sample is None:
        parts = [values_of(s).reshape(-1).float().clone() for s in spans]
        values = torch.cat(parts)
        out = []
        for k in ks:
            v = float(values.kthvalue(n - k + 1).values)
            out.append(Ranked(v, [int((p > v).sum()) for p in parts],
                              [int((p == v).sum()) for p in parts]))
        return out

    ordered = sample.float().sort().values
    brackets = []
    for k in ks:
        q = 1.0 - k / n
        margin = 6.0 * math.sqrt(max(q * (1 - q), 1.0 / SAMPLE) / SAMPLE) + 2.0 / SAMPLE
        lo = float(ordered[max(0, math.floor((q - margin) * (SAMPLE - 1)))])
        hi = float(ordered[min(SAMPLE - 1, math.ceil((q + margin) * (SAMPLE - 1)))])
        brackets.append(((lo + hi) / 2, (hi - lo) / 2))

    def scan(s):
        c = values_of(s).reshape(-1)
        t = buffer("order_stats.t", c.numel(), c.device)
        u = buffer("order_stats.u", c.numel(), c.device)
        # an fp32 sum of 0/1 values is exact below 2^24 entries (chunks are ~1M)
        exact_count = torch.float32 if c.numel() < (1 << 24) else torch.float64
        found = []
        for mid, half in brackets:
            # Below, inside and above the bracket are all read off t = fl(c − mid), which is
            # monotone in c, so the three parts partition the values exactly; float-valued masks
            # (compare into fp32 + sum) cost a quarter of a bool compare + count_nonzero here.
            torch.sub(c, mid, out=t)
            above = int(torch.gt(t, half, out=u).sum(dtype=exact_count))
            found.append((above, c[t.abs_() <= half].float()))
        return found

    per_chunk = map_chunks(scan, spans, device)
    out = []
    for j, k in enumerate(ks):
        above = sum(chunk[j][0] for chunk in per_chunk)
        band = torch.cat([chunk[j][1] for chunk in per_chunk])
        need = k - above
        if 1 <= need <= band.numel():
            v = float(band.kthvalue(band.numel() - need + 1).values)
            # t = fl(c − mid) is monotone: entries above the bracket exceed every value inside it
            out.append(Ranked(v, [c[j][0] + int((c[j][1] > v).sum()) for c in per_chunk],
                              [int((c[j][1] == v).sum()) for c in per_chunk]))
        else:
            v = _fallback(values_of, spans, n, k, brackets[j], device)
            greater, equal = counts_at(values_of, spans, v, device)
            out.append(Ranked(v, greater, equal))
    return out


def counts_at(values_of: ValuesOf, spans: Sequence[slice], v: float, device="cpu"):
    """Per span: how many values are greater than `v`, how many equal it (one streaming pass)."""
    def count(s):
        c = values_of(s).reshape(-1)
        return int((c > v).sum()), int((c == v).sum())

    parts = map_chunks(count, spans, device)
    return [p[0] for p in parts], [p[1] for p in parts]


def equal_counts(values_of: ValuesOf, spans: Sequence[slice], v: float, device="cpu") -> list[int]:
    """Per span: how many values equal `v`."""
    def count(s):
        return int((values_of(s).reshape(-1) == v).sum())

    return map_chunks(count, spans, device)


def _fallback(values_of, spans, n: int, k: int, bracket, device) -> float:
    """Exact k-th largest when the sampled bracket missed: keep everything on the side of the
    bracket where the answer lies (same partition as the main pass) and select there."""
    import torch

    mid, half = bracket

    def side(upper: bool):
        def part(s):
            c = values_of(s).reshape(-1)
            t = c.float() - mid
            return c[t > half].float() if upper else c[t < -half].float()
        return torch.cat(map_chunks(part, spans, device))

    upper = side(True)
    if upper.numel() >= k:          # the answer lies above the bracket
        return float(upper.kthvalue(upper.numel() - k + 1).values)
    lower = side(False)
    need = k - (n - lower.numel())  # rank of the answer among the values below the bracket
    return float(lower.kthvalue(lower.numel() - need + 1).values)


def quantiles(values_of: ValuesOf, spans: Sequence[slice], n: int, qs: list[float],
              sample=None, device="cpu") -> list[float]:
    """`torch.quantile`'s default (linear interpolation between order statistics) for each q,
    exactly, without holding the values."""
    positions = [q * (n - 1) for q in qs]
    wanted = sorted({math.floor(p) for p in positions} | {math.ceil(p) for p in positions})
    ks = [n - i for i in wanted]                      # i-th smallest (0-based) = (n−i)-th largest
    stats = dict(zip(wanted, kth_largest_many(values_of, spans, n, ks, sample, device)))
    out = []
    for p in positions:
        lo, hi = math.floor(p), math.ceil(p)
        out.append(stats[lo] + (p - lo) * (stats[hi] - stats[lo]))
    return out
