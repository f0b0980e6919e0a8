"""Configs the reference toolkit (mergekit 0.1.5) accepts give its model: the semantics pinned here
were each found by running the reference side by side (docs/compatibility.md, "Parameters,
configs and tokenizers"); these tests check them without the reference."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

from merge.config import MergeConfig
from merge.engine import InMemoryMerger, MergeOptions, merge_to_folder
from merge.errors import ConfigError
from merge.parameters import Position, evaluate
from merge.plan import build_plan
from tinymodels import build_model, load_state, make_tokenizer, perturb

N_TOKENS = len(make_tokenizer())   # 124: the tiny tokenizer
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


@pytest.fixture(scope="module")
def exact_family(tmp_path_factory):
    """base + two children whose embeddings have exactly one row per token."""
    root = tmp_path_factory.mktemp("exact")
    base = build_model(root / "base", vocab_size=N_TOKENS)
    return {"base": base, "c0": perturb(base, root / "c0", seed=1),
            "c1": perturb(base, root / "c1", seed=2)}


@pytest.fixture(scope="module")
def added_family(exact_family, tmp_path_factory):
    """exact_family plus `x`, a child with two added tokens (resized embeddings)."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("added")
    tok = make_tokenizer(["<x1>", "<x2>"])
    model = AutoModelForCausalLM.from_pretrained(exact_family["c0"])
    model.resize_token_embeddings(len(tok))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    model.save_pretrained(root / "x")
    tok.save_pretrained(root / "x")
    return {**exact_family, "x": root / "x"}


def merged(cfg: dict) -> dict:
    return InMemoryMerger(MergeOptions(quiet=True)).merge_state(MergeConfig.from_dict(cfg))


def ties(fam, *children, **extra):
    cfg = {"merge_method": "ties", "base_model": str(fam["base"]),
           "models": [{"model": str(fam[c]), "parameters": {"weight": w, "density": 0.5}}
                      for c, w in zip(children, (0.7, 0.3))]}
    cfg.update(extra)
    return cfg


def cli(cfg: dict, tmp_path, *args):
    path = tmp_path / "cfg.yml"
    path.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg))
    return subprocess.run([sys.executable, "-m", "merge", str(path), str(tmp_path / "out"), "-q",
                           *args], capture_output=True, text=True, timeout=120)


# --- tokenizer source ---------------------------------------------------------------------------

@pytest.mark.parametrize("tokenizer", [{"tokenizer_source": "base"},
                                       {"tokenizer": {"source": "base", "pad_to_multiple_of": 4}},
                                       {"tokenizer": {"source": "union"}}])
def test_identical_vocabularies_give_the_plain_merge(exact_family, tokenizer):
    """Re-indexing identical vocabularies is the identity; the configured method (TIES here, not
    a linear average) then merges embedding and head rows like every other tensor."""
    plain = merged(ties(exact_family, "c0", "c1"))
    with_source = merged(ties(exact_family, "c0", "c1", **tokenizer))
    assert with_source.keys() == plain.keys()
    for k in plain:
        torch.testing.assert_close(with_source[k], plain[k], rtol=0, atol=0)


def test_rows_a_model_lacks_are_filled_then_merged_by_the_method(added_family):
    out = merged(ties(added_family, "x", "c1", tokenizer_source="union"))
    x, c1 = load_state(added_family["x"]), load_state(added_family["c1"])
    assert out[EMBED].shape[0] == N_TOKENS + 2
    # base and c1 lack <x1>: both get x's row, so every task vector is zero there … except x's
    # own, which is zero too: the merge is x's row
    for k in (EMBED, HEAD):
        torch.testing.assert_close(out[k][N_TOKENS:], x[k][N_TOKENS:])
    # a token every model has is the TIES merge of the models' own rows (not their average)
    assert not torch.allclose(out[EMBED][:N_TOKENS],
                              0.7 * x[EMBED][:N_TOKENS] + 0.3 * c1[EMBED][:N_TOKENS], atol=1e-4)


def test_padding_rows_are_the_mean_embedding(exact_family):
    cfg = {"merge_method": "linear", "tokenizer": {"source": "base", "pad_to_multiple_of": 64},
           "models": [{"model": str(exact_family[c]), "parameters": {"weight": w}}
                      for c, w in (("c0", 0.25), ("c1", 0.75))]}
    out = merged(cfg)
    assert out[EMBED].shape[0] == 128
    for k in (EMBED, HEAD):
        mean = out[k][:N_TOKENS].mean(0)
        for row in out[k][N_TOKENS:]:
            torch.testing.assert_close(row, mean)


def test_rows_past_the_tokenizer_are_dropped(family, tmp_path):
    """The conftest family stores 128 rows for 124 tokens: the output has one row per token."""
    cfg = ties(family, "c0", "c1", tokenizer_source="base")
    merge_to_folder(MergeConfig.from_dict(cfg), tmp_path / "o", MergeOptions(quiet=True))
    assert load_state(tmp_path / "o")[EMBED].shape[0] == N_TOKENS
    assert json.loads((tmp_path / "o" / "config.json").read_text())["vocab_size"] == N_TOKENS


def test_forced_rows_replace_every_models_row_before_the_merge(added_family):
    """force: every model gets the source's row; an unnormalised sum of two then doubles it."""
    cfg = {"merge_method": "linear", "parameters": {"normalize": False},
           "models": [{"model": str(added_family[c]), "parameters": {"weight": 1.0}}
                      for c in ("x", "c1")],
           "tokenizer": {"source": "union",
                         "tokens": {"w5": {"source": str(added_family["c1"]), "force": True}}}}
    out = merged(cfg)
    c1 = load_state(added_family["c1"])
    w5 = 4 + 5
    torch.testing.assert_close(out[EMBED][w5], 2 * c1[EMBED][w5])


def test_tokens_block_adds_plain_tokens_and_defaults_to_union(added_family, tmp_path):
    cfg = ties(added_family, "x", "c1",
               tokenizer={"tokens": {"<new>": {"source": {"kind": "zero"}}}})
    merge_to_folder(MergeConfig.from_dict(cfg), tmp_path / "o", MergeOptions(quiet=True))
    data = json.loads((tmp_path / "o" / "tokenizer.json").read_text())
    added = {t["content"]: t for t in data["added_tokens"]}
    assert [added[t]["id"] for t in ("<x1>", "<x2>", "<new>")] == [N_TOKENS, N_TOKENS + 1,
                                                                    N_TOKENS + 2]
    assert added["<new>"]["special"] is False and added["<new>"]["normalized"] is True
    out = load_state(tmp_path / "o")
    assert torch.count_nonzero(out[EMBED][N_TOKENS + 2]) == 0


def test_differing_tokenizers_of_equal_size_merge_by_position_with_a_warning(exact_family,
                                                                           tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    for f in exact_family["c1"].iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    data = json.loads((other / "tokenizer.json").read_text())
    data["model"]["vocab"]["renamed"] = data["model"]["vocab"].pop("w7")
    (other / "tokenizer.json").write_text(json.dumps(data))
    cfg = ties(exact_family, "c0", "c1")
    cfg["models"][1]["model"] = str(other)
    plan = build_plan(MergeConfig.from_dict(cfg))
    assert plan.vocab is None and any("by position" in w for w in plan.warnings)


# --- parameters ---------------------------------------------------------------------------------

def test_unused_parameters_merge_with_one_warning_line_each(family, tmp_path):
    models = [{"model": str(family["base"]), "parameters": {"weight": 0.5}},
              {"model": str(family["c0"]), "parameters": {"weight": 0.5}}]
    cfg = {"merge_method": "slerp", "base_model": str(family["base"]), "models": models,
           "parameters": {"t": 0.3}, "tokenizer_sorce": "base"}
    r = cli(cfg, tmp_path)
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 2, r.stderr
    unknown, weight = sorted(warnings, key=lambda w: "weight" in w)
    assert unknown.startswith("warning: tokenizer_sorce: unknown key")
    assert weight.startswith("warning: models[0].parameters.weight, models[1].parameters.weight: "
                             "slerp does not use 'weight'")
    plain = merged({"merge_method": "slerp", "base_model": str(family["base"]),
                    "models": [{"model": str(family["c0"])}], "parameters": {"t": 0.3}})
    out = load_state(tmp_path / "out")
    for k in plain:
        torch.testing.assert_close(out[k], plain[k], rtol=0, atol=0)


def test_per_tensor_and_base_parameters_given_per_model_are_ignored(family):
    cfg = ties(family, "c0", "c1")
    cfg["models"][0]["parameters"]["normalize"] = False
    cfg["models"].insert(0, {"model": str(family["base"]),
                             "parameters": {"weight": 9.0, "density": 0.1}})
    plan = build_plan(MergeConfig.from_dict(cfg))
    assert all(t.params.get("normalize") is True for t in plan.tensors if not t.copy_only)
    assert sorted(w.split(":")[0] for w in plan.warnings) == [
        "models[0].parameters.density", "models[0].parameters.weight",
        "models[1].parameters.normalize"]


def test_numeric_strings_are_numbers(family):
    # YAML 1.1 reads 1e-5 (no dot) as the string "1e-5"; the reference's schema reads a number
    text = (f"merge_method: karcher\nmodels:\n  - model: {family['c0']}\n  - model: {family['c1']}\n"
            f"parameters:\n  tol: 1e-5\n  max_iter: \"10\"\n")
    assert yaml.safe_load(text)["parameters"]["tol"] == "1e-5"
    plan = build_plan(MergeConfig.from_dict(yaml.safe_load(text)))
    assert {(t.params["tol"], t.params["max_iter"]) for t in plan.tensors} == {(1e-5, 10.0)}
    cfg = {"merge_method": "ties", "base_model": str(family["base"]),
           "models": [{"model": str(family["c0"]),
                       "parameters": {"weight": "0.5", "density": [1, "5e-1"]}}],
           "parameters": {"normalize": "false"}}
    plan = build_plan(MergeConfig.from_dict(cfg))
    t = next(t for t in plan.tensors if t.name == "model.layers.3.mlp.up_proj.weight")
    assert t.model_params == [{"weight": 0.5, "density": 0.5}] and t.params["normalize"] is False
    cfg["models"][0]["parameters"]["density"] = "half"
    with pytest.raises(ConfigError, match=r"models\[0\].parameters.density: must be a number"):
        build_plan(MergeConfig.from_dict(cfg))


def test_filters_match_current_layout_names_of_legacy_expert_tensors():
    setting = [{"filter": "mlp", "value": 0.9}, {"value": 0.1}]
    for name in ("model.layers.0.block_sparse_moe.experts.3.w1.weight",
                 "model.layers.0.block_sparse_moe.experts.3.w2.weight",
                 "model.layers.0.block_sparse_moe.gate.weight",
                 "model.layers.0.mlp.experts.gate_up_proj"):
        assert evaluate(setting, Position(name)) == 0.9, name
    assert evaluate([{"filter": "gate_up_proj", "value": 1}],
                    Position("model.layers.0.block_sparse_moe.experts.0.w3.weight")) == 1
    assert evaluate([{"filter": "*", "value": 2}], Position("anything")) == 2
    assert evaluate({"filter": "self_attn", "value": 3}, Position("a.self_attn.b")) == 3


def test_a_one_layer_slice_takes_the_last_anchor(family):
    cfg = {"merge_method": "slerp", "base_model": str(family["base"]),
           "parameters": {"t": [0.2, 0.8]},
           "slices": [{"sources": [{"model": str(family[m]), "layer_range": r}
                                   for m in ("base", "c0")]} for r in ([0, 3], [3, 4])]}
    plan = build_plan(MergeConfig.from_dict(cfg))
    t = {tp.name: tp.params["t"] for tp in plan.tensors if not tp.copy_only}
    assert t[EMBED] == pytest.approx(0.2) and t["model.norm.weight"] == pytest.approx(0.2)
    assert [t[f"model.layers.{i}.mlp.up_proj.weight"] for i in range(4)] == pytest.approx(
        [0.2, 0.5, 0.8, 0.8])


def test_per_model_filters_see_the_source_tensor_name(family):
    """In a frankenmerge, a model's own parameters are looked up by its tensor names (source
    layers); per-tensor parameters by the output names."""
    cfg = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(family["c0"]), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(family["c1"]), "layer_range": [0, 2], "parameters": {
            "scale": [{"filter": "layers.0.", "value": 0.5}, {"value": 1.0}]}}]}]}
    plan = build_plan(MergeConfig.from_dict(cfg))
    scale = {tp.name: tp.model_params[0]["scale"] for tp in plan.tensors if not tp.copy_only}
    assert scale["model.layers.2.mlp.up_proj.weight"] == 0.5     # c1's layer 0
    assert scale["model.layers.0.mlp.up_proj.weight"] == 1.0     # c0's layer 0: other slice
    assert scale["model.layers.3.mlp.up_proj.weight"] == 1.0


def test_methods_without_a_base_merge_the_base_model_too(family):
    models = [{"model": str(family[c]), "parameters": {"weight": 1.0}} for c in ("c0", "c1")]
    cfg = {"merge_method": "linear", "base_model": str(family["base"]), "models": models}
    with pytest.raises(ConfigError, match=r"base_model: linear merges the base model.*weight"):
        build_plan(MergeConfig.from_dict(cfg))
    cfg["parameters"] = {"weight": 2.0}
    out = merged(cfg)
    states = [load_state(family[k]) for k in ("c0", "c1", "base")]
    k = "model.layers.1.self_attn.q_proj.weight"
    torch.testing.assert_close(out[k], (states[0][k] + states[1][k] + 2 * states[2][k]) / 4)


# --- config spellings ---------------------------------------------------------------------------

def test_reference_spellings_are_accepted(family):
    cfg = MergeConfig.from_dict({
        "merge_method": "slerp", "dtype": "torch.bfloat16", "out_dtype": "float32",
        "base_model": {"model": {"path": str(family["base"])}},
        "models": [{"model": {"model": str(family["base"])}}, {"model": str(family["c0"])}],
        "slices": [],
        "parameters": {"t": {"value": 0.5}}})
    assert cfg.dtype == "bfloat16" and cfg.base_model == str(family["base"])
    plan = build_plan(cfg)
    assert plan.out_config["dtype"] == "float32" and "torch_dtype" not in plan.out_config
    assert all(t.params["t"] == 0.5 for t in plan.tensors if not t.copy_only)


def test_slice_base_model(family):
    cfg = {"merge_method": "task_arithmetic", "slices": [
        {"base_model": str(family[b]),
         "sources": [{"model": str(family[m]), "layer_range": [0, 4],
                      **({} if m == b else {"parameters": {"weight": 1.0}})}
                     for m in ("base", "c0")]} for b in ("base",)]}
    plan = build_plan(MergeConfig.from_dict(cfg))
    assert {tp.base.model for tp in plan.tensors} == {str(family["base"])}


def test_builtin_chat_templates_render_like_the_reference():
    import jinja2

    from merge.tokenizer import TEMPLATES

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": " hi "},
            {"role": "assistant", "content": "yo"}]
    render = lambda name: env.from_string(TEMPLATES[name]).render(  # noqa: E731
        messages=msgs, bos_token="<s>", eos_token="</s>", add_generation_prompt=True)
    assert render("llama3") == ("<s><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>\n"
                                "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>\n"
                                "<|start_header_id|>assistant<|end_header_id|>\n\nyo<|eot_id|>\n"
                                "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert render("alpaca") == "S\n\n### Instruction:\nhi\n\n### Response:\nyo"
    assert render("mistral") == "<s> [INST] S\n\n hi  [/INST] yo</s>"


def test_a_model_outside_the_merge_can_lend_its_tokenizer(added_family, tmp_path):
    lender = tmp_path / "lender"
    lender.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (lender / name).write_bytes((added_family["x"] / name).read_bytes())
    cfg = ties(added_family, "c0", "c1", tokenizer_source=str(lender))
    merge_to_folder(MergeConfig.from_dict(cfg), tmp_path / "o", MergeOptions(quiet=True))
    out = load_state(tmp_path / "o")
    assert out[EMBED].shape[0] == N_TOKENS + 2
    assert torch.count_nonzero(out[EMBED][N_TOKENS:]) == 0      # no merged model has <x1>, <x2>
    assert "<x2>" in (tmp_path / "o" / "tokenizer.json").read_text()


def test_mixed_precision_inputs_give_the_promoted_dtype(family, family_bf16):
    cfg = {"merge_method": "linear",
           "models": [{"model": str(family_bf16["c0"]), "parameters": {"weight": 1.0}},
                      {"model": str(family["c0"]), "parameters": {"weight": 1.0}}]}
    plan = build_plan(MergeConfig.from_dict(cfg))
    assert {t.dtype for t in plan.tensors} == {"F32"} and plan.out_config["dtype"] == "float32"
    cfg["dtype"] = "bfloat16"
    assert {t.dtype for t in build_plan(MergeConfig.from_dict(cfg)).tensors} == {"BF16"}
