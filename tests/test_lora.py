"""LoRA: extraction by truncated SVD (checked against Eckart–Young and peft), and `base+adapter` inputs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from merge.config import MergeConfig
from merge.engine import MergeOptions, merge_to_folder
from merge.lora_extract import run as extract
from merge.sources import ModelSource
from tinymodels import build_model, load_state, make_tokenizer, perturb

BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = build_model(root / "base", seed=0)
    return {"root": root, "base": base, "ft": perturb(base, root / "ft", seed=21),
            "other": perturb(base, root / "other", seed=22)}


def peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """What peft itself makes of base + adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    return {k: v.detach() for k, v in model.merge_and_unload().state_dict().items()}


def singular_values(ft, base, name) -> torch.Tensor:
    delta = (ft[name].double() - base[name].double())
    return torch.linalg.svdvals(delta)


def one_line_error(r, *needles):
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, \
        r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


# --- extraction ------------------------------------------------------------------------------------

def test_full_rank_extraction_reproduces_the_finetune_in_peft(models, tmp_path):
    out = tmp_path / "adapter"
    r = subprocess.run([BIN / "mergekit-extract-lora", "--model", models["ft"], "--base-model",
                        models["base"], "--out-path", out, "--max-rank", "32",
                        "--exclude", r"k_proj|v_proj", "-q"],
                       capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and "model.embed_tokens" in config["target_modules"]
    assert not any("k_proj" in m for m in config["target_modules"])
    merged = peft_merged(models["base"], out)
    ft, base = load_state(models["ft"]), load_state(models["base"])
    for name, want in ft.items():
        if "k_proj" in name or "v_proj" in name:     # excluded: stays the base's
            assert torch.equal(merged[name], base[name])
        else:                                         # full rank (32 ≥ rank Δ): exact; norms saved
            torch.testing.assert_close(merged[name], want, rtol=0, atol=2e-6)


def test_truncated_rank_error_is_what_eckart_young_predicts(models, tmp_path):
    summary = extract(str(models["ft"]), str(models["base"]), str(tmp_path / "a"), max_rank=8)
    merged = peft_merged(models["base"], tmp_path / "a")
    ft, base = load_state(models["ft"]), load_state(models["base"])
    checked = 0
    for name in ft:
        module = name.rsplit(".", 1)[0]
        if module not in summary:
            continue
        s = singular_values(ft, base, name)
        predicted = float(s[8:].pow(2).sum().sqrt())          # √(sum of dropped σ²)
        actual = float((merged[name].double() - ft[name].double()).norm())
        assert predicted > 0.05
        assert actual == pytest.approx(predicted, rel=1e-4), name
        assert summary[module] == (8, pytest.approx(predicted, rel=1e-4))
        checked += 1
    assert checked == 4 * 7 + 2   # every linear layer, the embedding and the head


def test_singular_value_threshold_gives_per_module_ranks(models, tmp_path):
    summary = extract(str(models["ft"]), str(models["base"]), str(tmp_path / "a"), max_rank=16,
                      sv_threshold=0.55, include=(r"layers\.[01]\.", r"embed"))
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["rank_pattern"] and len({r for r, _ in summary.values()}) > 1
    assert all(m.startswith(("model.layers.0.", "model.layers.1.", "model.embed"))
               for m in config["target_modules"])
    merged = peft_merged(models["base"], tmp_path / "a")
    ft, base = load_state(models["ft"]), load_state(models["base"])
    for module, (rank, _) in summary.items():
        s = singular_values(ft, base, module + ".weight")
        assert rank == min(16, int((s > 0.55 * s[0]).sum()))
        actual = float((merged[module + ".weight"].double() - ft[module + ".weight"].double()).norm())
        assert actual == pytest.approx(float(s[rank:].pow(2).sum().sqrt()), rel=1e-4)


def test_conv1d_layers_biases_and_layernorms_round_trip(tmp_path):
    """GPT-2: Conv1D weights (fan_in_fan_out), biased layers, LayerNorms with bias, position embeddings."""
    base = build_model(tmp_path / "base", arch="gpt2", seed=0)
    ft = perturb(base, tmp_path / "ft", seed=4)
    extract(str(ft), str(base), str(tmp_path / "a"), max_rank=32)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] and config["bias"] == "lora_only"
    merged = peft_merged(base, tmp_path / "a")
    src = ModelSource.open(f"{base}+{tmp_path / 'a'}")
    for name, want in load_state(ft).items():
        torch.testing.assert_close(merged[name], want, rtol=0, atol=2e-6)
        torch.testing.assert_close(src.read(name), want, rtol=0, atol=2e-6)


def test_no_embeddings_and_no_modules_to_save(models, tmp_path):
    extract(str(models["ft"]), str(models["base"]), str(tmp_path / "a"), max_rank=4,
            embeddings=False, modules_to_save=False)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert "model.embed_tokens" not in config["target_modules"] and "lm_head" in config["target_modules"]
    assert config["modules_to_save"] is None


def test_max_rank_is_capped_per_module(models, tmp_path, capsys):
    """As the reference: rank = min(max_rank, what the module allows); k/v (16 × 32) get 16."""
    from merge.lora_extract import cli

    with pytest.raises(SystemExit) as exit_info:   # in-process: the CLI path, without the imports
        cli.main(["--model", str(models["ft"]), "--base-model", str(models["base"]),
                  "--out-path", str(tmp_path / "a"), "--max-rank", "24"])
    assert exit_info.value.code == 0, capsys.readouterr().err
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["r"] == 24
    assert config["rank_pattern"]["model\\.layers\\.0\\.self_attn\\.k_proj"] == 16
    merged = peft_merged(models["base"], tmp_path / "a")
    ft = load_state(models["ft"])
    torch.testing.assert_close(merged["model.layers.2.self_attn.v_proj.weight"],
                               ft["model.layers.2.self_attn.v_proj.weight"], rtol=0, atol=2e-6)


def test_reference_command_line_flags(models, tmp_path, capsys):
    """The reference's flags: --no-embed-lora saves embedding and head whole, *-regex selects,
    --sv-epsilon is absolute, --no-distribute-scale puts Σ into lora_A (same product)."""
    from merge.lora_extract import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--model", str(models["ft"]), "--base-model", str(models["base"]),
                  "--out-path", str(tmp_path / "a"), "--max-rank", "64", "--no-embed-lora",
                  "--exclude-regex", r"layers\.3\.mlp", "--sv-epsilon", "1e-9",
                  "--no-distribute-scale", "-q"])
    assert exit_info.value.code == 0, capsys.readouterr().err
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert {"model.embed_tokens", "lm_head"} <= set(config["modules_to_save"])
    assert not {"model.embed_tokens", "lm_head"} & set(config["target_modules"])
    assert not any("layers.3.mlp" in m for m in config["target_modules"])
    adapter = load_state(tmp_path / "a")
    b = adapter["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    torch.testing.assert_close(b.T @ b, torch.eye(b.shape[1]), atol=1e-5, rtol=0)  # B = U
    merged, ft, base = peft_merged(models["base"], tmp_path / "a"), load_state(models["ft"]), \
        load_state(models["base"])
    for name, want in ft.items():
        expect = base[name] if "layers.3.mlp" in name else want
        torch.testing.assert_close(merged[name], expect, rtol=0, atol=2e-6)


# --- every head style: PEFT unmerged, PEFT merged and base+adapter reproduce the fine-tune -----

HEADS = {"untied": ("llama", {}), "tied-llama": ("llama", {"tie_word_embeddings": True}),
         "tied-qwen2": ("qwen2", {"tie_word_embeddings": True}), "gemma": ("gemma", {}),
         "gpt2": ("gpt2", {}), "gpt_neox": ("gpt_neox", {})}


@pytest.mark.parametrize("style", list(HEADS))
def test_full_rank_adapter_reproduces_the_finetune_three_ways(style, tmp_path):
    import warnings

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    arch, overrides = HEADS[style]
    base = build_model(tmp_path / "base", arch=arch, seed=0, **overrides)
    ft = perturb(base, tmp_path / "ft", seed=8)
    extract(str(ft), str(base), str(tmp_path / "a"), max_rank=64)
    ids = torch.randint(4, 124, (2, 12), generator=torch.Generator().manual_seed(0))

    def logits(model):
        with torch.no_grad():
            return model.eval()(ids).logits

    want = logits(AutoModelForCausalLM.from_pretrained(ft))
    with warnings.catch_warnings():      # peft warns about adapters on tied models
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base),
                                               tmp_path / "a")
        unmerged = logits(peft_model)
        merged = logits(peft_model.merge_and_unload())
    cfg = {"merge_method": "passthrough", "models": [{"model": f"{base}+{tmp_path / 'a'}"}]}
    merge_to_folder(MergeConfig.from_dict(cfg), tmp_path / "ours", MergeOptions(quiet=True))
    ours = logits(AutoModelForCausalLM.from_pretrained(tmp_path / "ours"))
    assert float((want - logits(AutoModelForCausalLM.from_pretrained(base))).abs().max()) > 1e-2
    for how, got in (("peft unmerged", unmerged), ("peft merged", merged), ("base+adapter", ours)):
        delta = float((got - want).abs().max())
        assert delta < 1e-5, (style, how, delta)


def test_gpt_neox_head_is_extracted_and_can_be_included(tmp_path):
    base = build_model(tmp_path / "base", arch="gpt_neox", seed=0)
    ft = perturb(base, tmp_path / "ft", seed=8)
    # transformers loads the checkpoint's embed_out as the module lm_head; either name selects it
    for pattern in ("embed_out", "lm_head"):
        summary = extract(str(ft), str(base), str(tmp_path / pattern), max_rank=4,
                          include=(pattern,))
        assert list(summary) == ["lm_head"]
        keys = set(load_state(tmp_path / pattern))
        assert keys == {"base_model.model.lm_head.lora_A.weight",
                        "base_model.model.lm_head.lora_B.weight"}


# --- base+adapter inputs ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def peft_adapter(models):
    """A peft adapter with every feature a reader must honour, and peft's own merge of it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(models["base"])
    cfg = LoraConfig(r=4, lora_alpha=8, use_rslora=True, init_lora_weights=False,
                     target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens", "lm_head"],
                     rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3},
                     modules_to_save=["post_attention_layernorm"])
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.1)
    adapter = models["root"] / "peft_adapter"
    peft_model.save_pretrained(adapter)
    premerged = models["root"] / "premerged"
    peft_model.merge_and_unload().save_pretrained(premerged)
    make_tokenizer().save_pretrained(premerged)
    return adapter, premerged


def test_lora_reference_reads_like_the_premerged_model(models, peft_adapter):
    adapter, premerged = peft_adapter
    src = ModelSource.open(f"{models['base']}+{adapter}")
    want = load_state(premerged)
    assert set(src.tensors) == set(want)
    for name, t in want.items():
        torch.testing.assert_close(src.read(name), t, rtol=0, atol=1e-6)
    assert not torch.equal(want["model.layers.0.self_attn.v_proj.weight"],
                           load_state(models["base"])["model.layers.0.self_attn.v_proj.weight"])


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_lora_reference_merges_like_the_premerged_model(models, peft_adapter, tmp_path, method):
    adapter, premerged = peft_adapter

    def config(ref):
        cfg = {"merge_method": method,
               "models": [{"model": ref, "parameters": {"weight": 0.7}},
                          {"model": str(models["other"]), "parameters": {"weight": 0.3}}]}
        if method == "task_arithmetic":
            cfg["base_model"] = str(models["base"])
        return MergeConfig.from_dict(cfg)

    merge_to_folder(config(f"{models['base']}+{adapter}"), tmp_path / "a", MergeOptions(quiet=True))
    merge_to_folder(config(str(premerged)), tmp_path / "b", MergeOptions(quiet=True))
    a, b = load_state(tmp_path / "a"), load_state(tmp_path / "b")
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)


def test_extracted_adapter_is_a_valid_input(models, tmp_path):
    extract(str(models["ft"]), str(models["base"]), str(tmp_path / "a"), max_rank=6)
    src = ModelSource.open(f"{models['base']}+{tmp_path / 'a'}")
    for name, t in peft_merged(models["base"], tmp_path / "a").items():
        torch.testing.assert_close(src.read(name), t, rtol=0, atol=2e-6)


def test_peft_head_lora_on_a_tied_base_updates_the_shared_matrix(tmp_path):
    """A peft adapter on lm_head of a tied model: merge_and_unload adds it to the one matrix."""
    import warnings

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from merge.errors import EvomergeError

    base = build_model(tmp_path / "base", tie_word_embeddings=True)
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                               LoraConfig(r=4, target_modules=["q_proj", "lm_head"],
                                          init_lora_weights=False))
        model.save_pretrained(tmp_path / "a")
        merged = {k: v.detach() for k, v in model.merge_and_unload().state_dict().items()}
    src = ModelSource.open(f"{base}+{tmp_path / 'a'}")
    assert "lm_head.weight" not in src.tensors
    emb = src.read("model.embed_tokens.weight")
    torch.testing.assert_close(emb, merged["lm_head.weight"], rtol=0, atol=1e-6)
    assert not torch.equal(emb, load_state(base)["model.embed_tokens.weight"])
    # A trained head copy (modules_to_save) would untie the model: refused, not dropped.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                               LoraConfig(r=4, target_modules=["q_proj"],
                                          modules_to_save=["lm_head"]))
        model.save_pretrained(tmp_path / "b")
    with pytest.raises(EvomergeError, match="ties its head to the embedding"):
        ModelSource.open(f"{base}+{tmp_path / 'b'}")


def mergekit_yaml(tmp_path, ref):
    cfg = {"merge_method": "linear", "models": [{"model": ref, "parameters": {"weight": 1.0}}]}
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    return subprocess.run([sys.executable, "-m", "merge", tmp_path / "c.yml", tmp_path / "out"],
                          capture_output=True, text=True, timeout=300, env=ENV)


def test_bad_adapter_without_config(models, peft_adapter, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_model.safetensors").write_bytes(
        (peft_adapter[0] / "adapter_model.safetensors").read_bytes())
    one_line_error(mergekit_yaml(tmp_path, f"{models['base']}+{broken}"),
                   "models[0].model", "adapter_config.json")
    one_line_error(mergekit_yaml(tmp_path, f"{models['base']}+{tmp_path / 'nowhere'}"),
                   "does not exist")


def test_bad_adapter_for_another_base(models, tmp_path):
    wide = build_model(tmp_path / "wide", hidden_size=48)
    extract(str(perturb(wide, tmp_path / "wide_ft", seed=1)), str(wide), str(tmp_path / "a"),
            max_rank=2)
    one_line_error(mergekit_yaml(tmp_path, f"{models['base']}+{tmp_path / 'a'}"),
                   "models[0].model", "another base model")
    assert not (tmp_path / "out").exists()
