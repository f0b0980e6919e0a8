"""Exact order statistics of one task vector's magnitudes, built once and reused by every merge.

A TIES or breadcrumbs merge needs the k-th largest |τ| = |θ − θ_base| of each input tensor, and an
evolutionary search asks again for every candidate, with new densities. Streaming over τ for each
threshold (merge/methods/order_stats.py) was about 70% of a TIES merge. An in-memory merger may
instead keep, per (model, tensor), the magnitudes in sorted order, so a threshold is a lookup:

* fp32 bit patterns of non-negative floats sort like the floats, so |τ| is sorted as uint32;
* the sorted patterns are kept as their lower 16 bits (2 bytes per entry) plus the cumulative count
  of each upper-16-bit value: the upper half of the j-th pattern is the bucket holding position j.

Memory: 2 bytes per parameter per model, for as long as the merger lives (`cache_magnitudes`).
Build: one sort per tensor (0.65 s for 11.5M entries on this machine).
"""
from __future__ import annotations

BUCKETS = 1 << 16


class MagnitudeOrder:
    def __init__(self, x, base):
        import numpy as np
        import torch

        d = (x.reshape(-1).float() - base.reshape(-1).float()).abs_().cpu()
        patterns = np.sort(d.view(torch.int32).numpy().view(np.uint32))
        self.n = int(patterns.size)
        self.low = (patterns & 0xFFFF).astype(np.uint16)
        # ends[b] = how many patterns have an upper half <= b
        self.ends = np.cumsum(np.bincount(patterns >> 16, minlength=BUCKETS))

    @property
    def nbytes(self) -> int:
        return self.low.nbytes + self.ends.nbytes

    def kth_largest(self, k: int) -> float:
        """The k-th largest |τ| (1 <= k <= n), exactly as the streamed search finds it."""
        import numpy as np

        if not 1 <= k <= self.n:
            raise ValueError(f"k={k} outside [1, {self.n}]")
        j = self.n - k                                   # ascending position
        upper = int(np.searchsorted(self.ends, j, side="right"))
        pattern = np.array([(upper << 16) | int(self.low[j])], dtype=np.uint32)
        return float(pattern.view(np.float32)[0])

    def counts(self, value: float) -> tuple[int, int]:
        """How many |τ| are greater than `value`, and how many equal it, exactly."""
        import numpy as np

        pattern = int(np.array([value], dtype=np.float32).view(np.uint32)[0])
        return self.n - self._at_most(pattern), self._at_most(pattern) - self._at_most(pattern - 1)

    def _at_most(self, pattern: int) -> int:
        """How many sorted patterns are <= `pattern` (a non-negative fp32 bit pattern)."""
        import numpy as np

        if pattern < 0:
            return 0
        upper, low = pattern >> 16, pattern & 0xFFFF
        start = int(self.ends[upper - 1]) if upper > 0 else 0
        stop = int(self.ends[upper])
        # within one bucket the patterns share their upper half, so the lower halves are sorted
        return start + int(np.searchsorted(self.low[start:stop], low, side="right"))
