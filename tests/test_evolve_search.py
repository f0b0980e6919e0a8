"""CMA-ES loop, checkpoints and resume, with a plain-Python fitness (real `cma`, no Ray/lm-eval).

The evaluator here is the search's own interface (a function from candidates to results), so these
tests pin down the optimizer bookkeeping quickly; tests/test_evolve_run.py runs the real stack."""
from __future__ import annotations

import json
import math

import pytest

from evolve.genome import GenomeSpace, parse_evolve_config
from evolve.search import Search, SearchOptions, default_popsize, objective_values
from evolve.storage import RunStore
from merge.errors import EvomergeError


TARGET = 0.8


def fitness_of(config: dict) -> float:
    """Best when every weight is 0.8: CMA-ES should move toward it."""
    ws = [src["parameters"]["weight"] for s in config["slices"] for src in s["sources"]
          if "parameters" in src]
    return -sum((w - TARGET) ** 2 for w in ws)


def evaluator(fail_every: int = 0, nan_every: int = 0, stop_after: int = 0, calls=None):
    calls = calls if calls is not None else []

    def evaluate(jobs, should_stop):
        for key, config in jobs:
            calls.append(key)
            if stop_after and len(calls) > stop_after:
                raise KeyboardInterrupt   # the driver dies mid-generation
            n = len(calls)
            if fail_every and n % fail_every == 0:
                yield key, {"error": "RuntimeError: boom", "seconds": 0.0}
            elif nan_every and n % nan_every == 0:
                yield key, {"scores": {"t": float("nan")}, "seconds": 0.0}
            else:
                yield key, {"scores": {"t": fitness_of(config)}, "seconds": 0.01, "worker": "w"}
    return evaluate


def make(space, root, **kw) -> Search:
    opts = SearchOptions(max_fevals=kw.pop("max_fevals", 24), popsize=kw.pop("popsize", 6),
                         sigma0=0.3, seed=kw.pop("seed", 5))
    return Search(space, RunStore(root), opts, fitness=lambda s: s["t"], log=lambda m: None)


def keys(history):
    return [(r["generation"], r["index"]) for r in history]


def test_search_improves_respects_bounds_and_stops_at_max_fevals(space, tmp_path):
    search = make(space, tmp_path, max_fevals=40, popsize=8)
    gens = []
    outcome = search.run(evaluator(), on_generation=gens.append)
    assert outcome.fevals == 40 and outcome.reason == "max-fevals"
    assert [s["generation"] for s in gens] == [0, 1, 2, 3, 4]
    lines = (tmp_path / "history.jsonl").read_text().splitlines()
    assert len(lines) == 40 and len(set(keys(search.history))) == 40
    for r in search.history:
        assert all(lo <= v <= hi for v, lo, hi in zip(r["genome"], space.lower, space.upper))
        assert r["config"] == space.decode(r["genome"])
        assert set(r) >= {"generation", "genome", "config", "scores", "fitness", "seconds"}
    assert gens[-1]["best_so_far"] > gens[0]["mean"]
    assert outcome.best["fitness"] == max(r["fitness"] for r in search.history)


def test_max_fevals_cuts_the_last_generation_and_resume_continues_it(space, tmp_path):
    first = make(space, tmp_path, max_fevals=9, popsize=6)
    assert first.run(evaluator()).fevals == 9
    second = make(space, tmp_path, max_fevals=18, popsize=6)
    assert second.generation == 1 and second.state["asked"] is not None
    calls = []
    assert second.run(evaluator(calls=calls)).fevals == 18
    assert calls[:3] == [3, 4, 5]                     # only the missing ones of generation 1
    assert sorted(keys(second.history)) == [(g, i) for g in range(3) for i in range(6)]


def test_failed_and_nan_evaluations_are_recorded_and_penalised(space, tmp_path):
    search = make(space, tmp_path, max_fevals=18, popsize=6)
    search.run(evaluator(fail_every=4, nan_every=5))
    failed = [r for r in search.history if r["fitness"] is None]
    assert len(failed) == 7
    assert {r["error"] for r in failed} == {"RuntimeError: boom", "task 't' scored nan"}
    json.loads((tmp_path / "history.jsonl").read_text().splitlines()[4])   # valid JSON, no NaN
    values = objective_values(search.history)
    worst_ok = max(v for v, r in zip(values, search.history) if r["fitness"] is not None)
    assert all(v > worst_ok for v, r in zip(values, search.history) if r["fitness"] is None)


def test_a_generation_that_fails_entirely_stops_with_a_clear_error(space, tmp_path):
    search = make(space, tmp_path, max_fevals=12, popsize=4)
    with pytest.raises(EvomergeError, match="every candidate of generation 0 failed"):
        search.run(evaluator(fail_every=1))


def test_interrupted_run_resumes_to_the_same_result_as_an_uninterrupted_one(space, tmp_path):
    straight = make(space, tmp_path / "a", max_fevals=30, popsize=6)
    straight.run(evaluator())
    for stop in (8, 13):   # dies twice, mid-generation
        run = make(space, tmp_path / "b", max_fevals=30, popsize=6)
        with pytest.raises(KeyboardInterrupt):
            run.run(evaluator(stop_after=stop))
    resumed = make(space, tmp_path / "b", max_fevals=30, popsize=6)
    calls = []
    resumed.run(evaluator(calls=calls))
    assert len(calls) == 30 - 8 - 13
    by_key = {(r["generation"], r["index"]): r for r in resumed.history}
    assert len(by_key) == len(resumed.history) == 30          # every evaluation exactly once
    for r in straight.history:                               # and bit-identical candidates
        assert by_key[(r["generation"], r["index"])]["genome"] == r["genome"]
    assert resumed.es.sigma == straight.es.sigma


def test_a_torn_history_line_is_cut_and_re_evaluated(space, tmp_path):
    run = make(space, tmp_path, max_fevals=6, popsize=6)
    with pytest.raises(KeyboardInterrupt):
        run.run(evaluator(stop_after=3))
    with open(tmp_path / "history.jsonl", "a") as f:
        f.write('{"generation": 0, "index": 3, "genome": [0.1')   # killed mid-write
    calls = []
    make(space, tmp_path, max_fevals=6, popsize=6).run(evaluator(calls=calls))
    assert calls == [3, 4, 5]
    assert len((tmp_path / "history.jsonl").read_text().splitlines()) == 6


def test_storage_identity_checks(tmp_path):
    store = RunStore(tmp_path / "run")
    assert store.prepare({"g": 1}, resume=False) is False
    store.write_run({"identity": {"g": 1}, "started": "then"})
    # a run that never reached its first checkpoint (a start that failed or was killed) does
    # not block the next start
    assert store.prepare({"g": 2}, resume=False) is False and not store.run_json.exists()
    store.write_run({"identity": {"g": 1}, "started": "then"})
    store.save_checkpoint({"generation": 0})
    with pytest.raises(EvomergeError, match="already holds a run.*--resume"):
        store.prepare({"g": 1}, resume=False)
    with pytest.raises(EvomergeError, match=r"different genome \(g differs\)"):
        store.prepare({"g": 2}, resume=True)
    assert store.prepare({"g": 1}, resume=True) is True
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(EvomergeError, match="not empty"):
        RunStore(tmp_path / "other").prepare({"g": 1}, resume=False)


def test_one_gene_spaces_work(family, tmp_path):
    genome = {"models": [str(family["c0"])], "merge_method": "slerp",
              "base_model": str(family["base"])}
    space = GenomeSpace.build(parse_evolve_config({"genome": genome,
                                                   "tasks": [{"name": "t"}]}).genome)
    assert space.dim == 1
    search = Search(space, RunStore(tmp_path), SearchOptions(max_fevals=12, popsize=4),
                    fitness=lambda s: s["t"], log=lambda m: None)

    def evaluate(jobs, should_stop):
        for key, config in jobs:
            yield key, {"scores": {"t": -abs(config["parameters"]["t"] - 0.3)}}
    assert search.run(evaluate).fevals == 12


def test_default_popsize_is_a_multiple_of_the_workers():
    assert default_popsize(24, 1) == 4 + int(3 * math.log(24))
    assert default_popsize(24, 4) % 4 == 0 and default_popsize(24, 4) >= default_popsize(24, 1)


def test_timeout_stops_starting_evaluations_and_the_run_resumes(space, tmp_path):
    import time

    def slow(jobs, should_stop):
        for key, config in jobs:
            if should_stop():          # what the worker pool does: start nothing new
                return
            time.sleep(0.05)
            yield key, {"scores": {"t": fitness_of(config)}, "seconds": 0.05}

    opts = SearchOptions(max_fevals=24, popsize=6, sigma0=0.3, seed=5, timeout=0.4)
    search = Search(space, RunStore(tmp_path), opts, fitness=lambda s: s["t"], log=lambda m: None)
    outcome = search.run(slow)
    assert outcome.reason == "timeout" and 0 < outcome.fevals < 24
    resumed = make(space, tmp_path, max_fevals=24, popsize=6)
    assert resumed.run(evaluator()).fevals == 24
    assert len({(r["generation"], r["index"]) for r in resumed.history}) == 24
