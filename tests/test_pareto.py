"""Multi-objective search (evolve.pareto, moocore's non-dominated sorting): per-task goals, ranks
for CMA-ES, the front over the history, a config per member, the report; and the CLI once."""
from __future__ import annotations

import json

import pytest
import yaml

from evolve.genome import GenomeSpace, parse_evolve_config
from evolve.pareto import front, optimizer_values
from evolve.report import render_png, write_front
from evolve.search import Search, SearchOptions
from evolve.storage import RunStore

GOALS = {"acc": "maximize", "ppl": "minimize"}


def rec(i, acc, ppl, fitness=None, full=True):
    return {"generation": 0, "index": i, "scores": {"acc": acc, "ppl": ppl},
            "fitness": acc - ppl if fitness is None else fitness, "full": full,
            "config": {"merge_method": "linear", "models": [{"model": f"m{i}"}]}}


def test_the_front_respects_each_goal():
    records = [rec(0, 0.9, 5.0), rec(1, 0.7, 2.0), rec(2, 0.6, 3.0),    # 2 is dominated by 1
               rec(3, 0.9, 5.0),                                          # a duplicate of 0
               rec(4, 0.95, 9.0), rec(5, 0.99, 1.0, full=False),         # 5: a rung-0 score
               {**rec(6, 0.1, 0.1), "fitness": None}]                     # failed
    got = sorted(r["index"] for r in front(records, GOALS))
    assert got == [0, 1, 4]
    flipped = sorted(r["index"] for r in front(records, {"acc": "maximize", "ppl": "maximize"}))
    assert flipped == [4]       # higher ppl better: 4 dominates every other full success


def test_optimizer_values_rank_by_front_then_weighted_fitness():
    entries = [{"scores": {"acc": 0.9, "ppl": 5.0}, "fitness": 0.1},   # front 1
               {"scores": {"acc": 0.7, "ppl": 2.0}, "fitness": 0.5},   # front 1, better weighted
               {"scores": {"acc": 0.6, "ppl": 3.0}, "fitness": 0.9},   # front 2 despite fitness
               {"scores": None, "fitness": None}]                      # failed
    assert optimizer_values(entries, GOALS) == [1.0, 0.0, 2.0, 3.0]


@pytest.fixture(scope="module")
def space(family):
    genome = {"models": [str(family["c0"]), str(family["c1"])], "merge_method": "linear"}
    return GenomeSpace.build(parse_evolve_config({"genome": genome,
                                                  "tasks": [{"name": "t"}]}).genome)


def test_a_pareto_search_spreads_along_the_trade_off_and_writes_every_member(space, tmp_path):
    """Two conflicting objectives over the weight of c0: `near` wants it 0.2, `far` wants it 0.8
    (as a loss, minimised). The front spans the trade-off; every member gets a config file."""
    goals = {"near": "maximize", "far": "minimize"}

    def evaluate(jobs, should_stop):
        for key, config, *rest in jobs:
            w = config["models"][0]["parameters"]["weight"]
            yield key, {"scores": {"near": -(w - 0.2) ** 2, "far": (w - 0.8) ** 2}}

    opts = SearchOptions(max_fevals=40, popsize=8, sigma0=0.3, seed=3, goals=goals)
    search = Search(space, RunStore(tmp_path), opts,
                    fitness=lambda s: s["near"] - s["far"], log=lambda m: None)
    search.run(evaluate)
    members = write_front(RunStore(tmp_path), search.history, goals, 7)
    assert len(members) >= 3
    weights = [m["config"]["models"][0]["parameters"]["weight"] for m in members]
    assert max(weights) - min(weights) > 0.1       # spread along the trade-off
    files = sorted(p.name for p in (tmp_path / "pareto").glob("front-*.yaml"))
    assert files == [f"front-{n:02d}.yaml" for n in range(1, len(members) + 1)]
    first = (tmp_path / "pareto" / "front-01.yaml").read_text()
    assert first.startswith("# Pareto front member 1 of") and "(minimize)" in first
    assert yaml.safe_load(first) == members[0]["config"]
    assert members[0]["fitness"] == search.best()["fitness"]     # best_config = chosen trade-off
    summary = json.loads((tmp_path / "pareto" / "front.json").read_text())
    assert summary["goals"] == goals and len(summary["front"]) == len(members)
    png = render_png(RunStore(tmp_path), space, search.history, search.stats, goals)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"

# The CLI's --objective pareto and tasks[].goal run for real in
# tests/test_multifidelity.py::test_the_real_stack_multi_fidelity_and_pareto (one shared run).
