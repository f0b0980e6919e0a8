"""Tasks and fitness: local JSONL tasks found from anywhere, metrics checked up front, scores from a
live model (real lm-eval, offline)."""
from __future__ import annotations

import pytest

from evolve import tasks as task_lib
from evolve.fitness import EvalSettings, Scorer, extract_score, weighted_fitness
from evolve.genome import TaskSpec
from merge.errors import ConfigError, EvomergeError


@pytest.fixture(scope="module")
def include_dir(toy_task_dir, tmp_path_factory):
    return task_lib.mirror_search_paths([toy_task_dir], tmp_path_factory.mktemp("mirror"))


def test_relative_data_files_are_resolved_against_the_yaml(toy_task_dir, include_dir):
    import yaml

    rewritten = yaml.safe_load((include_dir / "0" / "evo_toy" / "evo_toy.yaml").read_text())
    assert rewritten["dataset_kwargs"]["data_files"]["test"] == str(
        (toy_task_dir / "evo_toy" / "data" / "evo_toy.jsonl").resolve())
    # data and helpers are linked, not copied
    assert (include_dir / "0" / "evo_toy" / "data" / "evo_toy.jsonl").is_symlink()


def test_function_tags_survive_the_rewrite(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "t.yaml").write_text("task: t\nprocess_docs: !function utils.process\n"
                                "dataset_kwargs: {data_files: {test: d.jsonl}}\n")
    (src / "d.jsonl").write_text("{}\n")
    out = task_lib.mirror_search_paths([src], tmp_path / "out")
    text = (out / "0" / "t.yaml").read_text()
    assert str((src / "d.jsonl").resolve()) in text
    from lm_eval.tasks._yaml_loader import load_yaml

    loaded = load_yaml(out / "0" / "t.yaml", resolve_func=False)
    assert loaded["process_docs"] == str(out / "0" / "utils.process")


def test_task_loads_from_another_directory(include_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # lm-eval alone would look for data/evo_toy.jsonl here
    tm = task_lib.task_manager(include_dir, ["evo_toy"])
    loaded = task_lib.load_tasks(tm, ["evo_toy"], num_fewshot=None)
    assert task_lib.doc_count(loaded["tasks"]["evo_toy"]) == 40
    assert task_lib.task_metrics(loaded["tasks"]["evo_toy"]) == {"acc,none", "acc_norm,none"}
    task_lib.check_metrics(loaded, [TaskSpec(name="evo_toy", metric="acc_norm,none")])
    with pytest.raises(ConfigError, match=r"tasks\[0\].metric: .*reports acc,none, acc_norm,none"):
        task_lib.check_metrics(loaded, [TaskSpec(name="evo_toy", metric="exact_match,none")])


def test_groups_are_scored_by_their_aggregate(tmp_path):
    """The repository's demo group (eval_tasks/demo_fit.yaml) and a group without aggregation."""
    import shutil
    from pathlib import Path

    repo_tasks = Path(task_lib.__file__).resolve().parent.parent / "eval_tasks"
    if not (repo_tasks / "demo_fit.yaml").exists():
        pytest.skip("eval_tasks/ has no demo tasks")
    src = tmp_path / "tasks"
    shutil.copytree(repo_tasks, src)
    (src / "noagg.yaml").write_text("group: noagg\ntask:\n  - demo_cipher_fit\n")
    include = task_lib.mirror_search_paths([src], tmp_path / "mirror")
    tm = task_lib.task_manager(include, ["demo_fit"])
    loaded = task_lib.load_tasks(tm, ["demo_fit"], num_fewshot=None)
    task_lib.check_metrics(loaded, [TaskSpec(name="demo_fit", metric="acc,none")])
    with pytest.raises(ConfigError, match=r"tasks\[0\].metric: 'demo_fit' reports acc,none"):
        task_lib.check_metrics(loaded, [TaskSpec(name="demo_fit", metric="acc_norm,none")])
    tm = task_lib.task_manager(include, ["noagg"])
    loaded = task_lib.load_tasks(tm, ["noagg"], num_fewshot=None)
    with pytest.raises(ConfigError, match="no aggregate_metric_list"):
        task_lib.check_metrics(loaded, [TaskSpec(name="noagg")])


def test_unknown_task_is_named_with_suggestions(include_dir):
    with pytest.raises(ConfigError, match=r"tasks\[1\].name: unknown lm-eval task 'evo_toyy'; "
                                          r"did you mean evo_toy"):
        task_lib.task_manager(include_dir, ["evo_toy", "evo_toyy"])
    assert "hellaswag" in task_lib.builtin_task_names()   # built-in names are known too


def test_scorer_on_a_live_model_sees_in_place_weight_changes(family, include_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(family["c0"]).eval()
    tok = AutoTokenizer.from_pretrained(family["c0"])
    settings = EvalSettings(task_names=["evo_toy"], metrics={"evo_toy": "acc_norm,none"},
                            include_dir=str(include_dir), limit=12, batch_size=8)
    scorer = Scorer(model, tok, settings)
    first = scorer.score()
    assert set(first) == {"evo_toy"} and 0.0 <= first["evo_toy"] <= 1.0
    assert scorer.score() == first          # no hidden state between calls
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-3.0)
    again = [scorer.score()["evo_toy"] for _ in range(2)]
    assert again[0] == again[1]


def test_shuffle_picks_a_fixed_subset(include_dir):
    tm = task_lib.task_manager(include_dir, ["evo_toy"])
    loaded = task_lib.load_tasks(tm, ["evo_toy"], num_fewshot=0)
    a = task_lib.sample_indices(loaded, 10, seed=1)
    assert a == task_lib.sample_indices(loaded, 10, seed=1)
    assert len(a["evo_toy"]) == 10 and a["evo_toy"] != list(range(10))
    assert len(task_lib.sample_indices(loaded, 0.5, seed=1)["evo_toy"]) == 20


def test_weighted_fitness_and_score_extraction():
    assert weighted_fitness({"a": 0.5, "b": 0.25}, {"a": 2.0, "b": -1.0}) == 0.75
    results = {"results": {"a": {"acc,none": 0.5, "acc_stderr,none": "N/A"}},
               "groups": {"g": {"acc,none": 0.25}}}
    assert extract_score(results, "a", "acc,none") == 0.5
    assert extract_score(results, "g", "acc,none") == 0.25
    with pytest.raises(EvomergeError, match="reports acc,none"):
        extract_score(results, "a", "f1,none")
    with pytest.raises(EvomergeError, match="NaN"):
        extract_score({"results": {"a": {"acc,none": float("nan")}}}, "a", "acc,none")
