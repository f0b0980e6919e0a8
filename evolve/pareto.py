"""Multi-objective search: per-task objectives and a Pareto front instead of one weighted sum.

Each task is an objective with an explicit direction (`goal: maximize`, or `minimize` for
perplexity-like metrics). The non-dominated sorting is moocore's (a maintained C library), not ours.

Genome-agnostic: it sees per-task scores and goals only. For the optimizer (CMA-ES, which needs a
total order) a generation's candidates are ranked by Pareto front (moocore.pareto_rank; front 1
first), ties inside a front broken by the weighted fitness (the genome's task weights: the chosen
trade-off), failures last; with multi-fidelity, full-fidelity candidates rank above rung-0 ones.
The search's "best" (best_config.yaml) stays the chosen trade-off: the front member with the
highest weighted fitness. Every front member gets a config file of its own (evolve.report).
"""
from __future__ import annotations

from typing import Optional

MAXIMIZE, MINIMIZE = "maximize", "minimize"


def oriented(scores: dict[str, float], goals: dict[str, str]) -> list[float]:
    """The objective vector, every component to be maximised."""
    return [(-scores[t] if goals[t] == MINIMIZE else scores[t]) for t in goals]


def front(records: list[dict], goals: dict[str, str]) -> list[dict]:
    """The non-dominated full-fidelity successes of `records` (one per distinct score vector),
    best weighted fitness first."""
    import moocore
    import numpy as np

    ok = [r for r in records if r.get("fitness") is not None and r.get("full", True)
          and all(isinstance((r.get("scores") or {}).get(t), (int, float)) for t in goals)]
    if not ok:
        return []
    ok.sort(key=lambda r: -r["fitness"])
    points = np.array([oriented(r["scores"], goals) for r in ok], dtype=float)
    keep = moocore.is_nondominated(points, maximise=True, keep_weakly=False)
    return [r for r, k in zip(ok, keep) if k]


def optimizer_values(entries: list[dict], goals: dict[str, str]) -> list[float]:
    """Values for a minimizing optimizer, one per candidate of a generation:
    `{"scores": {...}, "fitness": float|None, "full": bool}` each. Lower is better."""
    import moocore
    import numpy as np

    keys: list[Optional[tuple]] = [None] * len(entries)
    for group in (True, False):
        idx = [i for i, e in enumerate(entries)
               if e.get("fitness") is not None and bool(e.get("full", True)) is group]
        if not idx:
            continue
        points = np.array([oriented(entries[i]["scores"], goals) for i in idx], dtype=float)
        ranks = moocore.pareto_rank(points, maximise=True)
        for i, rank in zip(idx, ranks):
            keys[i] = (0 if group else 1, int(rank), -entries[i]["fitness"])
    keys = [k if k is not None else (2, 0, 0.0) for k in keys]
    order = {k: float(n) for n, k in enumerate(sorted(set(keys)))}
    return [order[k] for k in keys]
