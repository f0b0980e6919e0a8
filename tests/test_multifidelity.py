"""Multi-fidelity fitness (evolve.fidelity): rung 0 on a shared item subset per generation, the
promising candidates on the rest, scores combined exactly, ranks for CMA-ES, resume. A plain-Python
item-level fitness with the real `cma` first, then the real stack (Ray, lm-eval) once."""
from __future__ import annotations

import json
import random

import pytest

from evolve.fidelity import FidelityPlan, make_plan, optimizer_values
from evolve.search import Search, SearchOptions
from evolve.storage import RunStore

N_ITEMS = 64
TARGET = 0.8


def item_score(config: dict, item: int) -> float:
    """Accuracy-like: an item is 'solved' when the candidate is close enough to the target, with a
    per-item difficulty, so subsets give noisy but unbiased estimates of the full score."""
    ws = [src["parameters"]["weight"] for s in config["slices"] for src in s["sources"]
          if "parameters" in src]
    quality = 1 - sum(abs(w - TARGET) for w in ws) / len(ws)
    difficulty = random.Random(item).random()
    return 1.0 if quality > difficulty else 0.0


def full_score(config: dict) -> float:
    return sum(item_score(config, i) for i in range(N_ITEMS)) / N_ITEMS


def evaluator(seen: list, stop_after: int = 0):
    def evaluate(jobs, should_stop):
        for key, config, *rest in jobs:
            samples = rest[0] if rest else {"t": list(range(N_ITEMS))}
            seen.append((key, samples["t"]))
            if stop_after and len(seen) > stop_after:
                raise KeyboardInterrupt
            items = samples["t"]
            yield key, {"scores": {"t": sum(item_score(config, i) for i in items) / len(items)},
                        "seconds": 0.01}
    return evaluate


def make(space, root, plan, max_fevals=32, popsize=8):
    opts = SearchOptions(max_fevals=max_fevals, popsize=popsize, sigma0=0.3, seed=5,
                         fidelity=plan)
    return Search(space, RunStore(root), opts, fitness=lambda s: s["t"], log=lambda m: None)


def plan() -> FidelityPlan:
    return FidelityPlan(full={"t": list(range(N_ITEMS))}, seed=5)


def test_rungs_share_items_combine_exactly_and_record_what_they_used(space, tmp_path):
    seen: list = []
    search = make(space, tmp_path, plan())
    outcome = search.run(evaluator(seen))
    assert outcome.fevals == 32 and outcome.generations == 4
    for g in range(4):
        rec = [r for r in search.history if r["generation"] == g]
        rung0 = [r for r in rec if r["rung"] == 0]
        rung1 = [r for r in rec if r["rung"] == 1]
        assert len(rung0) == 8 and len(rung1) == 1
        low = {tuple(items) for key, items in seen[g * 9:g * 9 + 8]}
        assert len(low) == 1 and len(next(iter(low))) == 8     # one subset per generation
        rest = seen[g * 9 + 8][1]
        assert sorted(rest + list(next(iter(low)))) == list(range(N_ITEMS))
        assert all(r["items"] == {"count": 8, "of": 64, "scored": 8, "subset": f"seed5/g{g}",
                                  "rung": 0} and r["full"] is False for r in rung0)
        top = max(rung0, key=lambda r: (r["fitness"], -r["index"]))
        assert rung1[0]["index"] == top["index"] and rung1[0]["full"] is True
        assert rung1[0]["items"]["count"] == 64 and rung1[0]["items"]["scored"] == 56
        assert rung1[0]["fitness"] == pytest.approx(full_score(rung1[0]["config"]))
    subsets = {tuple(items) for _, items in seen[0:8]} | {tuple(items) for _, items in seen[9:17]}
    assert len(subsets) == 2                                   # a new subset every generation
    assert outcome.best["full"] and outcome.best["rung"] == 1
    scored = sum(len(items) for _, items in seen)
    assert scored == 4 * (8 * 8 + 56) and scored <= 0.25 * 32 * N_ITEMS
    assert scored == sum(r["items"]["scored"] for r in search.history)
    lines = (tmp_path / "history.jsonl").read_text().splitlines()
    assert len(lines) == 36 and all(json.loads(line)["items"] for line in lines)


def test_multi_fidelity_search_improves_and_resumes_mid_rung(space, tmp_path):
    seen: list = []
    straight = make(space, tmp_path / "a", plan(), max_fevals=48)
    straight.run(evaluator(seen))
    assert straight.stats[-1]["best_so_far"] > straight.stats[0]["mean"]
    for stop in (8, 12):    # killed just as rung 1 of generation 0 starts, then mid generation 1
        with pytest.raises(KeyboardInterrupt):
            make(space, tmp_path / "b", plan(), max_fevals=48).run(evaluator([], stop_after=stop))
    resumed = make(space, tmp_path / "b", plan(), max_fevals=48)
    resumed.run(evaluator([]))
    key = lambda r: (r["generation"], r["index"], r["rung"])  # noqa: E731
    assert sorted(map(key, resumed.history)) == sorted(map(key, straight.history))
    by_key = {key(r): r for r in resumed.history}
    assert all(by_key[key(r)]["genome"] == r["genome"] and by_key[key(r)]["fitness"] == r["fitness"]
               for r in straight.history)                       # the same search, bit for bit


def test_optimizer_values_rank_full_above_low_above_failures():
    entries = [{"fitness": 0.5, "full": False}, {"fitness": 0.9, "full": True},
               {"fitness": None, "full": False}, {"fitness": 0.7, "full": False},
               {"fitness": 0.4, "full": True}, {"fitness": 0.7, "full": False}]
    assert optimizer_values(entries) == [3.0, 0.0, 4.0, 2.0, 1.0, 2.0]


def test_make_plan_on_real_lm_eval_tasks(toy_task_dir, tmp_path):
    from evolve import tasks as task_lib

    include = task_lib.mirror_search_paths([toy_task_dir], tmp_path / "tasks")
    loaded = task_lib.load_tasks(task_lib.task_manager(include, ["evo_toy"]), ["evo_toy"], 0)
    args = dict(loaded=loaded, task_names=["evo_toy"], metrics={"evo_toy": "acc,none"},
                shuffle=False, seed=1)
    on = make_plan("multi", limit=None, popsize=8, **args)      # 40 items: 8 first, then 32
    assert on.multi and on.full["evo_toy"] == list(range(40)) and on.low_count("evo_toy") == 8
    assert "multi-fidelity: each generation first on 8 items per task" in on.notes[0]
    small = make_plan("auto", limit=None, popsize=16, **args)   # 40 < 128 items: not by default
    assert not small.multi and "'evo_toy' has 40 items" in small.notes[0]
    off = make_plan("auto", limit=16, popsize=16, **args)       # 8 of 16 would not pay
    assert not off.multi and "full fitness" in off.notes[0]
    few = make_plan("auto", limit=None, popsize=8, **args)      # 8 candidates rank poorly
    assert not few.multi and "a generation of 8 is too small" in few.notes[0]
    assert make_plan("multi", limit=16, popsize=8, **args).multi   # asked for: it is on
    assert make_plan("multi", limit=None, popsize=4, **args).multi
    big = FidelityPlan(full={"evo_toy": list(range(200))}, seed=1)
    assert big.low_count("evo_toy") == 25 and big.share(8) < 0.25
    shuffled = make_plan("auto", limit=32, popsize=16, **{**args, "shuffle": True})
    assert shuffled.full == task_lib.sample_indices(loaded, 32, 1)
    assert set(shuffled.low_items(3)["evo_toy"]) <= set(shuffled.full["evo_toy"])
    assert not make_plan("full", limit=None, popsize=8, **args).multi


def test_the_real_stack_multi_fidelity_and_pareto(
        ray_session, family, toy_task_dir, tmp_path, make_genome, capsys):
    """One CLI run on Ray + lm-eval: `--fidelity multi` (40 items: rung 0 on 8, the promoted
    candidate on the other 32, its score exactly the full-fitness score) with `--objective
    pareto` and a task whose goal is `minimize` (so the fitness is −score and the front is the
    lowest score)."""
    from evolve.cli import main
    from evolve.fitness import EvalSettings, Scorer
    from evolve import tasks as task_lib
    from merge.config import MergeConfig
    from merge.engine import InMemoryMerger
    from transformers import AutoTokenizer

    genome = {"models": [str(family["c0"]), str(family["c1"])], "merge_method": "task_arithmetic",
              "base_model": str(family["base"]), "layer_granularity": 0}
    path = make_genome(tmp_path / "g.yaml", genome,
                       tasks=[{"name": "evo_toy", "metric": "acc,none", "goal": "minimize"}])
    storage = tmp_path / "run"
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in [path, "--storage-path", storage, "--task-search-path",
                               toy_task_dir, "--workers", 1, "--popsize", 4, "--max-fevals", 4,
                               "--no-wandb", "--no-merge-best", "--fidelity", "multi",
                               "--objective", "pareto"]])
    err = capsys.readouterr().err
    assert e.value.code == 0, err
    assert "multi-fidelity: each generation first on 8 items per task" in err
    records = [json.loads(line) for line in (storage / "history.jsonl").read_text().splitlines()]
    assert [r["rung"] for r in records] == [0, 0, 0, 0, 1]
    assert all(r["fitness"] == -r["scores"]["evo_toy"] for r in records)     # minimized
    promoted = records[-1]
    assert promoted["items"]["count"] == 40 and records[0]["items"]["count"] == 8
    assert promoted["index"] == max(records[:4], key=lambda r: (r["fitness"], -r["index"]))["index"]
    include = task_lib.mirror_search_paths([toy_task_dir], tmp_path / "tasks2")
    model = InMemoryMerger().build_model(MergeConfig.from_dict(promoted["config"]))
    settings = EvalSettings(task_names=["evo_toy"], metrics={"evo_toy": "acc,none"},
                            include_dir=str(include), seed=42)
    direct = Scorer(model, AutoTokenizer.from_pretrained(family["base"]), settings).score()
    assert promoted["scores"]["evo_toy"] == pytest.approx(direct["evo_toy"])
    meta = json.loads((storage / "run.json").read_text())["search"]
    assert meta["fidelity"] == "multi" and meta["objective"] == "pareto"
    # the front: only full-fidelity scores count, here the one promoted candidate
    summary = json.loads((storage / "pareto" / "front.json").read_text())
    assert summary["goals"] == {"evo_toy": "minimize"}
    assert [(m["generation"], m["index"]) for m in summary["front"]] == [(0, promoted["index"])]
    assert (storage / "pareto" / "front-01.yaml").is_file()
    assert "Pareto front" in (storage / "report.html").read_text()
    # a readable console: lm-eval's per-model warning is in the worker's log, not on the terminal
    worker_logs = list((storage / "logs").glob("worker-*.log"))
    assert worker_logs and "kwarg is not of type" in worker_logs[0].read_text()
    assert "kwarg is not of type" not in err and (storage / "logs" / "driver.log").is_file()
