"""The merge engine against direct tensor computations of each formula, on tiny real models."""
from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from merge.config import MergeConfig
from merge.engine import InMemoryMerger, MergeOptions, merge_to_folder
from merge.errors import EvomergeError
from tinymodels import build_family, build_model, load_state, make_tokenizer


def run(cfg: dict, out, **opts):
    merge_to_folder(MergeConfig.from_dict(cfg), out, MergeOptions(quiet=True, **opts))
    return load_state(out)


def states(family, *names):
    return [load_state(family[n]) for n in names]


# --- methods against their formulas -------------------------------------------------------------

def test_linear_is_normalised_weighted_average(family, tmp_path):
    out = run({"merge_method": "linear",
               "models": [{"model": str(family["c0"]), "parameters": {"weight": 0.3}},
                          {"model": str(family["c1"]), "parameters": {"weight": 0.9}}]}, tmp_path / "o")
    a, b = states(family, "c0", "c1")
    assert set(out) == set(a)
    for k in a:
        torch.testing.assert_close(out[k], (0.3 * a[k] + 0.9 * b[k]) / 1.2, rtol=1e-5, atol=1e-6)


def test_linear_without_normalize_is_plain_weighted_sum(family, tmp_path):
    out = run({"merge_method": "linear", "parameters": {"normalize": False},
               "models": [{"model": str(family["c0"]), "parameters": {"weight": 0.5}},
                          {"model": str(family["c1"]), "parameters": {"weight": 0.25}}]},
              tmp_path / "o")
    a, b = states(family, "c0", "c1")
    for k in a:
        torch.testing.assert_close(out[k], 0.5 * a[k] + 0.25 * b[k], rtol=1e-5, atol=1e-6)


def reference_slerp(v0: torch.Tensor, v1: torch.Tensor, t: float) -> torch.Tensor:
    a, b = v0.double().flatten(), v1.double().flatten()
    cos = float((a / a.norm()) @ (b / b.norm()))
    if abs(cos) > 0.9995:
        return ((1 - t) * v0.double() + t * v1.double()).float()
    theta = math.acos(cos)
    res = (math.sin((1 - t) * theta) * v0.double() + math.sin(t * theta) * v1.double()) / math.sin(theta)
    return res.float()


def test_slerp_matches_spherical_formula_and_endpoints(family, tmp_path):
    cfg = {"merge_method": "slerp", "base_model": str(family["c0"]), "parameters": {"t": 0.3},
           "models": [{"model": str(family["c0"])}, {"model": str(family["c1"])}]}
    out = run(cfg, tmp_path / "o")
    a, b = states(family, "c0", "c1")
    for k in a:
        torch.testing.assert_close(out[k], reference_slerp(a[k], b[k], 0.3), rtol=1e-4, atol=1e-6)
    cfg["parameters"]["t"] = 0.0
    at_base = run(cfg, tmp_path / "o0")
    for k in a:
        torch.testing.assert_close(at_base[k], a[k], rtol=1e-5, atol=1e-6)


def test_task_arithmetic_adds_scaled_task_vectors(family, tmp_path):
    out = run({"merge_method": "task_arithmetic", "base_model": str(family["base"]),
               "parameters": {"lambda": 0.8},
               "models": [{"model": str(family["c0"]), "parameters": {"weight": 0.6}},
                          {"model": str(family["c1"]), "parameters": {"weight": -0.2}}]},
              tmp_path / "o")
    base, a, b = states(family, "base", "c0", "c1")
    for k in base:
        want = base[k] + 0.8 * (0.6 * (a[k] - base[k]) - 0.2 * (b[k] - base[k]))
        torch.testing.assert_close(out[k], want, rtol=1e-5, atol=1e-6)


def reference_ties(base, models, weights, densities, lam=1.0, normalize=True):
    deltas = []
    for m, w, d in zip(models, weights, densities):
        tau = (m - base).flatten()
        k = max(1, int(d * tau.numel())) if d > 0 else 0      # the reference's keep count
        keep = torch.zeros_like(tau, dtype=torch.bool)
        if k > 0:   # ties at the cut-off by position
            keep[tau.abs().sort(descending=True, stable=True).indices[:k]] = True
        deltas.append(w * tau * keep)
    delta = torch.stack(deltas)
    sign = torch.where(delta.sum(0) >= 0, 1.0, -1.0)        # a zero sum elects +
    agree = torch.sign(delta) == sign
    delta = delta * agree
    merged = delta.sum(0)
    if normalize:
        div = (torch.tensor(weights)[:, None] * agree).sum(0)
        div[div == 0] = 1.0
        merged = merged / div
    return base + lam * merged.reshape(base.shape)


def test_ties_trims_elects_sign_and_averages_agreeing(family, tmp_path):
    out = run({"merge_method": "ties", "base_model": str(family["base"]),
               "models": [{"model": str(family["c0"]), "parameters": {"weight": 0.7, "density": 0.4}},
                          {"model": str(family["c1"]), "parameters": {"weight": 0.5, "density": 0.8}},
                          {"model": str(family["c2"]), "parameters": {"weight": 0.3, "density": 0.2}}]},
              tmp_path / "o")
    base, a, b, c = states(family, "base", "c0", "c1", "c2")
    for k in base:
        want = reference_ties(base[k], [a[k], b[k], c[k]], [0.7, 0.5, 0.3], [0.4, 0.8, 0.2])
        torch.testing.assert_close(out[k], want, rtol=1e-5, atol=1e-6)


def test_ties_threshold_on_large_tensor_is_exact():
    """The sampled bracket must find the same k-th value as a full sort."""
    from merge.methods.selection import kth_largest

    g = torch.Generator().manual_seed(3)
    x = torch.randn(1_000_003, generator=g).abs()
    for k in (1, 17, 500_000, 999_999, 1_000_003):
        assert kth_largest(x, k) == torch.sort(x, descending=True).values[k - 1]


def test_passthrough_scale_and_frankenmerge_with_repeated_layer(family, tmp_path):
    cfg = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(family["c0"]), "layer_range": [0, 3]}]},
        {"sources": [{"model": str(family["c1"]), "layer_range": [2, 4],
                      "parameters": {"scale": [1.0, 2.0]}}]}]}
    out = run(cfg, tmp_path / "o")
    a, b = states(family, "c0", "c1")
    config = json.loads((tmp_path / "o" / "config.json").read_text())
    assert config["num_hidden_layers"] == 5
    for rest in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
        for out_layer, (src, layer, scale) in enumerate(
                [(a, 0, 1), (a, 1, 1), (a, 2, 1), (b, 2, 1.0), (b, 3, 2.0)]):
            torch.testing.assert_close(out[f"model.layers.{out_layer}.{rest}"],
                                       src[f"model.layers.{layer}.{rest}"] * scale)
    # embeddings from the first slice, final norm and head from the last
    assert torch.equal(out["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    assert torch.equal(out["model.norm.weight"], b["model.norm.weight"] * 1.0)
    assert torch.equal(out["lm_head.weight"], b["lm_head.weight"])


# --- parameters: gradients, filters, precedence ------------------------------------------------

def test_gradient_interpolates_over_layers_and_embeddings_take_first_anchor(family, tmp_path):
    cfg = {"merge_method": "linear", "parameters": {"normalize": False},
           "models": [{"model": str(family["c0"]), "parameters": {"weight": [0.0, 1.0]}},
                      {"model": str(family["c1"]), "parameters": {"weight": [1.0, 0.0]}}]}
    out = run(cfg, tmp_path / "o")
    a, b = states(family, "c0", "c1")
    for layer in range(4):
        w = layer / 3
        k = f"model.layers.{layer}.mlp.up_proj.weight"
        torch.testing.assert_close(out[k], w * a[k] + (1 - w) * b[k], rtol=1e-5, atol=1e-6)
    for k in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        torch.testing.assert_close(out[k], b[k])


def test_filters_first_match_wins_and_fallback(family, tmp_path):
    weight = [{"filter": "self_attn", "value": 0.2}, {"filter": "mlp", "value": 0.8},
              {"filter": "self_attn.q_proj", "value": 99.0}, {"value": 0.5}]
    cfg = {"merge_method": "linear", "parameters": {"normalize": False},
           "models": [{"model": str(family["c0"]), "parameters": {"weight": weight}}]}
    out = run(cfg, tmp_path / "o")
    (a,) = states(family, "c0")
    for k, w in [("model.layers.1.self_attn.q_proj.weight", 0.2),
                 ("model.layers.1.mlp.gate_proj.weight", 0.8),
                 ("model.layers.1.post_attention_layernorm.weight", 0.5)]:
        torch.testing.assert_close(out[k], w * a[k])


def test_precedence_source_over_slice_over_top_level_and_fallthrough(family, tmp_path):
    cfg = {"merge_method": "linear", "parameters": {"normalize": False, "weight": 0.1},
           "slices": [{"parameters": {"weight": [{"filter": "mlp", "value": 0.3}]},
                       "sources": [{"model": str(family["c0"]), "layer_range": [0, 4],
                                    "parameters": {"weight": [{"filter": "down_proj", "value": 0.7}]}},
                                   {"model": str(family["c1"]), "layer_range": [0, 4]}]}]}
    out = run(cfg, tmp_path / "o")
    a, b = states(family, "c0", "c1")
    cases = {"model.layers.0.mlp.down_proj.weight": (0.7, 0.3),   # source wins; slice for c1
             "model.layers.0.mlp.up_proj.weight": (0.3, 0.3),     # source list misses: slice
             "model.layers.0.self_attn.k_proj.weight": (0.1, 0.1)}  # both miss: top level
    for k, (wa, wb) in cases.items():
        torch.testing.assert_close(out[k], wa * a[k] + wb * b[k], rtol=1e-5, atol=1e-6)


# --- dtypes, layouts, output --------------------------------------------------------------------

def test_bf16_inputs_compute_in_fp32_and_save_requested_dtype(family_bf16, tmp_path):
    cfg = {"merge_method": "linear", "out_dtype": "float16",
           "models": [{"model": str(family_bf16["c0"]), "parameters": {"weight": 1.0}},
                      {"model": str(family_bf16["c1"]), "parameters": {"weight": 2.0}}]}
    out = run(cfg, tmp_path / "o")
    a, b = states(family_bf16, "c0", "c1")
    for k in a:
        assert a[k].dtype == torch.bfloat16 and out[k].dtype == torch.float16
        want = ((a[k].float() * (1 / 3)) + b[k].float() * (2 / 3)).half()
        torch.testing.assert_close(out[k], want, rtol=2e-3, atol=1e-4)
    assert json.loads((tmp_path / "o" / "config.json").read_text())["dtype"] == "float16"


def test_dtype_rounds_inputs_and_output_defaults_to_it(family, tmp_path):
    cfg = {"merge_method": "ties", "base_model": str(family["base"]), "dtype": "bfloat16",
           "models": [{"model": str(family["c0"]), "parameters": {"weight": 1.0, "density": 1.0}}]}
    out = run(cfg, tmp_path / "o")
    base, a = states(family, "base", "c0")
    for k in base:
        assert out[k].dtype == torch.bfloat16
        torch.testing.assert_close(out[k], a[k].bfloat16())


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gemma", "phi3", "gpt_neox", "gpt2"])
def test_architectures_merge_load_and_generate(arch, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fam = build_family(tmp_path / "fam", arch=arch, children=2)
    cfg = {"merge_method": "ties", "base_model": str(fam["base"]),
           "models": [{"model": str(fam["c0"]), "parameters": {"weight": 0.5, "density": 0.5}},
                      {"model": str(fam["c1"]), "parameters": {"weight": 0.5, "density": 0.5}}]}
    out = run(cfg, tmp_path / "out")
    assert set(out) == set(load_state(fam["base"]))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    prompt = torch.tensor([[1, 5, 6, 7]])
    ids = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4,
                         do_sample=False, pad_token_id=3)
    assert ids.shape[1] > prompt.shape[1] and torch.equal(ids[0, :4], prompt[0])
    if arch == "llama":  # the copied tokenizer round-trips through transformers
        tok = AutoTokenizer.from_pretrained(tmp_path / "out")
        assert tok("w1 w2 w3")["input_ids"][-3:] == [5, 6, 7]


def test_tied_embeddings_stay_tied(tmp_path):
    from transformers import AutoModelForCausalLM

    fam = build_family(tmp_path / "fam", arch="llama", children=2, tie_word_embeddings=True)
    assert "lm_head.weight" not in load_state(fam["base"])
    out = run({"merge_method": "linear",
               "models": [{"model": str(fam["c0"]), "parameters": {"weight": 1.0}},
                          {"model": str(fam["c1"]), "parameters": {"weight": 1.0}}]}, tmp_path / "o")
    assert "lm_head.weight" not in out
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_tied_and_untied_inputs_merge_head_from_embedding(tmp_path):
    untied = build_model(tmp_path / "untied", seed=1)
    tied = build_model(tmp_path / "tied", seed=2, tie_word_embeddings=True)
    out = run({"merge_method": "linear",
               "models": [{"model": str(untied), "parameters": {"weight": 1.0}},
                          {"model": str(tied), "parameters": {"weight": 1.0}}]}, tmp_path / "o")
    u, t = load_state(untied), load_state(tied)
    torch.testing.assert_close(out["lm_head.weight"],
                               (u["lm_head.weight"] + t["model.embed_tokens.weight"]) / 2)


def test_sharded_output_with_index_and_config_files(family, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = {"merge_method": "linear", "models": [
        {"model": str(family["c0"]), "parameters": {"weight": 1.0}},
        {"model": str(family["c1"]), "parameters": {"weight": 1.0}}]}
    out = run(cfg, tmp_path / "o", out_shard_size=40_000)
    shards = sorted((tmp_path / "o").glob("model-*.safetensors"))
    assert len(shards) > 1
    index = json.loads((tmp_path / "o" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(out)
    for name in ("tokenizer.json", "generation_config.json", "README.md", "mergekit_config.yml"):
        assert (tmp_path / "o" / name).is_file(), name
    assert yaml.safe_load((tmp_path / "o" / "mergekit_config.yml").read_text()) == \
        MergeConfig.from_dict(cfg).to_dict()
    card = (tmp_path / "o" / "README.md").read_text()
    assert card.startswith("---\n") and "merge" in card and "linear" in card
    AutoModelForCausalLM.from_pretrained(tmp_path / "o")


def test_in_memory_merge_is_bit_identical_to_disk(family, tmp_path):
    cfg = MergeConfig.from_dict({
        "merge_method": "ties", "base_model": str(family["base"]), "dtype": "bfloat16",
        "models": [{"model": str(family["c0"]), "parameters": {"weight": 0.6, "density": 0.3}},
                   {"model": str(family["c1"]), "parameters": {"weight": [0.1, 0.9], "density": 0.7}}]})
    merge_to_folder(cfg, tmp_path / "o", MergeOptions(quiet=True))
    disk = load_state(tmp_path / "o")
    merger = InMemoryMerger()
    mem = merger.merge_state(cfg)
    assert set(mem) == set(disk)
    for k in disk:
        assert torch.equal(mem[k], disk[k]), k
    model = merger.build_model(cfg)
    params = dict(model.named_parameters())
    for k in disk:
        assert torch.equal(params[k].data, disk[k]), k


def test_pickle_checkpoints_load_with_weights_only(family, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(family["c0"])
    bin_dir = tmp_path / "bin"
    model.save_pretrained(bin_dir, safe_serialization=False) if _supports_bin() else \
        _save_bin(model, bin_dir)
    out = run({"merge_method": "linear",
               "models": [{"model": str(bin_dir), "parameters": {"weight": 1.0}},
                          {"model": str(family["c1"]), "parameters": {"weight": 1.0}}]}, tmp_path / "o")
    a, b = states(family, "c0", "c1")
    for k in a:
        torch.testing.assert_close(out[k], (a[k] + b[k]) / 2, rtol=1e-5, atol=1e-6)


def _supports_bin() -> bool:
    import inspect

    from transformers import PreTrainedModel

    return "safe_serialization" in inspect.signature(PreTrainedModel.save_pretrained).parameters


def _save_bin(model, folder):
    folder.mkdir()
    model.config.save_pretrained(folder)
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, folder / "pytorch_model.bin")


def test_failed_merge_leaves_no_output_folder(family, tmp_path):
    cfg = {"merge_method": "linear", "models": [
        {"model": str(family["c0"]), "parameters": {"weight": [1.0, 1.0, -1.0]}},
        {"model": str(family["c1"]), "parameters": {"weight": [-1.0, -1.0, 1.0]}}]}
    with pytest.raises(EvomergeError, match="sum to zero"):
        run(cfg, tmp_path / "o")
    assert not (tmp_path / "o").exists()
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_overwrite_replaces_existing_output(family, tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "old.txt").write_text("x")
    cfg = {"merge_method": "linear", "models": [{"model": str(family["c0"]), "parameters": {"weight": 1}}]}
    with pytest.raises(EvomergeError, match="not empty"):
        run(cfg, tmp_path / "o")
    assert (tmp_path / "o" / "old.txt").exists()
    run(cfg, tmp_path / "o", overwrite=True)
    assert not (tmp_path / "o" / "old.txt").exists() and (tmp_path / "o" / "model.safetensors").exists()


def test_hub_ids_resolve_offline_from_a_populated_cache(family, tmp_path, monkeypatch):
    """A hub id (with @revision) is read from the Hugging Face cache when offline; the model card
    names it as base_model."""
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--someorg--tiny-base"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in family["base"].iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = {"merge_method": "task_arithmetic", "base_model": "someorg/tiny-base@main",
           "models": [{"model": str(family["c0"]), "parameters": {"weight": 1.0}}]}
    out = run(cfg, tmp_path / "o")
    (c0,) = states(family, "c0")
    for k in c0:
        torch.testing.assert_close(out[k], c0[k])
    front = (tmp_path / "o" / "README.md").read_text().split("---")[1]
    assert yaml.safe_load(front)["base_model"] == ["someorg/tiny-base"]
    assert "merge" in yaml.safe_load(front)["tags"]
    cfg["base_model"] = "someorg/not-cached"
    with pytest.raises(EvomergeError, match="base_model.*not-cached.*cache"):
        run(cfg, tmp_path / "o2")


def test_tied_reference_with_untied_input_keeps_a_real_head(tmp_path):
    from transformers import AutoModelForCausalLM

    tied = build_model(tmp_path / "tied", seed=2, tie_word_embeddings=True)
    untied = build_model(tmp_path / "untied", seed=1)
    out = run({"merge_method": "linear",
               "models": [{"model": str(tied), "parameters": {"weight": 1.0}},
                          {"model": str(untied), "parameters": {"weight": 3.0}}]}, tmp_path / "o")
    t, u = load_state(tied), load_state(untied)
    torch.testing.assert_close(out["lm_head.weight"],
                               (t["model.embed_tokens.weight"] + 3 * u["lm_head.weight"]) / 4)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    torch.testing.assert_close(model.lm_head.weight.data, out["lm_head.weight"])
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


def test_no_kernel_modifies_its_inputs():
    """Inputs can be views of a memory map or of the in-memory cache: a kernel that writes to them
    corrupts every later read (e.g. a tied head re-reading its embedding)."""
    from merge.methods import METHODS, MergeInputs

    g = torch.Generator().manual_seed(0)
    for name, method in sorted(METHODS.items()):
        n = method.min_models if method.max_models == method.min_models else max(2, method.min_models)
        tensors = [torch.randn(64, 48, generator=g) for _ in range(n)]
        base = torch.randn(64, 48, generator=g) if method.takes_base else None
        model_params, params = [{} for _ in tensors], {}
        for p in method.params.values():
            value = p.default if not p.required else 0.5
            if p.per_model:
                for mp in model_params:
                    mp[p.name] = value
            else:
                params[p.name] = value
        before = [t.clone() for t in tensors] + ([base.clone()] if base is not None else [])
        method.kernel(MergeInputs("model.layers.0.mlp.up_proj.weight", tensors, base, model_params,
                                  params, seed=0, out_dtype=torch.float32))
        after = tensors + ([base] if base is not None else [])
        for b, a in zip(before, after):
            assert torch.equal(a, b), f"{name} modified an input"
