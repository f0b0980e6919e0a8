"""W&B logging and sweeps: the payloads we build (pure functions), the command-line overrides a
sweep varies, the sweep definition itself, and real offline runs of a small search whose files
must hold the metrics, the tables and the best-config artifact."""
from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest
import yaml

from evolve import tracking
from evolve.cli import _hyphenate_long_options, cli, main
from evolve.genome import GenomeSpace, parse_evolve_config
from evolve.sweep import resolve_overrides, resolve_storage_path
from merge.errors import EvomergeError

REPO = Path(__file__).resolve().parent.parent
SWEEPS = sorted((REPO / "configs" / "sweeps").glob("*.yaml"))


def run_cli(args, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def genome(family, **kw) -> dict:
    g = {"models": [str(family["c0"]), str(family["c1"])], "merge_method": "task_arithmetic",
         "base_model": str(family["base"]), "layer_granularity": 2, "filters": ["mlp"]}
    g.update(kw)
    return g


def space_for(g: dict) -> GenomeSpace:
    cfg = parse_evolve_config({"genome": g, "tasks": [{"name": "t"}]})
    return GenomeSpace.build(cfg.genome, layer_count=lambda ref: 4)


# --- payload builders ---------------------------------------------------------------------------
STATS = {"generation": 3, "best": 0.5, "mean": 0.4, "worst": 0.25, "best_so_far": 0.625,
         "sigma": 0.21, "fevals": 16, "failed": 1, "seconds": 2.5}


def test_generation_metrics_name_every_chart_and_the_best_scores():
    best = {"fitness": 0.625, "scores": {"arith": 0.75, "copy": 0.5}}
    assert tracking.generation_metrics(STATS, best) == {
        "generation": 3, "fitness/best": 0.5, "fitness/mean": 0.4, "fitness/worst": 0.25,
        "fitness/best_so_far": 0.625, "cma/sigma": 0.21, "evaluations": 16, "failed": 1,
        "seconds": 2.5, "best/arith": 0.75, "best/copy": 0.5}
    assert "best/arith" not in tracking.generation_metrics(STATS, None)
    assert tracking.generation_metrics({**STATS, "items": 348}, None)["items"] == 348


def test_gene_names_are_readable_unique_and_in_genome_order():
    space = space_for(genome({"base": "org/base", "c0": "org/c0", "c1": "other/c1"}))
    names = tracking.gene_names(space)
    assert len(names) == space.dim == 8 and len(set(names)) == 8
    assert names[:4] == ["weight[c0, layers 0-1, mlp]", "weight[c1, layers 0-1, mlp]",
                         "weight[c0, layers 0-1, rest]", "weight[c1, layers 0-1, rest]"]
    assert names[-1] == "weight[c1, layers 2-3, rest]"
    # one block, no filters, a shared parameter: just the parameter's name
    slerp = space_for({"models": ["b/y"], "merge_method": "slerp", "base_model": "a/x"})
    assert tracking.gene_names(slerp) == ["t"]
    # models whose last path component is the same keep their full reference
    same = space_for({"models": ["a/model", "b/model"], "merge_method": "linear"})
    assert tracking.gene_names(same) == ["weight[a/model]", "weight[b/model]"]


def test_candidate_rows_line_up_with_the_columns():
    genes = ["weight[c0]", "weight[c1]"]
    records = [
        {"generation": 2, "index": 0, "genome": [0.25, 0.75], "fitness": 0.5,
         "scores": {"arith": 0.5}, "seconds": 1.25, "worker": "w0", "error": None},
        {"generation": 2, "index": 1, "genome": [0.5, 0.5], "fitness": None,
         "scores": None, "seconds": 0.5, "worker": None, "error": "merge failed"},
        {"generation": 2, "index": 2, "genome": [0.5, 0.5], "fitness": 0.25,
         "scores": {"arith": 0.25, "extra": 1}, "seconds": 1, "worker": 3, "error": None},
    ]
    tasks = tracking.task_names(records, ["arith"])
    assert tasks == ["arith", "extra"]
    columns = tracking.candidate_columns(genes, tasks)
    assert columns == ["generation", "index", "fitness", "arith", "extra", "weight[c0]",
                       "weight[c1]", "seconds", "worker", "error"]
    rows = tracking.candidate_rows(records, genes, tasks)
    assert all(len(row) == len(columns) for row in rows)
    assert dict(zip(columns, rows[0])) == {
        "generation": 2, "index": 0, "fitness": 0.5, "arith": 0.5, "extra": None,
        "weight[c0]": 0.25, "weight[c1]": 0.75, "seconds": 1.25, "worker": "w0", "error": None}
    assert rows[1][2:5] == [None, None, None] and rows[1][-1] == "merge failed"
    assert rows[2][4] == 1.0 and rows[2][-2] == "3"          # one type per column
    # a genome of the wrong length does not shift the other cells
    odd = tracking.candidate_rows([{**records[0], "genome": [1.0]}], genes, tasks)[0]
    assert odd[5:7] == [None, None] and odd[7] == 1.25


def test_final_summary_and_artifact_metadata():
    best = {"fitness": 0.75, "generation": 4, "index": 2, "scores": {"arith": 0.75}}
    assert tracking.final_summary(best, "max-fevals", 40) == {
        "outcome": "max-fevals", "evaluations": 40, "fitness/best_so_far": 0.75,
        "best/generation": 4, "best/index": 2, "best/arith": 0.75}
    assert tracking.final_summary(None, "timeout", 0) == {"outcome": "timeout", "evaluations": 0}
    assert tracking.best_metadata(best) == {"fitness": 0.75, "generation": 4, "index": 2,
                                            "scores": {"arith": 0.75}}
    assert tracking.artifact_name("abc123") == "best_config-abc123"


def test_init_kwargs_use_our_run_id_except_under_a_sweep_agent(tmp_path):
    own = tracking.init_kwargs(tmp_path / "evo1", "proj", "team", "abc", {"x": 1}, True, env={})
    assert own == {"dir": str(tmp_path / "evo1"), "config": {"x": 1}, "job_type": "evolve",
                   "project": "proj", "entity": "team", "id": "abc", "resume": "allow",
                   "name": "evo1"}
    assert tracking.init_kwargs(tmp_path, "p", None, "abc", {}, False, env={})["resume"] is None
    agent = tracking.init_kwargs(tmp_path, "proj", None, "abc", {"x": 1}, False,
                                 env={"WANDB_SWEEP_ID": "sw1", "WANDB_RUN_ID": "r1"})
    assert agent == {"dir": str(tmp_path), "config": {"x": 1}, "job_type": "evolve"}


# --- storage folders and overrides under sweeps -------------------------------------------------
def test_storage_path_gets_one_folder_per_sweep_run():
    agent = {"WANDB_SWEEP_ID": "sw1", "WANDB_RUN_ID": "run7"}
    assert resolve_storage_path("runs/s", False, env={}) == ("runs/s", None)
    path, why = resolve_storage_path("runs/s", False, env=agent)
    assert path == str(Path("runs/s") / "run7") and "sw1" in why
    assert resolve_storage_path("runs/{run_id}/evo", False, env=agent)[0] == "runs/run7/evo"
    fresh = resolve_storage_path("runs/{run_id}", False, env={})[0]
    assert fresh.startswith("runs/") and "{" not in fresh
    with pytest.raises(EvomergeError, match=r"--storage-path: \{run_id\} names a new folder"):
        resolve_storage_path("runs/{run_id}", True, env={})


def test_resume_reuses_recorded_overrides_and_refuses_other_values(tmp_path):
    run = {"identity": {"evolve": {"genome": {"layer_granularity": 2}, "limit": 8}},
           "overrides": {"limit": 8, "layer_granularity": 2}}
    (tmp_path / "run.json").write_text(json.dumps(run))
    nothing = {"limit": None, "layer_granularity": None}
    assert resolve_overrides(nothing, str(tmp_path), resume=True) == {"limit": 8,
                                                                      "layer_granularity": 2}
    assert resolve_overrides({"limit": 8}, str(tmp_path), resume=True)["limit"] == 8
    assert resolve_overrides({"limit": 5}, str(tmp_path), resume=False) == {"limit": 5}
    with pytest.raises(EvomergeError, match=r"^--limit: the run in .* was started with limit 8, "
                                            r"not 5; resume without --limit"):
        resolve_overrides({"limit": 5}, str(tmp_path), resume=True)
    with pytest.raises(EvomergeError, match=r"^--layer-granularity: .* layer_granularity 2, not 4"):
        resolve_overrides({"layer_granularity": 4}, str(tmp_path), resume=True)


def test_long_options_accept_the_underscore_spelling_of_sweep_parameters():
    assert _hyphenate_long_options(["g.yaml", "--layer_granularity=2", "--max_fevals", "9",
                                    "--storage-path=a_b", "-q", "--", "--x_y"]) == [
        "g.yaml", "--layer-granularity=2", "--max-fevals", "9", "--storage-path=a_b", "-q",
        "--", "--x_y"]


# --- the command-line overrides -----------------------------------------------------------------
def test_overrides_change_the_decoded_search_space(family, tmp_path, make_genome, capsys):
    path = make_genome(tmp_path / "g.yaml", genome(family), limit=16)
    code, out, _ = run_cli([path, "--dry-run"], capsys)
    assert code == 0 and "search space: 8 genes = 2 block(s)" in out and "slices:" in out
    code, out, _ = run_cli([path, "--dry-run", "--layer-granularity", 1], capsys)
    assert code == 0 and "search space: 16 genes = 4 block(s)" in out
    assert "layer_range: [3, 4]" in out
    code, out, _ = run_cli([path, "--dry-run", "--layer_granularity=0"], capsys)
    assert code == 0 and "search space: 4 genes = 1 block(s)" in out and "slices:" not in out


@pytest.mark.parametrize("args, expect", [
    (["--layer-granularity", "3"], "error: --layer-granularity: 3 does not divide the 4 layers"),
    (["--layer-granularity", "-1"], "error: --layer-granularity: Input should be greater than or "
                                    "equal to 0"),
    (["--layer-granularity", "two"], "error: Invalid value for '--layer-granularity'"),
    (["--limit", "0"], "error: --limit: Input should be greater than 0"),
    (["--limit", "many"], "error: Invalid value for '--limit': 'many' is not a number"),
])
def test_bad_override_values_fail_in_one_line(family, tmp_path, make_genome, capsys, args,
                                              expect):
    path = make_genome(tmp_path / "g.yaml", genome(family))
    code, out, err = run_cli([path, "--dry-run", *args], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith(expect), err


# --- the sweep definition -----------------------------------------------------------------------
def sweep_values(spec: dict) -> list:
    """Values a sweep parameter can take: its list, its single value, or its bounds."""
    if "values" in spec:
        return list(spec["values"])
    if "value" in spec:
        return [spec["value"]]
    return [spec["min"], spec["max"]]


@pytest.mark.parametrize("sweep_file", SWEEPS, ids=lambda p: p.name)
def test_sweep_definition_names_only_mergekit_evolve_options(
        sweep_file, family, tmp_path, make_genome, capsys):
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    sweep = yaml.safe_load(sweep_file.read_text())
    assert sweep["metric"] == {"name": tracking.SWEEP_METRIC, "goal": "maximize"}
    assert sweep["program"] == "mergekit-evolve"
    command = sweep["command"]
    assert command[:2] == ["${env}", "${program}"] and command[-1] == "${args}"
    genome_file = REPO / command[2]
    assert genome_file.is_file()
    assert set(sweep["parameters"]) >= {"sigma0", "popsize", "limit", "layer_granularity"}

    # The fixed arguments plus the agent's expansion of ${args} parse as mergekit-evolve options.
    first = {k: {"value": sweep_values(v)[0]} for k, v in sweep["parameters"].items()}
    expanded = create_sweep_command_args({"args": first})["args"]      # --name=value, as W&B does
    ctx = cli.make_context("mergekit-evolve", _hyphenate_long_options(command[2:-1] + expanded))
    for name in sweep["parameters"]:
        assert ctx.params[name] == first[name]["value"], name

    # Every value the sweep can choose is accepted by a dry run of a genome with 4 layers (the
    # demo family's layer count), so no agent run dies on its arguments.
    demo = yaml.safe_load(genome_file.read_text())
    g = genome(family, filters=demo["genome"].get("filters", []))
    path = make_genome(tmp_path / "g.yaml", g, limit=8)
    for name, spec in sweep["parameters"].items():
        for value in sweep_values(spec):
            args = create_sweep_command_args({"args": {name: {"value": value}}})["args"]
            code, out, err = run_cli([path, "--dry-run", *args], capsys)
            assert code == 0, (name, value, err)


# --- real offline runs --------------------------------------------------------------------------
def offline_run(storage: Path) -> Path:
    runs = list((storage / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    return runs[0]


def test_offline_run_holds_metrics_tables_and_best_config_artifact(
        ray_session, family, toy_task_dir, tmp_path, make_genome, offline_wandb, capsys):
    path = make_genome(tmp_path / "g.yaml", genome(family, layer_granularity=0), limit=40)
    storage = tmp_path / "run"
    code, out, err = run_cli([path, "--storage-path", storage, "--task-search-path", toy_task_dir,
                              "--workers", 2, "--popsize", 4, "--max-fevals", 12, "--seed", 5,
                              "--limit", 12, "--layer-granularity", 2, "--no-merge-best",
                              "--wandb"], capsys)
    assert code == 0, err
    meta = json.loads((storage / "run.json").read_text())
    assert meta["overrides"] == {"limit": 12, "layer_granularity": 2}
    assert meta["identity"]["evolve"]["limit"] == 12
    assert meta["search"]["dim"] == 8                  # 2 blocks × 2 filter groups × 2 models
    history = [json.loads(line) for line in (storage / "history.jsonl").read_text().splitlines()]
    assert len(history) == 12

    run_dir = offline_run(storage)
    assert run_dir.name.endswith(meta["wandb_id"])
    log = next(run_dir.glob("run-*.wandb")).read_bytes()
    for name in ("fitness/best", "fitness/mean", "fitness/worst", "fitness/best_so_far",
                 "cma/sigma", "best/evo_toy", tracking.CANDIDATES_TABLE,
                 tracking.EVALUATIONS_TABLE, "report", tracking.artifact_name(meta["wandb_id"]),
                 tracking.ARTIFACT_TYPE, "generation-0", "final", "outcome"):
        assert name.encode() in log, name

    # The tables W&B wrote beside the log: one per generation, and every evaluation at the end.
    tables = run_dir / "files" / "media" / "table"
    per_gen = sorted(tables.glob(f"{tracking.CANDIDATES_TABLE}_*.table.json"))
    assert len(per_gen) == 3
    genes = [f"weight[c{m}, layers {b}, {f}]" for b in ("0-1", "2-3") for f in ("mlp", "rest")
             for m in (0, 1)]
    first = json.loads(per_gen[0].read_text())
    assert first["columns"] == ["generation", "index", "fitness", "evo_toy", *genes, "seconds",
                                "worker", "error"]
    by_index = {row[1]: row for row in first["data"]}
    for r in history[:4]:
        row = by_index[r["index"]]
        assert row[0] == r["generation"] == 0 and row[2] == r["fitness"]
        assert row[4:12] == r["genome"]
    (everything,) = tables.glob(f"{tracking.EVALUATIONS_TABLE}_*.table.json")
    assert len(json.loads(everything.read_text())["data"]) == 12
    assert list((run_dir / "files" / "media" / "images").glob("report_*.png"))

    # The best config as an artifact: its manifest in the log names the file with the MD5 of the
    # final best_config.yaml, and W&B staged that exact content for upload.
    best_cfg = (storage / "best_config.yaml").read_bytes()
    assert b"best_config.yaml" in log
    assert base64.b64encode(hashlib.md5(best_cfg).digest()) in log
    staged = [p for p in (tmp_path / "wandb-home").rglob("*") if p.is_file()
              and p.read_bytes() == best_cfg]
    assert staged, "best_config.yaml was not staged for upload"


def test_sweep_agent_run_joins_the_agents_run_in_its_own_folder(
        ray_session, family, toy_task_dir, tmp_path, make_genome, offline_wandb, monkeypatch,
        capsys):
    monkeypatch.setenv("WANDB_SWEEP_ID", "sweep42")
    monkeypatch.setenv("WANDB_RUN_ID", "agentrun1")
    path = make_genome(tmp_path / "g.yaml", genome(family, layer_granularity=0), limit=8)
    sweep_root = tmp_path / "sweep"
    args = [path, "--storage-path", sweep_root, "--task-search-path", toy_task_dir, "--workers", 2,
            "--max-fevals", 4, "--no-merge-best", "--sigma0=0.3", "--popsize=4", "--limit=8",
            "--layer_granularity=2"]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    storage = sweep_root / "agentrun1"
    assert f"storage: {storage}" in err
    meta = json.loads((storage / "run.json").read_text())
    assert meta["wandb_id"] == "agentrun1"
    assert meta["search"]["sigma0"] == 0.3 and meta["overrides"]["layer_granularity"] == 2
    run_dir = offline_run(storage)
    assert run_dir.name.endswith("agentrun1")
    log = next(run_dir.glob("run-*.wandb")).read_bytes()
    assert b"sweep42" in log and tracking.SWEEP_METRIC.encode() in log

    # The agent re-runs a preempted run under the same id: it resumes that folder by itself.
    code, out, err = run_cli([*args, "--max-fevals", 6, "--no-wandb"], capsys)
    assert code == 0, err
    assert "4/6 evaluations done" in err
    assert len((storage / "history.jsonl").read_text().splitlines()) == 6
