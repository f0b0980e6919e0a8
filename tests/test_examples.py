"""Every configs/examples/<method>.yml runs end to end on the tiny model family and loads with
transformers; the random methods are reproducible from --random-seed, on disk and in memory."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

import tinymodels
from merge.config import MergeConfig
from merge.engine import InMemoryMerger, MergeOptions, merge_to_folder
from merge.methods import METHODS

EXAMPLES = Path(__file__).resolve().parent.parent / "configs" / "examples"
PLACEHOLDERS = {"models/base": "base", "models/math": "c0", "models/code": "c1",
                "models/chat": "c2"}


def example(method: str, family) -> dict:
    """The example config with its placeholder model paths pointing at the tiny family."""
    def sub(v):
        if isinstance(v, dict):
            return {k: sub(x) for k, x in v.items()}
        if isinstance(v, list):
            return [sub(x) for x in v]
        if isinstance(v, str) and v in PLACEHOLDERS:
            return str(family[PLACEHOLDERS[v]])
        return v

    data = yaml.safe_load((EXAMPLES / f"{method}.yml").read_text())
    assert data["merge_method"] == method
    return sub(data)


def test_every_method_has_an_example():
    assert {p.stem for p in EXAMPLES.glob("*.yml")} == set(METHODS)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_example_merges_and_loads(method, family, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = example(method, family)
    out = merge_to_folder(MergeConfig.from_dict(cfg), tmp_path / "out",
                          MergeOptions(random_seed=0, quiet=True))
    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 13]])).logits
    assert torch.isfinite(logits.float()).all()
    state = tinymodels.load_state(out)
    base = tinymodels.load_state(family["base"])
    assert all(torch.isfinite(t.float()).all() for t in state.values())
    if "slices" not in cfg:   # a merge that changes nothing would hide a broken kernel
        name = "model.layers.1.mlp.up_proj.weight"
        assert not torch.equal(state[name].float(), base[name].bfloat16().float())


@pytest.mark.parametrize("method", ["dare_ties", "della"])
def test_random_methods_reproducible_on_disk_and_in_memory(method, family, tmp_path):
    cfg = MergeConfig.from_dict(example(method, family))
    first = tinymodels.load_state(merge_to_folder(cfg, tmp_path / "a",
                                                  MergeOptions(random_seed=1, quiet=True)))
    second = tinymodels.load_state(merge_to_folder(cfg, tmp_path / "b",
                                                   MergeOptions(random_seed=1, quiet=True)))
    other = tinymodels.load_state(merge_to_folder(cfg, tmp_path / "c",
                                                  MergeOptions(random_seed=2, quiet=True)))
    memory = InMemoryMerger(MergeOptions(random_seed=1, quiet=True)).merge_state(cfg)
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name
        assert torch.equal(first[name], memory[name].to(first[name].dtype)), name
    assert any(not torch.equal(first[n], other[n]) for n in first)
