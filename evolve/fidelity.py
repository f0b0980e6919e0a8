"""Multi-fidelity fitness: score every candidate of a generation on a few items, and only the most
promising ones on all of them (one round of successive halving per generation).

A generation of N candidates:
  rung 0  every candidate on the same small subset of each task's items (`low_fraction` of them,
          at least `min_items`; a new subset every generation, drawn from the seed and the
          generation: common random numbers, so differences between candidates are not which
          items they happened to get);
  rung 1  the best `promote_fraction` of them (1/16, at least one) on the remaining items; their
          score is the item-weighted mean of both rungs, i.e. exactly the full-fitness score.
The optimizer is told ranks (`optimizer_values`): promoted candidates by their full score, above
the others by their rung-0 score, above failures. CMA-ES only uses the order of the values it is
told, so ranks lose nothing; only full-fidelity scores count as the search's best.

The interface is genome-agnostic: per-task scores and item counts in, scores and ranks out; the
search (evolve.search) asks `plan.low_items(g)`, `plan.promoted(...)`, `plan.rest_items(...)`,
`plan.combine(...)` and `optimizer_values(...)`, and workers score whatever items they are given.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Optional

from merge.errors import EvomergeError

LOW_FRACTION = 1 / 8      # of each task's items, at rung 0
MIN_ITEMS = 8             # per task, at rung 0
PROMOTE_FRACTION = 1 / 16  # of the generation, promoted to rung 1 (at least one)
PAYS_BELOW = 0.5          # auto: on when the expected share of items scored is at most this
AUTO_MIN_POPSIZE = 16     # auto: ... and a generation of at least this many (bench_search: at
                          # popsize 8 the demo lost 3.6 held-out points, at 16 it held)
AUTO_MIN_LOW = 16         # auto: ... and rung 0 gets at least this many items per task (at 1/8:
                          # tasks of 128+ items). With 8 of 60 the demo lost 3.6 held-out points.


@dataclass
class FidelityPlan:
    """The items of each task at full fidelity, and how a generation is split into rungs."""

    full: dict[str, list[int]]          # task -> item indices scored at full fidelity
    seed: int = 42
    multi: bool = True
    low_fraction: float = LOW_FRACTION
    min_items: int = MIN_ITEMS
    promote_fraction: float = PROMOTE_FRACTION
    notes: list[str] = field(default_factory=list)

    # --- items ------------------------------------------------------------------------------
    def total(self) -> int:
        return sum(len(v) for v in self.full.values())

    def low_count(self, task: str) -> int:
        n = len(self.full[task])
        return min(n, max(self.min_items, math.ceil(self.low_fraction * n)))

    def low_items(self, generation: int) -> dict[str, list[int]]:
        """Rung 0's items: the same for every candidate of `generation`."""
        out = {}
        for task, items in self.full.items():
            rng = random.Random(f"{self.seed}|{generation}|{task}")
            out[task] = sorted(rng.sample(items, self.low_count(task)))
        return out

    def rest_items(self, low: dict[str, list[int]]) -> dict[str, list[int]]:
        return {task: [i for i in items if i not in set(low[task])]
                for task, items in self.full.items()}

    def describe_items(self, generation: int, rung: int) -> dict:
        """What a record says about the items its scores used: `count` items (of `of`), of
        which `scored` were scored by this evaluation (rung 1 reuses rung 0's); `subset` names
        them (rung 0: `seed<S>/g<G>`, drawn by `low_items(G)`)."""
        total = self.total()
        if not self.multi:
            return {"count": total, "of": total, "scored": total, "subset": "full"}
        low = sum(len(v) for v in self.low_items(generation).values())
        if rung == 0:
            return {"count": low, "of": total, "scored": low,
                    "subset": f"seed{self.seed}/g{generation}", "rung": 0}
        return {"count": total, "of": total, "scored": total - low, "subset": "full", "rung": 1}

    def share(self, popsize: int) -> float:
        """The expected share of full fitness's items this plan scores per generation."""
        if not self.multi:
            return 1.0
        low = sum(self.low_count(t) for t in self.full) / max(1, self.total())
        return low + self.promote_count(popsize) / popsize * (1 - low)

    # --- rungs ------------------------------------------------------------------------------
    def promote_count(self, popsize: int) -> int:
        return max(1, math.floor(self.promote_fraction * popsize))

    def promoted(self, fitness: dict[int, Optional[float]], popsize: int) -> list[int]:
        """The candidates (by index) scored further: the best rung-0 fitness, ties by index."""
        ok = sorted((i for i, f in fitness.items() if f is not None),
                    key=lambda i: (-fitness[i], i))
        return sorted(ok[:self.promote_count(popsize)])

    def combine(self, low: dict[str, float], rest: dict[str, float],
                low_items: dict[str, list[int]],
                rest_items: dict[str, list[int]]) -> dict[str, float]:
        """Full-fidelity scores from both rungs: item-weighted means (tasks are mean-aggregated,
        which `make_plan` checks)."""
        out = {}
        for task in self.full:
            a, b = len(low_items[task]), len(rest_items[task])
            out[task] = low[task] if b == 0 else (low[task] * a + rest[task] * b) / (a + b)
        return out


def optimizer_values(entries: list[dict]) -> list[float]:
    """Values for a minimizing optimizer from one generation's candidates, best first:
    `{"fitness": float|None, "full": bool}` each. Full-fidelity candidates rank above the others,
    each group by fitness, failures (fitness None) last; equal keys share a rank."""
    def key(e):
        if e.get("fitness") is None:
            return (2, 0.0)
        return (0 if e.get("full", True) else 1, -e["fitness"])
    keys = [key(e) for e in entries]
    order = sorted(set(keys))
    rank = {k: float(i) for i, k in enumerate(order)}
    return [rank[k] for k in keys]


# --- choosing a plan ------------------------------------------------------------------------------
def full_items(loaded: dict, limit, shuffle: bool, seed: int) -> dict[str, list[int]]:
    """The item indices each task is scored on at full fidelity: the first `limit` items, or a
    fixed random subset of them with `shuffle: true` (evolve.tasks.sample_indices)."""
    from evolve.tasks import doc_count, sample_indices

    if shuffle:
        return sample_indices(loaded, limit, seed)
    out = {}
    for name, task in loaded["tasks"].items():
        n = doc_count(task)
        k = n if limit is None else (int(limit * n) if isinstance(limit, float) and limit < 1
                                     else min(int(limit), n))
        out[name] = list(range(k))
    return out


def _not_additive(loaded: dict, task_names: list[str], metrics: dict[str, str]) -> Optional[str]:
    """Why item subsets cannot be combined into a full score, or None: every task must be a plain
    task (not a group) whose metric is aggregated by its mean."""
    from lm_eval.api.metrics import mean

    for name in task_names:
        task = loaded["tasks"].get(name)
        if task is None:
            return f"'{name}' is a group"
        metric = metrics[name].split(",")[0]
        try:
            agg = task.aggregation().get(metric)
        except Exception:
            agg = None
        if agg is not mean:
            return f"'{name}' aggregates {metric} by {getattr(agg, '__name__', agg)}, not a mean"
    return None


def make_plan(mode: str, loaded: dict, task_names: list[str], metrics: dict[str, str], limit,
              shuffle: bool, seed: int, popsize: int) -> FidelityPlan:
    """`--fidelity auto|multi|full`: auto turns multi-fidelity on where it pays (every task
    mean-aggregated, a generation of at least 8 — 4 with `multi` —, at most half of the items
    scored, and at least AUTO_MIN_LOW items per task at rung 0)."""
    full = full_items(loaded, limit, shuffle, seed)
    full = {t: full[t] for t in task_names if t in full}
    plan = FidelityPlan(full=full, seed=seed, multi=mode != "full")
    if mode == "full":
        return plan
    why = _not_additive(loaded, task_names, metrics) if len(full) == len(task_names) else (
        "a task is a group")
    if why is None and popsize < (AUTO_MIN_POPSIZE if mode == "auto" else 4):
        why = f"a generation of {popsize} is too small to rank on a few items"
    share = plan.share(popsize) if why is None else 1.0
    if why is None and mode == "auto" and share > PAYS_BELOW:
        why = f"it would score {share:.0%} of the items (tasks too small: {plan.total()} items)"
    small = [t for t, items in full.items() if math.ceil(plan.low_fraction * len(items))
             < AUTO_MIN_LOW]
    if why is None and mode == "auto" and small:
        n = len(full[small[0]])
        why = (f"'{small[0]}' has {n} items: 1/8 of them ranks candidates poorly; auto needs "
               f"{math.ceil(AUTO_MIN_LOW / plan.low_fraction)} per task, --fidelity multi forces it")
    if why is not None:
        if mode == "multi":
            raise EvomergeError(f"--fidelity: multi-fidelity needs mean-aggregated tasks and "
                                f"enough items; here {why}; use --fidelity full")
        plan.multi = False
        plan.notes.append(f"full fitness: every candidate on every item ({why})")
        return plan
    low = {t: plan.low_count(t) for t in full}
    plan.notes.append(
        f"multi-fidelity: each generation first on {_counts(low)} items per task, the best "
        f"{plan.promote_count(popsize)} of {popsize} then on all {_counts({t: len(v) for t, v in full.items()})} "
        f"(about {share:.0%} of the items of full fitness); --fidelity full turns it off")
    return plan


def _counts(per_task: dict[str, int]) -> str:
    values = sorted(set(per_task.values()))
    return str(values[0]) if len(values) == 1 else "/".join(str(per_task[t]) for t in per_task)
