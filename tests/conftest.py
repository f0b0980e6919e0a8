"""Shared fixtures: tiny model families built once per test session, offline."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

import tinymodels  # noqa: E402


@pytest.fixture(scope="session")
def family(tmp_path_factory) -> dict[str, Path]:
    """A float32 Llama family: base + c0, c1, c2 (children = base + seeded noise)."""
    return tinymodels.build_family(tmp_path_factory.mktemp("family"), children=3)


@pytest.fixture(scope="session")
def space(family):
    """The genome space of a TIES search over c0 and c1 with base, genes per 2 layers (a module
    may define its own `space`)."""
    from evolve.genome import GenomeSpace, parse_evolve_config

    genome = {"models": [str(family["c0"]), str(family["c1"])], "merge_method": "ties",
              "base_model": str(family["base"]), "layer_granularity": 2}
    return GenomeSpace.build(parse_evolve_config({"genome": genome,
                                                  "tasks": [{"name": "t"}]}).genome)


@pytest.fixture(scope="session")
def family_bf16(tmp_path_factory) -> dict[str, Path]:
    import torch

    return tinymodels.build_family(tmp_path_factory.mktemp("family_bf16"), children=2,
                                   dtype=torch.bfloat16)


# --- mergekit-evolve fixtures ------------------------------------------------------------------
TOY_TASK_YAML = """\
task: evo_toy
dataset_path: json
dataset_kwargs:
  data_files:
    test: data/evo_toy.jsonl      # relative to this file: evolve.tasks resolves it
test_split: test
output_type: multiple_choice
doc_to_text: "{{q}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{label}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.fixture(scope="session")
def toy_task_dir(tmp_path_factory) -> Path:
    """A task search path holding `evo_toy`: 40 multiple-choice items over the tiny vocabulary,
    read from a JSONL file named by a path relative to the task YAML."""
    import json
    import random

    root = tmp_path_factory.mktemp("toy_tasks")
    task = root / "evo_toy"
    (task / "data").mkdir(parents=True)
    rng = random.Random(0)
    with open(task / "data" / "evo_toy.jsonl", "w") as f:
        for _ in range(40):
            q = " ".join(rng.choice(tinymodels.WORDS) for _ in range(6))
            choices = [" ".join(rng.choice(tinymodels.WORDS) for _ in range(2)) for _ in range(3)]
            f.write(json.dumps({"q": q, "choices": choices, "label": rng.randrange(3)}) + "\n")
    (task / "evo_toy.yaml").write_text(TOY_TASK_YAML)
    return root


def write_genome(path: Path, genome: dict, tasks=None, **extra) -> Path:
    """A genome YAML file for mergekit-evolve tests."""
    import yaml

    data = {"genome": genome, "tasks": tasks or [{"name": "evo_toy", "metric": "acc,none"}],
            **extra}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def make_genome():
    return write_genome


# --- Ray and W&B for in-process searches -------------------------------------------------------
@pytest.fixture(scope="module")
def ray_session():
    """A local Ray for one test module, in a short folder of its own (Unix socket paths are
    limited to ~107 bytes), shut down and removed afterwards."""
    import shutil
    import tempfile

    import ray

    tmp = tempfile.mkdtemp(prefix="evo-test-ray-", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=tmp, log_to_driver=False,
             namespace="evomerge-tests")
    yield
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """W&B offline, with its config, cache and data under the test's folder and no credentials,
    sweep or run identity inherited from the environment."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    for var in ("WANDB_API_KEY", "WANDB_SWEEP_ID", "WANDB_RUN_ID", "WANDB_PROJECT",
                "WANDB_ENTITY", "WANDB_DIR"):
        monkeypatch.delenv(var, raising=False)
