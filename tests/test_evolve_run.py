"""The whole `mergekit-evolve` stack, for real: local Ray with 2 workers, lm-eval on a JSONL task,
tiny models merged in memory, W&B offline. One Ray session is shared by the in-process runs."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from evolve.cli import main

REPO = Path(__file__).resolve().parent.parent


def genome(family, **kw) -> dict:
    g = {"models": [str(family["c0"]), str(family["c1"])], "merge_method": "task_arithmetic",
         "base_model": str(family["base"]), "layer_granularity": 2, "filters": ["mlp"]}
    g.update(kw)
    return g


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()   # only what this invocation prints
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_search_runs_to_completion_and_writes_every_output(
        ray_session, family, toy_task_dir, tmp_path, make_genome, offline_wandb, capsys):
    from merge.config import load_config
    from tinymodels import load_state

    path = make_genome(tmp_path / "g.yaml", genome(family), limit=16)
    storage = tmp_path / "run"
    code, out, err = run_cli([path, "--storage-path", storage, "--task-search-path", toy_task_dir,
                              "--workers", 2, "--popsize", 4, "--max-fevals", 8, "--seed", 3,
                              "--wandb"], capsys)
    assert code == 0, err
    assert "stopped (max-fevals) after 8 evaluations, 2 generation(s)" in out

    history = [json.loads(line) for line in (storage / "history.jsonl").read_text().splitlines()]
    assert len(history) == 8
    assert sorted((r["generation"], r["index"]) for r in history) == [
        (g, i) for g in range(2) for i in range(4)]
    workers = {r["worker"] for r in history}
    assert len(workers) == 2                       # both workers were used
    for r in history:
        assert r["error"] is None and 0 <= r["scores"]["evo_toy"] <= 1
        assert r["fitness"] == r["scores"]["evo_toy"]
        assert len(r["genome"]) == 8          # 2 blocks × 2 filter groups × 2 models
        assert r["seconds"] > 0 and r["merge_seconds"] is not None
    best = max(history, key=lambda r: r["fitness"])

    best_cfg = load_config(storage / "best_config.yaml")
    assert best_cfg.to_dict() == load_config_dict(best["config"])
    assert best_cfg.base_model == str(family["base"])           # original references
    assert (storage / "checkpoint.pkl").stat().st_size > 0
    assert (storage / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (storage / "report.html").read_text()
    assert "mergekit-evolve report" in html and "data:image/png;base64" in html

    # the merged best model is exactly the evaluated candidate, and it loads
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(storage / "best_model")
    assert model.config.num_hidden_layers == 4
    import torch
    from merge.config import MergeConfig
    from merge.engine import InMemoryMerger, MergeOptions

    expected = InMemoryMerger(MergeOptions(random_seed=3)).merge_state(
        MergeConfig.from_dict(best["config"]))
    saved = load_state(storage / "best_model")
    assert all(torch.equal(saved[k], v) for k, v in expected.items())

    # W&B: one offline run with the logged metric names inside its binary log
    runs = list((storage / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    log = next(runs[0].glob("run-*.wandb")).read_bytes()
    for name in (b"fitness/best", b"fitness/mean", b"cma/sigma", b"best/evo_toy",
                 b"evaluations_table", b"best_config"):
        assert name in log, name

    # a second invocation on the same folder must not clobber it
    code, _, err = run_cli([path, "--storage-path", storage, "--task-search-path", toy_task_dir],
                           capsys)
    assert code == 2 and "already holds a run" in err and "--resume" in err

    # ... and --resume with a larger budget continues it
    code, out, err = run_cli([path, "--storage-path", storage, "--task-search-path", toy_task_dir,
                              "--workers", 2, "--max-fevals", 12, "--resume", "--no-wandb",
                              "--no-merge-best"], capsys)
    assert code == 0, err
    assert "8/12 evaluations done" in err
    assert len((storage / "history.jsonl").read_text().splitlines()) == 12


def load_config_dict(d: dict) -> dict:
    from merge.config import MergeConfig

    return MergeConfig.from_dict(d).to_dict()


def test_worker_killed_mid_evaluation_gets_its_candidate_retried(
        ray_session, family, toy_task_dir, tmp_path, make_genome, capsys, monkeypatch):
    marker = tmp_path / "died"
    monkeypatch.setenv("EVOMERGE_TEST_WORKER_EXIT_ONCE", str(marker))
    path = make_genome(tmp_path / "g.yaml", genome(family, layer_granularity=0), limit=8)
    storage = tmp_path / "run"
    code, out, err = run_cli([path, "--storage-path", storage, "--task-search-path", toy_task_dir,
                              "--workers", 2, "--popsize", 2, "--max-fevals", 4, "--no-wandb",
                              "--no-merge-best"], capsys)
    assert code == 0, err
    assert marker.exists()                                  # a worker really died
    assert "a worker died while evaluating candidate" in err
    history = [json.loads(line) for line in (storage / "history.jsonl").read_text().splitlines()]
    assert len(history) == 4 and all(r["fitness"] is not None for r in history)
    retried = [r for r in history if r["attempt"] == 2]
    assert len(retried) == 1
    assert len({(r["generation"], r["index"]) for r in history}) == 4


def test_cache_magnitudes_changes_speed_not_results(
        ray_session, family, toy_task_dir, tmp_path, make_genome, capsys):
    """`--cache-magnitudes`: workers look TIES thresholds up in kept magnitude orders; the search
    sees exactly the same candidates and scores as without."""
    path = make_genome(tmp_path / "g.yaml", genome(family, merge_method="ties"), limit=16)
    runs = []
    for flag in ([], ["--cache-magnitudes"]):
        storage = tmp_path / f"run{len(runs)}"
        code, out, err = run_cli([path, "--storage-path", storage, "--task-search-path",
                                  toy_task_dir, "--workers", 1, "--popsize", 2, "--max-fevals", 4,
                                  "--seed", 5, "--no-wandb", "--no-merge-best", "-q", *flag],
                                 capsys)
        assert code == 0, err
        history = [json.loads(line) for line in (storage / "history.jsonl").read_text().splitlines()]
        runs.append([(r["genome"], r["scores"], r["error"]) for r in history])
    assert len(runs[0]) == 4 and all(err is None for _, _, err in runs[0])
    assert runs[0] == runs[1]


@pytest.mark.parametrize("case", ["unknown_task", "no_evolvable_parameter", "granularity",
                                  "layer_counts", "unreachable_ray", "vllm", "too_many_gpus",
                                  "different_genome", "unknown_metric", "missing_storage"])
def test_bad_inputs_fail_in_one_line_before_any_worker_starts(
        ray_session, family, toy_task_dir, tmp_path, make_genome, capsys, case):
    import tinymodels

    g, tasks, args = genome(family), None, ["--workers", 2]
    expect = {
        "unknown_task": "tasks[0].name: unknown lm-eval task 'evo_toi'; did you mean evo_toy",
        "no_evolvable_parameter": "genome.merge_method: passthrough has no parameter",
        "granularity": "genome.layer_granularity: 3 does not divide the 4 layers",
        "layer_counts": "genome.models: the models have different layer counts",
        "unreachable_ray": "--ray-address: nothing answers at 127.0.0.1:1",
        "vllm": "--backend vllm: vLLM is not installed",
        # without CUDA the local run stops at --device; with one GPU, at Ray's resources
        "too_many_gpus": ("--workers: 2 worker(s) × 1 GPU need 2 GPU but this machine has"
                          if torch.cuda.is_available() else
                          "--device: cuda requested but this machine has no CUDA GPU"),
        "different_genome": "--resume: ",
        "unknown_metric": "tasks[0].metric: 'evo_toy' reports acc,none, acc_norm,none",
        "missing_storage": "--storage-path: required",
    }[case]
    storage = tmp_path / "run"
    if case == "unknown_task":
        tasks = [{"name": "evo_toi"}]
    elif case == "no_evolvable_parameter":
        g = {"models": [str(family["c0"])], "merge_method": "passthrough"}
    elif case == "granularity":
        g["layer_granularity"] = 3
    elif case == "layer_counts":
        g["models"].append(str(tinymodels.build_model(tmp_path / "deep", num_hidden_layers=6)))
    elif case == "unreachable_ray":
        args += ["--ray-address", "127.0.0.1:1"]
    elif case == "vllm":
        args += ["--backend", "vllm"]
    elif case == "too_many_gpus":
        args += ["--gpus-per-worker", 1, "--device", "cuda"]
    elif case == "different_genome":
        storage.mkdir()
        (storage / "run.json").write_text(json.dumps({"identity": {"evolve": {"other": 1}}}))
        args += ["--resume"]
    elif case == "unknown_metric":
        tasks = [{"name": "evo_toy", "metric": "f1,none"}]
    path = make_genome(tmp_path / "g.yaml", g, tasks=tasks)
    argv = [path, "--task-search-path", toy_task_dir, *args]
    if case != "missing_storage":
        argv += ["--storage-path", storage]
    t0 = time.monotonic()
    code, out, err = run_cli(argv, capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expect in lines[0]
    assert "Traceback" not in err
    assert time.monotonic() - t0 < 60
    if case not in ("different_genome",):
        assert not (storage / "run.json").exists() and not (storage / "history.jsonl").exists()


def test_usage_errors_are_one_line_too(capsys):
    code, _, err = run_cli(["--max-fevals", "0", "x.yaml"], capsys)
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
