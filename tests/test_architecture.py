"""Layer structure inferred from tensor names: heads, layer-count keys, frankenmerges across layouts."""
from __future__ import annotations

import json

import pytest
import torch

from merge.architecture import infer
from merge.config import MergeConfig
from merge.engine import MergeOptions, merge_to_folder
from merge.sources import ModelSource
from tinymodels import build_model, load_state, perturb


def frankenmerge(first, last, out, layers=4):
    """Layers 0-2 of `first`, then 1-`layers` of `last` (layer 1 repeated from another model)."""
    cfg = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(first), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(last), "layer_range": [1, layers]}]}]}
    merge_to_folder(MergeConfig.from_dict(cfg), out, MergeOptions(quiet=True))
    return load_state(out)


@pytest.mark.parametrize("arch, head, norm, embed", [
    ("gpt_neox", "embed_out.weight", "gpt_neox.final_layer_norm.weight", "gpt_neox.embed_in.weight"),
    ("llama", "lm_head.weight", "model.norm.weight", "model.embed_tokens.weight"),
])
def test_frankenmerge_takes_head_and_final_norm_from_the_last_slice(arch, head, norm, embed,
                                                                    tmp_path):
    a = build_model(tmp_path / "a", arch=arch, seed=0)
    b = perturb(a, tmp_path / "b", seed=5)
    arch_info = infer(ModelSource.open(str(a)).config, list(ModelSource.open(str(a)).tensors))
    assert arch_info.head_name() == head and head in arch_info.post and not arch_info.tied_embeddings
    out = frankenmerge(a, b, tmp_path / "out")
    sa, sb = load_state(a), load_state(b)
    assert torch.equal(out[head], sb[head])          # the head belongs with the last layers
    assert torch.equal(out[norm], sb[norm])
    assert torch.equal(out[embed], sa[embed])        # embeddings with the first
    prefix = embed.split(".")[0] + ".layers"
    assert torch.equal(out[f"{prefix}.2.{'attention' if arch == 'gpt_neox' else 'self_attn'}"
                           f".{'dense' if arch == 'gpt_neox' else 'o_proj'}.weight"],
                       sb[f"{prefix}.1.{'attention' if arch == 'gpt_neox' else 'self_attn'}"
                          f".{'dense' if arch == 'gpt_neox' else 'o_proj'}.weight"])


def test_mpt_layer_count_key_n_layers(tmp_path):
    from transformers import AutoModelForCausalLM

    a = build_model(tmp_path / "a", arch="mpt", seed=0)
    b = perturb(a, tmp_path / "b", seed=5)
    src = ModelSource.open(str(a))
    info = infer(src.config, list(src.tensors))
    assert (info.layer_count_key, info.num_layers, info.layer_prefix) == \
        ("n_layers", 4, "transformer.blocks")
    assert info.tied_embeddings and "transformer.norm_f.weight" in info.post
    out = frankenmerge(a, b, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["n_layers"] == 5
    sb = load_state(b)
    assert torch.equal(out["transformer.blocks.4.ffn.down_proj.weight"],
                       sb["transformer.blocks.3.ffn.down_proj.weight"])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert len(model.transformer.blocks) == 5
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[5, 6, 7]])).logits).all()


def test_filters_match_the_loaded_names_of_mixtral_experts(tmp_path):
    """Mixtral checkpoints say block_sparse_moe, transformers (and configs) say mlp."""
    a = build_model(tmp_path / "a", arch="mixtral", seed=0)
    b = perturb(a, tmp_path / "b", seed=5)
    cfg = {"merge_method": "slerp", "base_model": str(a),
           "models": [{"model": str(a)}, {"model": str(b)}],
           "parameters": {"t": [{"filter": "mlp", "value": 0.0},
                                {"filter": "self_attn", "value": 1.0}, {"value": 0.5}]}}
    merge_to_folder(MergeConfig.from_dict(cfg), tmp_path / "out", MergeOptions(quiet=True))
    out, sa, sb = load_state(tmp_path / "out"), load_state(a), load_state(b)
    for expert in ("experts.0.w1", "experts.1.w2", "gate"):
        name = f"model.layers.2.block_sparse_moe.{expert}.weight"
        assert torch.equal(out[name], sa[name]), name          # t = 0: the base
    name = "model.layers.2.self_attn.q_proj.weight"
    torch.testing.assert_close(out[name], sb[name])            # t = 1: the other model
