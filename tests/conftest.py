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
def family_bf16(tmp_path_factory) -> dict[str, Path]:
    import torch

    return tinymodels.build_family(tmp_path_factory.mktemp("family_bf16"), children=2,
                                   dtype=torch.bfloat16)
