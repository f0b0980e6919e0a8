"""Exact order statistics of one task vector's magnitudes, built once and reused by every merge.

A TIES or breadcrumbs merge needs the k-th largest |τ| = |θ − θ_base| of each input tensor, and an
evolutionary search asks again for every candidate, with new densities. Streaming over τ for each
threshold (merge/methods/order_stats.py) was about 70% of a TIES merge. An in-memory merger may
instead keep, per (model, tensor), the magnitudes in sorted order, so a threshold is a lookup:

* fp32 bit patterns of non-negative floats sort like the floats, so |τ| is sorted as uint32;
* the patterns are sorted within each of the kernels' chunks (`row_spans`) and kept as their lower
  16 bits (2 bytes per entry) plus, per chunk, the distinct upper-16-bit values present and their
  cumulative counts: the upper half of a chunk's j-th pattern is the bucket holding position j.

Per chunk, the counts of entries greater than / equal to any value are two binary searches, which
is what keeping exactly k entries with ties broken by position needs (`sparsify.Cut`) — no pass
over τ. The k-th largest over the whole tensor is a binary search over patterns on those counts.

Memory: 2 bytes per parameter per model, plus a few KB per chunk, for as long as the merger lives
(`cache_magnitudes`). Build: one sort per chunk.
"""
from __future__ import annotations

from merge.methods.chunks import row_spans

BUCKETS = 1 << 16


class MagnitudeOrder:
    def __init__(self, x, base):
        import numpy as np
        import torch

        d = (x.reshape(-1).float() - base.reshape(-1).float()).abs_().cpu()
        bits = d.view(torch.int32).numpy().view(np.uint32)
        self.n = int(bits.size)
        self.spans = list(row_spans(tuple(x.shape)))
        self.low = np.empty(self.n, dtype=np.uint16)
        self.uppers, self.ends = [], []
        for s in self.spans:
            p = np.sort(bits[s])
            self.low[s] = (p & 0xFFFF).astype(np.uint16)
            u = (p >> 16).astype(np.uint16)                # sorted, like p
            change = np.flatnonzero(u[1:] != u[:-1]) + 1
            self.uppers.append(u[np.concatenate(([0], change))] if u.size else u)
            self.ends.append(np.concatenate((change, [u.size])).astype(np.int64) if u.size
                             else np.zeros(0, dtype=np.int64))
        # whole tensor: total[b] = how many patterns have an upper half <= b
        self.total = np.cumsum(np.bincount(bits >> 16, minlength=BUCKETS))

    @property
    def nbytes(self) -> int:
        return (self.low.nbytes + self.total.nbytes
                + sum(u.nbytes + e.nbytes for u, e in zip(self.uppers, self.ends)))

    def _at_most_in(self, j: int, pattern: int) -> int:
        """How many patterns of chunk j are <= `pattern`."""
        import numpy as np

        if pattern < 0:
            return 0
        uppers, ends, s = self.uppers[j], self.ends[j], self.spans[j]
        upper, low = pattern >> 16, pattern & 0xFFFF
        b = int(np.searchsorted(uppers, upper, side="left"))
        start = int(ends[b - 1]) if b > 0 else 0
        if b == len(uppers) or int(uppers[b]) != upper:
            return start                                  # no pattern with this upper half
        stop = int(ends[b])
        # within one bucket the patterns share their upper half, so the lower halves are sorted
        block = self.low[s.start + start:s.start + stop]
        return start + int(np.searchsorted(block, low, side="right"))

    def _bucket(self, j: int, upper: int):
        """Chunk j's lower halves of the patterns whose upper half is `upper` (sorted)."""
        import numpy as np

        uppers, ends, s = self.uppers[j], self.ends[j], self.spans[j]
        b = int(np.searchsorted(uppers, upper, side="left"))
        if b == len(uppers) or int(uppers[b]) != upper:
            return self.low[:0]
        start = int(ends[b - 1]) if b > 0 else 0
        return self.low[s.start + start:s.start + int(ends[b])]

    def kth_largest(self, k: int) -> float:
        """The k-th largest |τ| (1 <= k <= n), exactly as the streamed search finds it."""
        import numpy as np

        if not 1 <= k <= self.n:
            raise ValueError(f"k={k} outside [1, {self.n}]")
        j = self.n - k                                   # ascending position
        upper = int(np.searchsorted(self.total, j, side="right"))
        rank = j - (int(self.total[upper - 1]) if upper > 0 else 0)
        lows = np.concatenate([self._bucket(c, upper) for c in range(len(self.spans))])
        low = int(np.partition(lows, rank)[rank])
        return float(np.array([(upper << 16) | low], dtype=np.uint32).view(np.float32)[0])

    def _pattern(self, value: float) -> int:
        import numpy as np

        return int(np.array([value], dtype=np.float32).view(np.uint32)[0])

    def counts(self, value: float) -> tuple[int, int]:
        """How many |τ| are greater than `value`, and how many equal it, exactly."""
        greater, equal = self.span_counts(value)
        return sum(greater), sum(equal)

    def span_counts(self, value: float) -> tuple[list[int], list[int]]:
        """Per chunk (`row_spans` of the tensor): entries greater than `value`, entries equal."""
        p = self._pattern(value)
        greater, equal = [], []
        for j, s in enumerate(self.spans):
            at_most = self._at_most_in(j, p)
            below = self._at_most_in(j, p - 1)
            greater.append((s.stop - s.start) - at_most)
            equal.append(at_most - below)
        return greater, equal
