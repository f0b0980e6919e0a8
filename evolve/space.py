"""What every search space shares: a box of genes (`genes`, `lower`, `upper`) that CMA-ES moves in.

evolve.genome.GenomeSpace (recipes) and evolve.dataflow.DataflowSpace (layer paths) add their own
starting point and decoder on top.
"""
from __future__ import annotations


class BoxSpace:
    genes: list
    lower: list[float]
    upper: list[float]

    @property
    def dim(self) -> int:
        return len(self.genes)

    def random_point(self, seed: int) -> list[float]:
        """A uniform random point of the box (`random_init: true`)."""
        import numpy as np

        rng = np.random.default_rng(seed)
        return [float(rng.uniform(lo, hi)) for lo, hi in zip(self.lower, self.upper)]

    def clip(self, x) -> list[float]:
        return [float(min(max(v, lo), hi)) for v, lo, hi in zip(x, self.lower, self.upper)]
