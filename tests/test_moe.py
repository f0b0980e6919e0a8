"""mergekit-moe: dense experts → a native transformers MoE (Mixtral, Qwen2-MoE, PhiMoE), on tiny models."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from merge.engine import MergeOptions
from merge.moe.build import build_moe
from merge.moe.config import MoEConfig
from tinymodels import build_model, load_state, perturb

BIN = Path(sys.executable).parent
OUTPUTS = {"llama": ("mixtral", "MixtralForCausalLM"), "mistral": ("mixtral", "MixtralForCausalLM"),
           "qwen2": ("qwen2_moe", "Qwen2MoeForCausalLM"), "phi3": ("phimoe", "PhimoeForCausalLM"),
           "qwen3": ("qwen3_moe", "Qwen3MoeForCausalLM")}
DOWN_SCALE = {"qwen2": 0.5, "phi3": 0.5}
PROMPTS = [(["w1 w2 w3", "w4 w5"], []),
           (["w40 w41 w42"], ["w1 w2"]),
           (["w90 w91", "w99 w100 w101"], [])]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: one thread is faster, and immune to a busy machine's thread contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """Per architecture: a base and three fine-tuned-looking experts (built lazily, once)."""
    root = tmp_path_factory.mktemp("moe")
    made: dict[str, dict[str, Path]] = {}

    def get(arch: str) -> dict[str, Path]:
        if arch not in made:
            base = build_model(root / arch / "base", arch=arch, seed=0)
            models = {"base": base}
            for i in range(3):
                models[f"e{i}"] = perturb(base, root / arch / f"e{i}", seed=10 + i, scale=0.05)
            made[arch] = models
        return made[arch]

    return get


def moe_config(models, gate_mode="hidden", k=2, **extra) -> dict:
    experts = [{"source_model": str(models[f"e{i}"]), "positive_prompts": pos,
                "negative_prompts": neg} for i, (pos, neg) in enumerate(PROMPTS)]
    return {"base_model": str(models["base"]), "gate_mode": gate_mode, "experts_per_token": k,
            "experts": experts, **extra}


def build(cfg: dict, out: Path, **opts) -> Path:
    return build_moe(MoEConfig.from_dict(cfg), out, MergeOptions(quiet=True, **opts))


def load(out: Path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info   # no missing, unexpected or mismatched tensors
    return model.eval()


def dense_mlp(state: dict, layer: int, arch: str):
    p = f"model.layers.{layer}.mlp."
    if arch == "phi3":
        gate, up = state[p + "gate_up_proj.weight"].chunk(2, dim=0)
    else:
        gate, up = state[p + "gate_proj.weight"], state[p + "up_proj.weight"]
    return gate, up, state[p + "down_proj.weight"]


def router(layer_module):
    mlp = layer_module.mlp
    return (mlp.router if hasattr(mlp, "router") else mlp.gate).weight


def mlp_input_mean(model, layer: int, prompts: list[str], tokenizer) -> torch.Tensor:
    """Mean over tokens (then prompts) of what the MLP of `layer` receives, from `model` itself."""
    seen = []
    hook = model.model.layers[layer].mlp.register_forward_pre_hook(
        lambda mod, args: seen.append(args[0].reshape(-1, args[0].shape[-1]).mean(0)))
    try:
        with torch.no_grad():
            for p in prompts:
                model(input_ids=torch.tensor([tokenizer(p)["input_ids"]]))
    finally:
        hook.remove()
    return torch.stack(seen).mean(0)


# --- each output architecture -------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3", "qwen3"])
def test_moe_loads_in_transformers_with_source_experts(arch, dense, tmp_path):
    models = dense(arch)
    out = build(moe_config(models), tmp_path / "moe")
    model = load(out)
    model_type, cls = OUTPUTS[arch]
    assert type(model).__name__ == cls and model.config.model_type == model_type
    n_experts = model.config.num_experts if arch.startswith("qwen") else \
        model.config.num_local_experts
    assert n_experts == 3 and model.config.num_experts_per_tok == 2

    base = load_state(models["base"])
    experts = [load_state(models[f"e{i}"]) for i in range(3)]
    for layer in range(model.config.num_hidden_layers):
        block = model.model.layers[layer]
        fused = block.mlp.experts
        for e, state in enumerate(experts):   # experts' MLPs are copied exactly
            gate, up, down = dense_mlp(state, layer, arch)
            assert torch.equal(fused.gate_up_proj[e], torch.cat([gate, up]))
            # ... but for PhiMoE's two weights of 1 and Qwen2-MoE's ½ shared gate: down × ½
            assert torch.equal(fused.down_proj[e], down * DOWN_SCALE.get(arch, 1.0))
        rows = router(block).detach()
        assert rows.shape == (3, 32)
        torch.testing.assert_close(rows.norm(dim=-1), torch.ones(3))
        assert torch.cdist(rows, rows).masked_fill(torch.eye(3, dtype=torch.bool), 1).min() > 1e-3
        # Attention comes from the base (Phi-3's fused qkv is split into q, k, v).
        attn = block.self_attn
        q, k, v = attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight
        key = f"model.layers.{layer}.self_attn."
        if arch == "phi3":
            assert torch.equal(torch.cat([q, k, v]), base[key + "qkv_proj.weight"])
            assert torch.equal(block.input_layernorm.bias, torch.zeros(32))
        else:
            assert torch.equal(q, base[key + "q_proj.weight"])
        assert torch.equal(attn.o_proj.weight, base[key + "o_proj.weight"])
        if arch == "qwen2":   # default shared expert: the base's own MLP, gate 0 (sigmoid = ½)
            gate, up, down = dense_mlp(base, layer, arch)
            assert torch.equal(block.mlp.shared_expert.down_proj.weight, down)
            assert torch.equal(block.mlp.shared_expert.gate_proj.weight, gate)
            assert not block.mlp.shared_expert_gate.weight.any()
    assert torch.equal(model.model.embed_tokens.weight, base["model.embed_tokens.weight"])

    # The checkpoint uses exactly the tensor names transformers itself writes for this class.
    model.save_pretrained(tmp_path / "resaved")
    assert set(load_state(tmp_path / "resaved")) == set(load_state(out))
    generated = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=6, do_sample=False)
    assert generated.shape == (1, 9)


# Every output type, dense model → MoE: the output architecture each dense type becomes.
IDENTICAL = [("llama", "mixtral"), ("mistral", "mixtral"), ("qwen2", "qwen2_moe"),
             ("qwen3", "qwen3_moe"), ("phi3", "phimoe")]


def test_every_output_type_has_an_identical_experts_check():
    from merge.moe.layouts import LAYOUTS

    assert {t for _, t in IDENTICAL} == set(LAYOUTS)
    assert {a for a, _ in IDENTICAL} == {a for lay in LAYOUTS.values() for a in lay.inputs}


def norms_as_layernorm(model) -> None:
    """PhiMoE normalises with LayerNorm where Phi-3 uses RMSNorm (no mean subtraction): the one
    change the output architecture itself forces. Swap it into the dense model for comparison."""
    for name, child in list(model.named_children()):
        if type(child).__name__.endswith("RMSNorm"):
            ln = torch.nn.LayerNorm(child.weight.shape[0], eps=child.variance_epsilon)
            with torch.no_grad():
                ln.weight.copy_(child.weight)
                ln.bias.zero_()
            setattr(model, name, ln)
        else:
            norms_as_layernorm(child)


def identical_experts_delta(arch: str, models, out: Path, gate_mode="random") -> float:
    """max |Δ logits| between the dense base and an MoE of three copies of it."""
    from transformers import AutoModelForCausalLM

    base = str(models["base"])
    prompts = [(["w1 w2 w3"], []), (["w40 w41"], []), (["w90 w91 w92"], [])]
    cfg = {"base_model": base, "gate_mode": gate_mode, "experts_per_token": 2,
           "experts": [{"source_model": base, "positive_prompts": pos} for pos, _ in prompts]}
    moe = load(build(cfg, out, random_seed=0))
    dense_model = AutoModelForCausalLM.from_pretrained(base).eval()
    if arch == "phi3":
        norms_as_layernorm(dense_model)
    ids = torch.randint(4, 124, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return float((moe(ids).logits - dense_model(ids).logits).abs().max())


@pytest.mark.parametrize("arch, out_type", IDENTICAL)
def test_identical_experts_reproduce_the_dense_model(arch, out_type, dense, tmp_path):
    """The routing weights' sum is compensated exactly (PhiMoE: two weights of 1; Qwen2-MoE: the
    ½ of its unprompted shared expert), so copies of one MLP behind any router are that MLP."""
    delta = identical_experts_delta(arch, dense(arch), tmp_path / "moe")
    assert delta < 1e-5, (arch, out_type, delta)


def test_identical_experts_with_hidden_gates_phimoe(dense, tmp_path):
    # Prompt-built gates route differently from random ones; the compensation does not care.
    assert identical_experts_delta("phi3", dense("phi3"), tmp_path / "moe", "hidden") < 1e-5


def test_hidden_gates_point_at_each_experts_prompts(dense, tmp_path):
    from transformers import PreTrainedTokenizerFast

    models = dense("mistral")
    out = build(moe_config(models), tmp_path / "moe")
    model = load(out)
    tok = PreTrainedTokenizerFast.from_pretrained(out)
    rows = router(model.model.layers[0]).detach()
    # Layer 0's MLP input depends only on the base's embeddings and attention, so the MoE itself
    # reproduces the activations the gates were built from.
    for e, (pos, neg) in enumerate(PROMPTS):
        want = mlp_input_mean(model, 0, pos, tok)
        if neg:
            want = want - mlp_input_mean(model, 0, neg, tok)
        torch.testing.assert_close(rows[e], want / want.norm(), rtol=1e-4, atol=1e-5)
    # Without negative prompts, each expert's own prompts score highest on its own gate.
    for e in (0, 2):
        scores = rows @ mlp_input_mean(model, 0, PROMPTS[e][0], tok)
        assert int(scores.argmax()) == e
    # Deeper layers get their own gates.
    assert not torch.allclose(router(model.model.layers[2]), rows)


def test_cheap_embed_gates_are_mean_prompt_embeddings(dense, tmp_path):
    from transformers import PreTrainedTokenizerFast

    models = dense("llama")
    out = build(moe_config(models, gate_mode="cheap_embed"), tmp_path / "moe")
    model = load(out)
    tok = PreTrainedTokenizerFast.from_pretrained(out)
    emb = load_state(models["base"])["model.embed_tokens.weight"]

    def mean(prompts):
        return torch.stack([emb[tok(p)["input_ids"]].mean(0) for p in prompts]).mean(0)

    for e, (pos, neg) in enumerate(PROMPTS):
        want = mean(pos) - (mean(neg) if neg else 0)
        for layer in model.model.layers:
            torch.testing.assert_close(router(layer)[e].detach(), want / want.norm())


def test_random_gates_are_seeded_unit_rows(dense, tmp_path):
    models = dense("llama")
    cfg = moe_config(models, gate_mode="random", k=1)
    a = load_state(build(cfg, tmp_path / "a", random_seed=7))
    b = load_state(build(cfg, tmp_path / "b", random_seed=7))
    c = load_state(build(cfg, tmp_path / "c", random_seed=8))
    key = "model.layers.1.block_sparse_moe.gate.weight"
    assert torch.equal(a[key], b[key]) and not torch.equal(a[key], c[key])
    torch.testing.assert_close(a[key].norm(dim=-1), torch.ones(3))


def test_uniform_random_gates_and_expert_residual_and_noise_scales(dense, tmp_path):
    """Keys the reference accepts on every expert: residual_scale (× down_proj) and noise_scale
    (Gaussian noise of that σ on the expert's MLP weights, seeded by --random-seed)."""
    models = dense("llama")
    cfg = moe_config(models, gate_mode="uniform_random")
    cfg["experts"][0]["residual_scale"] = 0.25
    cfg["experts"][1]["noise_scale"] = 0.01
    a = load_state(build(cfg, tmp_path / "a", random_seed=3))
    b = load_state(build(cfg, tmp_path / "b", random_seed=3))
    e0, e1 = load_state(models["e0"]), load_state(models["e1"])
    p = "model.layers.2.block_sparse_moe."
    gate = a[p + "gate.weight"]
    assert gate.abs().max() <= 32 ** -0.5 and torch.equal(gate, b[p + "gate.weight"])
    assert gate.std() > 0.5 * 32 ** -0.5 / 3 ** 0.5     # uniform, not unit rows
    torch.testing.assert_close(a[p + "experts.0.w2.weight"],
                               0.25 * e0["model.layers.2.mlp.down_proj.weight"])
    assert torch.equal(a[p + "experts.0.w1.weight"], e0["model.layers.2.mlp.gate_proj.weight"])
    noise = a[p + "experts.1.w3.weight"] - e1["model.layers.2.mlp.up_proj.weight"]
    assert 0.008 < float(noise.std()) < 0.012
    assert torch.equal(a[p + "experts.1.w3.weight"], b[p + "experts.1.w3.weight"])
    other = a["model.layers.1.block_sparse_moe.experts.1.w3.weight"] - \
        e1["model.layers.1.mlp.up_proj.weight"]
    assert not torch.allclose(noise, other)              # every tensor its own draw


def test_qwen2_designated_shared_expert_with_prompts_and_scale(dense, tmp_path):
    models = dense("qwen2")
    shared = {"source_model": str(models["e2"]), "positive_prompts": ["w60 w61"],
              "residual_scale": 0.5}
    out = build(moe_config(models, shared_experts=[shared], dtype="float32"), tmp_path / "moe")
    model = load(out)
    assert model.config.shared_expert_intermediate_size == 64
    e2, e0 = load_state(models["e2"]), load_state(models["e0"])
    for i, layer in enumerate(model.model.layers):
        # A prompted shared gate varies per token: the routed experts are not rescaled.
        assert torch.equal(layer.mlp.experts.down_proj[0], dense_mlp(e0, i, "qwen2")[2])
        gate, up, down = dense_mlp(e2, i, "qwen2")
        torch.testing.assert_close(layer.mlp.shared_expert.down_proj.weight, 0.5 * down)
        assert torch.equal(layer.mlp.shared_expert.up_proj.weight, up)
        torch.testing.assert_close(layer.mlp.shared_expert_gate.weight.norm(), torch.tensor(1.0))


def test_cli_builds_and_writes_config_copy(dense, tmp_path):
    models = dense("llama")
    cfg_path = tmp_path / "moe.yml"
    cfg_path.write_text(yaml.safe_dump(moe_config(models, dtype="bfloat16")))
    r = subprocess.run([BIN / "mergekit-moe", cfg_path, tmp_path / "out", "-q",
                        "--i-understand-this-is-not-useful-without-training"],
                       capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr
    state = load_state(tmp_path / "out")
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    assert yaml.safe_load((tmp_path / "out" / "mergekit_moe_config.yml").read_text())["experts"]


def test_architecture_key_takes_our_names_and_the_references():
    from merge.errors import EvomergeError
    from merge.moe.layouts import layout_for

    assert layout_for("qwen2", "qwen").model_type == "qwen2_moe"       # reference: "Qwen MoE"
    assert layout_for("qwen3", "Qwen3").model_type == "qwen3_moe"      # "Qwen3 MoE"
    assert layout_for("qwen3", "qwen3_moe").model_type == "qwen3_moe"
    assert layout_for("mistral", "MIXTRAL").model_type == "mixtral"
    with pytest.raises(EvomergeError, match="becomes qwen2_moe, not mixtral"):
        layout_for("qwen2", "mixtral")
    with pytest.raises(EvomergeError, match="unknown output 'deepseek'"):
        layout_for("llama", "deepseek")


def test_example_configs_parse():
    examples = sorted((Path(__file__).parents[1] / "configs" / "moe").glob("*.yml"))
    assert len(examples) >= 3
    for path in examples:
        MoEConfig.from_dict(yaml.safe_load(path.read_text()))


# --- bad inputs: one line, exit code 2 ------------------------------------------------------------

def run_cli(tmp_path, cfg: dict):
    path = tmp_path / "bad.yml"
    path.write_text(yaml.safe_dump(cfg))
    return subprocess.run([BIN / "mergekit-moe", path, tmp_path / "out"], capture_output=True,
                          text=True, timeout=300, env=ENV)


def assert_one_line_error(r, *needles):
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_bad_experts_per_token(dense, tmp_path):
    assert_one_line_error(run_cli(tmp_path, moe_config(dense("llama"), k=4)),
                          "experts_per_token", "at most 3")


def test_bad_identical_prompts(dense, tmp_path):
    cfg = moe_config(dense("llama"))
    for e in cfg["experts"]:
        e["positive_prompts"], e["negative_prompts"] = ["w1 w2"], []
    assert_one_line_error(run_cli(tmp_path, cfg), "experts", "same prompts")


def test_bad_prompts_that_tokenize_alike(dense, tmp_path, capsys):
    from merge.moe.cli import cli

    cfg = moe_config(dense("llama"))
    for e, words in zip(cfg["experts"], ("math", "code", "poems")):   # all <unk> to this tokenizer
        e["positive_prompts"], e["negative_prompts"] = [words], []
    (tmp_path / "bad.yml").write_text(yaml.safe_dump(cfg))
    # In-process (the base model runs, so a subprocess would mostly time imports).
    with pytest.raises(SystemExit) as exit_info:
        cli.main([str(tmp_path / "bad.yml"), str(tmp_path / "out")], prog_name="mergekit-moe")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert_one_line_error(subprocess.CompletedProcess([], 2, "", err), "same hidden gate",
                          "tokenize")
    assert not (tmp_path / "out").exists()


def test_bad_expert_hidden_size(dense, tmp_path):
    wide = build_model(tmp_path / "wide", arch="llama", hidden_size=48)
    cfg = moe_config(dense("llama"))
    cfg["experts"][1]["source_model"] = str(wide)
    assert_one_line_error(run_cli(tmp_path, cfg), "experts[1].source_model", "hidden size 48")


def test_bad_unsupported_architectures(dense, tmp_path):
    gemma = build_model(tmp_path / "gemma", arch="gemma")
    cfg = moe_config(dense("llama"))
    cfg["base_model"] = str(gemma)
    assert_one_line_error(run_cli(tmp_path, cfg), "base_model", "gemma", "not supported")
    cfg = moe_config(dense("llama"))
    cfg["experts"][0]["source_model"] = str(dense("qwen2")["e0"])
    assert_one_line_error(run_cli(tmp_path, cfg), "experts[0].source_model", "qwen2")
    assert_one_line_error(run_cli(tmp_path, moe_config(dense("phi3"), k=1)),
                          "experts_per_token", "PhimoeForCausalLM")
    assert not (tmp_path / "out").exists()
