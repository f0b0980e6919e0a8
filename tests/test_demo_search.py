"""The main job, CI-sized: the quick demo family, the demo genome, a small real search.

`scripts/demo.py` runs the full version (README's first command); here the same genome over the
quick family, with a small budget, must end with a better fitness than its own starting point
(scored independently, the same way a worker scores) and with every report file written.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

FEVALS = 12
LIMIT = 20


@pytest.fixture(scope="module")
def quick_family(tmp_path_factory):
    from make_demo_family import build_family

    return build_family(tmp_path_factory.mktemp("demo") / "family", seed=0, quick=True)


def _genome(family: dict, path: Path) -> Path:
    from demo import genome_for

    genome = genome_for(family, REPO / "configs" / "demo" / "genome.yml")
    genome["genome"]["layer_granularity"] = 1      # the quick family has 2 layers: 2 blocks
    genome["limit"] = LIMIT
    path.write_text(yaml.safe_dump(genome, sort_keys=False))
    return path


def _start_fitness(genome_path: Path, seed: int) -> float:
    """Fitness of the search's starting point, merged and scored outside the search."""
    from transformers import AutoTokenizer

    from evolve.fitness import EvalSettings, Scorer, weighted_fitness
    from evolve.genome import GenomeSpace, load_evolve_config
    from evolve.tasks import default_search_paths, mirror_search_paths
    from merge.config import MergeConfig
    from merge.engine import InMemoryMerger

    cfg = load_evolve_config(str(genome_path))
    space = GenomeSpace.build(cfg.genome)
    config0 = space.decode(space.initial_vector(random=cfg.random_init, seed=seed))
    model = InMemoryMerger().build_model(MergeConfig.from_dict(config0))
    include = mirror_search_paths(default_search_paths(), genome_path.parent / ".tasks")
    names = [t.name for t in cfg.tasks]
    settings = EvalSettings(task_names=names, metrics={t.name: t.metric for t in cfg.tasks},
                            include_dir=str(include), limit=cfg.limit, seed=seed, batch_size=64)
    tok = AutoTokenizer.from_pretrained(cfg.genome.base_model)
    scores = Scorer(model, tok, settings).score()
    return weighted_fitness(scores, {t.name: t.weight for t in cfg.tasks})


def test_reduced_demo_search_beats_its_start_and_reports(quick_family, tmp_path):
    genome = _genome(quick_family, tmp_path / "genome.yml")
    storage = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-c", "from evolve.cli import main; main()", str(genome),
           "--storage-path", str(storage), "--max-fevals", str(FEVALS), "--popsize", "4",
           "--workers", "2", "--seed", "0", "--batch-size", "64", "-q", "--wandb"]
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    history = [json.loads(line) for line in (storage / "history.jsonl").read_text().splitlines()]
    assert len(history) == FEVALS
    assert all(r["error"] is None for r in history), [r["error"] for r in history]
    best = max(r["fitness"] for r in history)
    start = _start_fitness(genome, seed=0)
    assert best > start, (best, start)

    for name in ("best_config.yaml", "report.png", "report.html", "run.json"):
        assert (storage / name).stat().st_size > 0, name
    assert (storage / "best_model" / "config.json").is_file()
    best_cfg = yaml.safe_load((storage / "best_config.yaml").read_text())
    assert best_cfg["base_model"] == str(quick_family["base"])
    assert list((storage / "wandb").glob("offline-run-*"))
