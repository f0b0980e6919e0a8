"""A candidate merged in memory (what every worker does) is bit-identical to mergekit-yaml's output
for the same decoded config, including after many candidates merged into the same model."""
from __future__ import annotations

import random

import pytest
import torch

from evolve.genome import GenomeSpace, parse_evolve_config
from merge.config import MergeConfig
from merge.engine import InMemoryMerger, MergeOptions, merge_to_folder
from tinymodels import load_state

GENOMES = {
    "ties-blocks-filters": dict(merge_method="ties", layer_granularity=2,
                                filters=["self_attn", "mlp"]),
    "dare_ties-smooth": dict(merge_method="dare_ties", layer_granularity=1, smooth=True),
    "linear-whole": dict(merge_method="linear", base_model=None),
    "task_arithmetic-negative": dict(merge_method="task_arithmetic", allow_negative_weights=True,
                                     layer_granularity=2),
    # thresholds looked up in kept magnitude orders (MergeOptions.cache_magnitudes)
    "ties-cached": dict(merge_method="ties", layer_granularity=2, cache=True),
    "breadcrumbs_ties-cached": dict(merge_method="breadcrumbs_ties", layer_granularity=1,
                                    cache=True),
    # inputs as views of the memory-mapped files, shared by a node's workers (evolve.shared_inputs)
    "ties-shared": dict(merge_method="ties", layer_granularity=2, shared=True),
    "dare_ties-shared": dict(merge_method="dare_ties", layer_granularity=1, shared=True),
}


@pytest.mark.parametrize("name", list(GENOMES))
def test_in_memory_candidates_equal_mergekit_yaml(family, tmp_path, name):
    genome = {"models": [str(family["c0"]), str(family["c1"]), str(family["c2"])],
              "base_model": str(family["base"]), **GENOMES[name]}
    cache = genome.pop("cache", False)
    shared = genome.pop("shared", False)
    genome = {k: v for k, v in genome.items() if v is not None}
    space = GenomeSpace.build(parse_evolve_config({"genome": genome,
                                                   "tasks": [{"name": "t"}]}).genome)
    rng = random.Random(1)
    options = MergeOptions(random_seed=7, quiet=True)
    merger = InMemoryMerger(MergeOptions(random_seed=7, quiet=True, cache_magnitudes=cache))
    start = MergeConfig.from_dict(space.decode(space.initial_vector()))
    if shared:
        from evolve.shared_inputs import SharedTensorReader, share_inputs

        assert share_inputs(merger, start) and isinstance(merger._reader, SharedTensorReader)
    model = merger.build_model(start)
    if shared:
        assert merger._reader.bytes_mapped() > 0
    for k in range(3):  # several candidates through one live model, as a worker does
        x = [rng.uniform(lo, hi) for lo, hi in zip(space.lower, space.upper)]
        config = MergeConfig.from_dict(space.decode(x))
        merger.merge_into(config, model)
        on_disk = load_state(merge_to_folder(config, tmp_path / f"out{k}", options))
        live = model.state_dict()
        assert set(on_disk) <= set(live)
        for key, tensor in on_disk.items():
            assert live[key].dtype == tensor.dtype, key
            assert torch.equal(live[key], tensor), f"{name} candidate {k}: {key} differs"
