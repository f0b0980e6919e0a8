"""Data-flow (layer path) search: the decoder, the scale fold per architecture, in-memory path
models, and one tiny real search (docs/evolve.md, "Data-flow search")."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import tinymodels
from evolve.dataflow import DataflowSpace, Hop, Layer, parse_layer_stacking
from evolve.fold import explicit_scale_hooks, fold_for, fold_tensor, cumulative
from evolve.genome import GenomeSpace, GenomeSpec
from merge.config import MergeConfig
from merge.errors import ConfigError

# Tiny norm epsilons: the fold is exact up to the norms' epsilon (docs/evolve.md), and these
# tests check the algebra, to 1e-5. test_fold_epsilon_caveat measures the default epsilons.
TINY_EPS = {"gpt_neox": {"layer_norm_eps": 1e-12}, "gpt2": {"layer_norm_epsilon": 1e-12}}
EXTRA_ARCHS = {
    "gemma2": dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, intermediate_size=64, head_dim=8, sliding_window=16),
    "gemma3_text": dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=64, head_dim=8,
                        sliding_window=16),
}
FOLDABLE = ["llama", "mistral", "qwen2", "gemma", "phi3", "gpt_neox", "gpt2"]
# A path with repeats, cross-model hops and scales above and below 1.
PATH = [("a", 0, 1.0), ("a", 1, 1.0), ("b", 1, 1.3), ("b", 2, 1.0), ("a", 3, 0.7), ("a", 0, 1.6),
        ("b", 3, 0.8)]
IDS = torch.tensor([[1, 5, 9, 17, 33, 2, 64, 7, 8, 11, 12, 40]])


def _family(root: Path, arch: str, eps: bool = True) -> dict[str, Path]:
    if arch in EXTRA_ARCHS and arch not in tinymodels.ARCH_KWARGS:
        tinymodels.ARCH_KWARGS[arch] = EXTRA_ARCHS[arch]
    overrides = dict(TINY_EPS.get(arch, {"rms_norm_eps": 1e-12})) if eps else {}
    a = tinymodels.build_model(root / "a", arch=arch, seed=0, **overrides)
    # a child with larger noise, so that its layers really differ from a's
    b = tinymodels.perturb(a, root / "b", seed=7, scale=0.05)
    return {"a": a, "b": b}


def _space(models: list[str], **stacking) -> DataflowSpace:
    spec = GenomeSpec(models=models, merge_method="passthrough",
                      layer_stacking=stacking or True)
    return GenomeSpace.build(spec)


def _hops(space: DataflowSpace, fam, path=PATH, unit=False) -> list[Hop]:
    by = {(l.model, l.layer): l for l in space.layers}
    return [Hop(by[(str(fam[m]), j)], 1.0 if unit else w) for m, j, w in path]


def _logits(path: Path, hooks=None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    handles = hooks(model) if hooks else []
    with torch.no_grad():
        out = model(input_ids=IDS).logits
    for h in handles:
        h.remove()
    return out


def _layers(model):
    base = getattr(model, model.base_model_prefix)
    return base.layers if hasattr(base, "layers") else base.h


def _merge(config: dict, out: Path) -> Path:
    from merge.engine import MergeOptions, merge_to_folder

    return merge_to_folder(MergeConfig.from_dict(config), out, MergeOptions(quiet=True))


# --- the decoder --------------------------------------------------------------------------------
def test_layout_genes_and_depth_bounds(family):
    models = [str(family["c0"]), str(family["c1"])]
    space = _space(models, repeats=3, min_layers=2, max_layers=5)
    assert space.M == 8 and space.T == 24 and space.dim == 24 + 64
    assert [l.layer for l in space.layers] == [0, 1, 2, 3] * 2
    x = space.initial_vector()
    hops = space.path(x)
    assert [(h.layer.model, h.layer.layer) for h in hops] == [(models[0], j) for j in range(4)]
    # the first model once: a plain passthrough of it, no scales
    assert space.decode(x) == {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": models[0], "layer_range": [0, 4]}]}]}
    # too many on: the weakest go; too few: the strongest excluded come in
    x = [0.1 * (t + 1) for t in range(24)] + [1.0] * 64
    assert space.slots(x) == [19, 20, 21, 22, 23]
    x = [-0.9] * 24 + [1.0] * 64
    x[5], x[17] = -0.1, -0.2
    assert space.slots(x) == [5, 17]


def test_hop_scales_fold_into_the_layers_after_them(family):
    models = [str(family["c0"]), str(family["c1"])]
    space = _space(models)
    x = [-1.0] * space.T + [1.0] * space.n_scales
    for t in (0, 1, 6, 8 + 3):          # c0.0 c0.1 c1.2 c0.3(repeat 1)
        x[t] = 0.5
    x[space.T + 1 * 8 + 6] = 1.5        # hop c0.1 → c1.2
    x[space.T + 6 * 8 + 3] = 0.8        # hop c1.2 → c0.3
    hops = space.path(x)
    assert [h.scale for h in hops] == [1.0, 1.0, 1.5, 0.8]
    cfg = space.decode(x)
    s = [sl["sources"][0] for sl in cfg["slices"]]
    assert [(src["model"], src["layer_range"]) for src in s] == [
        (models[0], [0, 2]), (models[1], [2, 3]), (models[0], [3, 4])]
    assert "parameters" not in s[0]
    assert s[1]["parameters"]["scale"] == [{"filter": "self_attn.o_proj", "value": 1 / 1.5},
                                           {"filter": "mlp.down_proj", "value": 1 / 1.5},
                                           {"value": 1.0}]
    assert s[2]["parameters"]["scale"][0]["value"] == pytest.approx(1 / 1.2)
    # encode is decode's inverse on decoded configs
    assert space.decode(space.encode(cfg)) == cfg
    MergeConfig.from_dict(cfg)


def test_model_pair_scales_leave_natural_successors_alone(family):
    models = [str(family["c0"]), str(family["c1"])]
    space = _space(models, scales="models", repeats=2)
    assert space.dim == 16 + 4
    x = [-1.0] * 16 + [1.3, 1.7, 0.6, 1.1]   # c0→c0, c0→c1, c1→c0, c1→c1
    for t in (0, 1, 5, 6, 8 + 2):            # c0.0 c0.1 c1.1 c1.2 c0.2
        x[t] = 0.5
    assert [h.scale for h in space.path(x)] == [1.0, 1.0, 1.7, 1.0, 0.6]


@pytest.mark.parametrize("stacking, field, words", [
    ({"repeats": 0}, "genome.layer_stacking.repeats", "greater than or equal to 1"),
    ({"scale_range": [0, 2]}, "genome.layer_stacking", "must be positive"),
    ({"min_layers": 5, "max_layers": 3}, "genome.layer_stacking", "below min_layers"),
    ({"scales": "all"}, "genome.layer_stacking.scales", None),
    ({"repeat": 2}, "genome.layer_stacking.repeat", "unknown key"),
])
def test_bad_layer_stacking_names_the_field(family, stacking, field, words):
    with pytest.raises(ConfigError) as e:
        _space([str(family["c0"])], **stacking)
    assert str(e.value).startswith(field + ":"), str(e.value)
    if words:
        assert words in str(e.value)


def test_dataflow_genome_rejects_parameter_space_keys(family):
    spec = GenomeSpec(models=[str(family["c0"])], merge_method="ties", layer_stacking=True)
    with pytest.raises(ConfigError, match="^genome.merge_method: .*passthrough"):
        GenomeSpace.build(spec)
    spec = GenomeSpec(models=[str(family["c0"])], merge_method="passthrough",
                      layer_granularity=2, layer_stacking=True)
    with pytest.raises(ConfigError, match="^genome.layer_granularity: does not apply"):
        GenomeSpace.build(spec)
    assert parse_layer_stacking(True).repeats == 3


# --- the fold, per architecture -----------------------------------------------------------------
FOLD_REPORT: dict[str, float] = {}


@pytest.mark.parametrize("arch", FOLDABLE)
def test_folded_checkpoint_equals_explicit_scales(tmp_path, arch):
    """mergekit-yaml of the decoded config (scales folded into the weights), loaded by stock
    transformers, gives the logits of the unfolded path with the hidden state scaled by hooks."""
    fam = _family(tmp_path, arch)
    space = _space([str(fam["a"]), str(fam["b"])])
    folded = _merge(space.config_for(_hops(space, fam)), tmp_path / "folded")
    plain = _merge(space.config_for(_hops(space, fam, unit=True)), tmp_path / "plain")
    scales = [w for _, _, w in PATH]
    want = _logits(plain, lambda m: explicit_scale_hooks(_layers(m), scales))
    got = _logits(folded)
    unscaled = _logits(plain)
    delta = (got - want).abs().max().item()
    FOLD_REPORT[arch] = delta
    print(f"\nfold {arch}: max |Δlogits| = {delta:.3g} (scales change logits by "
          f"{(unscaled - want).abs().max().item():.3g})")
    assert (unscaled - want).abs().max().item() > 1e-3   # the scales matter at all
    assert delta < 1e-5


@pytest.mark.parametrize("arch", ["gemma2", "gemma3_text"])
def test_sandwich_norm_fold_scales_the_offset_norm(tmp_path, arch):
    """Gemma 2/3: the scale goes into post_attention/post_feedforward_layernorm as
    (1 + w)/S - 1 (exact), which a passthrough scale cannot write: the decoder refuses scales."""
    fam = _family(tmp_path, arch)
    with pytest.raises(ConfigError, match="^genome.layer_stacking.scales: .*1 \\+ weight"):
        _space([str(fam["a"]), str(fam["b"])])
    space = _space([str(fam["a"]), str(fam["b"])], scales="none")
    plain = _merge(space.config_for(_hops(space, fam, unit=True)), tmp_path / "plain")
    scales = [w for _, _, w in PATH]
    want = _logits(plain, lambda m: explicit_scale_hooks(_layers(m), scales))

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(plain).eval()
    fold = fold_for(model.config.model_type, [n for n, _ in _layers(model)[0].named_parameters()])
    assert fold.kind == "offset_norm"
    with torch.no_grad():
        for layer, s in zip(_layers(model), cumulative(scales)):
            for name, p in layer.named_parameters():
                p.copy_(fold_tensor(name, p, fold, s))
        got = model(input_ids=IDS).logits
    delta = (got - want).abs().max().item()
    FOLD_REPORT[arch] = delta
    print(f"\nfold {arch} (offset norm, state-level): max |Δlogits| = {delta:.3g}")
    assert (_logits(plain) - want).abs().max().item() > 1e-3   # the scales matter at all
    assert delta < 1e-5


def test_fold_epsilon_caveat(tmp_path):
    """At the default epsilon (1e-6) the fold is exact only up to eps·S²: measured, not hidden."""
    fam = _family(tmp_path, "llama", eps=False)
    space = _space([str(fam["a"]), str(fam["b"])])
    folded = _merge(space.config_for(_hops(space, fam)), tmp_path / "folded")
    plain = _merge(space.config_for(_hops(space, fam, unit=True)), tmp_path / "plain")
    want = _logits(plain, lambda m: explicit_scale_hooks(_layers(m), [w for _, _, w in PATH]))
    delta = (_logits(folded) - want).abs().max().item()
    print(f"\nfold llama at rms_norm_eps=1e-6: max |Δlogits| = {delta:.3g}")
    assert delta < 1e-2


def test_parallel_residual_needs_both_branches_scaled(tmp_path):
    """GPT-NeoX adds attention and MLP of the same input: folding only one branch is wrong."""
    fam = _family(tmp_path, "gpt_neox")
    space = _space([str(fam["a"]), str(fam["b"])])
    cfg = space.config_for(_hops(space, fam))
    for sl in cfg["slices"]:
        params = sl["sources"][0].get("parameters")
        if params:
            params["scale"] = [e for e in params["scale"] if e.get("filter") != "mlp.dense_4h_to_h"]
    half = _merge(cfg, tmp_path / "half")
    plain = _merge(space.config_for(_hops(space, fam, unit=True)), tmp_path / "plain")
    want = _logits(plain, lambda m: explicit_scale_hooks(_layers(m), [w for _, _, w in PATH]))
    assert (_logits(half) - want).abs().max().item() > 1e-3


# --- in-memory candidates -----------------------------------------------------------------------
def test_in_memory_path_equals_the_checkpoint_and_shares_tensors(tmp_path, family):
    from evolve.path_model import PathModels

    fam = _family(tmp_path, "llama", eps=False)
    space = _space([str(fam["a"]), str(fam["b"])])
    cfg = space.config_for(_hops(space, fam))
    disk = _logits(_merge(cfg, tmp_path / "folded"))
    models = PathModels([str(fam["a"]), str(fam["b"])])
    model = models.build(MergeConfig.from_dict(cfg))
    with torch.no_grad():
        live = model(input_ids=IDS).logits
    assert torch.equal(live, disk)
    # shared: unscaled tensors are the loaded models' own; only the scaled outputs are new
    src = dict(models.models[str(fam["b"])].named_parameters())
    layer2 = model.model.layers[2]        # b.1, scale 1.3
    assert layer2.self_attn.q_proj.weight is src["model.layers.1.self_attn.q_proj.weight"]
    assert layer2.self_attn.o_proj.weight is not src["model.layers.1.self_attn.o_proj.weight"]
    per_layer = sum(p.numel() * 4 for n, p in layer2.named_parameters()
                    if "o_proj" in n or "down_proj" in n)
    assert models.last_new_bytes == per_layer * sum(1 for s in cumulative(
        [w for _, _, w in PATH]) if s != 1.0)
    # the source models are untouched, and a second build is independent of the first
    assert [m.layer_idx for m in (l.self_attn for l in model.model.layers)] == list(range(7))
    assert models.models[str(fam["a"])].model.layers[0].self_attn.layer_idx == 0
    assert len(models.models[str(fam["a"])].model.layers) == 4
    other = models.build(MergeConfig.from_dict(space.config_for(_hops(space, fam, PATH[:3]))))
    assert len(other.model.layers) == 3 and len(model.model.layers) == 7
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, disk)


def test_mixed_dtype_models_load_in_the_checkpoint_dtype(tmp_path):
    """A float32 model and a bfloat16 one (a PS result next to a specialist): with genome.dtype the
    candidate built in memory, as a worker builds it, is the checkpoint bit for bit; without it the
    space says why it cannot be."""
    from evolve.path_model import PathModels

    a = tinymodels.build_model(tmp_path / "a", arch="llama", seed=0, rms_norm_eps=1e-12)
    b = tinymodels.perturb(a, tmp_path / "b", seed=7, scale=0.05, dtype=torch.bfloat16)
    fam = {"a": a, "b": b}
    assert "different dtypes" in " ".join(_space([str(a), str(b)]).notes)
    spec = GenomeSpec(models=[str(a), str(b)], merge_method="passthrough", layer_stacking=True,
                      dtype="bfloat16")
    space = GenomeSpace.build(spec)
    assert not any("dtypes" in n for n in space.notes)
    cfg = MergeConfig.from_dict(space.config_for(_hops(space, fam)))
    disk = _logits(_merge(cfg.model_dump(mode="json", exclude_none=True), tmp_path / "out"))
    models = PathModels.for_config(cfg)
    assert models.dtype == torch.bfloat16
    model = models.build(cfg)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, disk)


# --- workers: HF and vLLM (stand-ins, as in tests/test_vllm_backend.py) --------------------------
from test_vllm_backend import StandInEngine, StandInWorker, fake_lm_eval_vllm  # noqa: E402,F401


@pytest.fixture
def include_dir(toy_task_dir, tmp_path):
    from evolve import tasks as task_lib

    return task_lib.mirror_search_paths([toy_task_dir], tmp_path / "mirror")


def _paths(space, fam):
    """Candidates of different depths, with scales, starting in either model."""
    return [PATH, PATH[:2], [("b", 0, 1.0), ("a", 2, 1.4), ("b", 3, 1.0)], PATH[2:] + PATH[:3]]


@pytest.fixture
def one_thread():
    """Tiny models: one torch thread is fastest, most of all on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_workers_score_path_candidates_like_their_checkpoints(
        tmp_path, include_dir, fake_lm_eval_vllm, one_thread):
    """HF backend: each candidate is assembled from the loaded layers; vLLM backend: one engine at
    the maximum depth, shorter paths padded with identity layers and swapped in place. Both score
    every candidate exactly as its mergekit-yaml checkpoint scores."""
    from evolve.fitness import EvalSettings, Scorer
    from evolve.workers import EvalWorker, WorkerSpec
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fam = _family(tmp_path, "llama", eps=False)
    space = _space([str(fam["a"]), str(fam["b"])], max_layers=12)
    settings = EvalSettings(task_names=["evo_toy"], metrics={"evo_toy": "acc_norm,none"},
                            include_dir=str(include_dir), limit=12, seed=5)
    initial = space.decode(space.initial_vector())
    hf = EvalWorker(WorkerSpec(initial_config=initial, eval=settings, dataflow_depth=12,
                               threads=1))
    vl = EvalWorker(WorkerSpec(initial_config=initial, eval=settings, backend="vllm", threads=1,
                               dataflow_depth=12, vllm={"dtype": "float32", "swap_chunk_mb": 1}))
    assert hf.error is None and vl.error is None, (hf.error, vl.error)
    [lm] = fake_lm_eval_vllm
    engine_model = lm.worker.model_runner.model.model
    assert engine_model.config.num_hidden_layers == 12           # built at the maximum depth
    tok = AutoTokenizer.from_pretrained(fam["a"])
    sent_before = 0
    judge = None
    for k, path in enumerate(_paths(space, fam)):
        cfg = space.config_for(_hops(space, fam, path))
        disk = _merge(cfg, tmp_path / f"cand{k}")
        stock = AutoModelForCausalLM.from_pretrained(disk).eval()
        if judge is None:
            judge = Scorer(stock, tok, settings)
        judge.lm._model = stock
        want = judge.score()
        got_hf, got_vl = hf.evaluate(cfg), vl.evaluate(cfg)
        assert got_hf.get("error") is None and got_vl.get("error") is None, (got_hf, got_vl)
        assert got_hf["scores"] == want and got_vl["scores"] == want
        # the engine's padded model computes the path's logits
        with torch.no_grad():
            padded = engine_model(input_ids=IDS).logits
        assert (padded - _logits(disk)).abs().max().item() < 1e-5
        sent = len(lm.worker.model_runner.model.loaded) - sent_before
        sent_before += sent
        per_layer = len([n for n in dict(engine_model.named_parameters()) if ".layers.0." in n])
        if k == 1:    # 7 layers → 2: slots 2..6 become identity; 7..11 already are
            assert sent == 3 + per_layer * 7
    assert lm.model.resets == 4


def test_identity_padding_is_the_identity(tmp_path):
    from evolve.vllm_backend import identity_padded
    from merge.engine import InMemoryMerger

    for arch in ("gpt2", "gpt_neox"):
        fam = _family(tmp_path / arch, arch, eps=False)
        space = _space([str(fam["a"]), str(fam["b"])])
        cfg = space.config_for(_hops(space, fam))
        padded = identity_padded(InMemoryMerger(), cfg, 11)
        assert len(padded["slices"]) == len(cfg["slices"]) + 4
        delta = (_logits(_merge(padded, tmp_path / arch / "p")) -
                 _logits(_merge(cfg, tmp_path / arch / "c"))).abs().max().item()
        assert delta < 1e-6, (arch, delta)


# --- one tiny real search (Ray, lm-eval), then the best model with stock transformers ------------
def test_dataflow_search_end_to_end(ray_session, family, toy_task_dir, tmp_path, make_genome,
                                    capsys):
    import json

    import yaml
    from transformers import AutoModelForCausalLM

    from evolve.cli import main

    g = {"models": [str(family["c0"]), str(family["c1"])], "merge_method": "passthrough",
         "layer_stacking": {"repeats": 2, "min_layers": 2, "max_layers": 6}}
    path = make_genome(tmp_path / "g.yaml", g, limit=16)
    storage = tmp_path / "run"
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in [path, "--storage-path", storage, "--task-search-path",
                               toy_task_dir, "--workers", 1, "--popsize", 4, "--max-fevals", 8,
                               "--seed", 3, "--no-wandb", "--sigma0", 0.5]])
    out = capsys.readouterr()
    assert e.value.code == 0, out.err
    history = [json.loads(line) for line in (storage / "history.jsonl").read_text().splitlines()]
    assert len(history) == 8 and all(r["error"] is None for r in history)
    depths = {sum(s["sources"][0]["layer_range"][1] - s["sources"][0]["layer_range"][0]
                  for s in r["config"]["slices"]) for r in history}
    assert len(depths) > 1 and all(2 <= d <= 6 for d in depths)
    best = max(history, key=lambda r: r["fitness"])
    cfg = yaml.safe_load((storage / "best_config.yaml").read_text())
    assert cfg["merge_method"] == "passthrough"
    model = AutoModelForCausalLM.from_pretrained(storage / "best_model")   # stock, no remote code
    from evolve.fitness import EvalSettings, Scorer
    from evolve import tasks as task_lib
    from transformers import AutoTokenizer

    include = task_lib.mirror_search_paths([toy_task_dir], tmp_path / "mirror")
    settings = EvalSettings(task_names=["evo_toy"], metrics={"evo_toy": "acc,none"},
                            include_dir=str(include), limit=16, seed=3)
    score = Scorer(model.eval(), AutoTokenizer.from_pretrained(storage / "best_model"),
                   settings).score()
    assert score["evo_toy"] == best["scores"]["evo_toy"]


# --- the demo's compositional task --------------------------------------------------------------
def _stage_family_module():
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import make_stage_family

    return make_stage_family


def test_compositional_task_items_are_untrained_and_split():
    sf = _stage_family_module()
    items = sf.make_eval_items()
    fit, held = items[(sf.COMPOSITION, "fit")], items[(sf.COMPOSITION, "heldout")]
    assert (len(fit), len(held)) == (60, 100)
    every = [r["input"] for rows in items.values() for r in rows]
    assert len(every) == len(set(every))                  # no item in two splits or tasks
    r = fit[0]
    assert r["prompt"] == f"map: {r['input']} ="
    assert r["answer"] == sf.apply_map("atbash", sf.apply_map("cipher", r["input"]))
    assert sf.apply_map("cipatb", "abz") == "yxz"         # a->b->y, b->c->x, z->a->z
    assert sf.make_eval_items() == items                  # deterministic
    # the committed task files are what the module writes
    tasks = Path(__file__).resolve().parent.parent / "eval_tasks"
    rows = [json.loads(x) for x in (tasks / "data" / "demo_cipatb_heldout.jsonl").read_text()
            .splitlines()]
    assert rows == held


def test_stage_family_trains_on_the_paths_the_search_builds(tmp_path):
    """The staged family's training forward over a layer path (make_stage_family.run_path) is
    the model the search assembles for that path, and a stage path passes its middle layer once."""
    import random

    from evolve.path_model import PathModels

    sf = _stage_family_module()
    torch.manual_seed(0)
    model = sf.make_model(sf.ModelShape(layers=4, hidden=16, heads=2, intermediate=32)).eval()
    sf._save(model, sf.make_tokenizer(), tmp_path / "m")
    ids, _ = sf.batch("cipher", ["abc", "hello"])
    with torch.no_grad():
        assert torch.equal(sf.run_path(model, ids, [0, 1, 2, 3])[0],
                           model(input_ids=ids, use_cache=False).logits[:, :-1])
        path = [0, 1, 1, 3, 2]
        cfg = MergeConfig.from_dict({"merge_method": "passthrough", "slices": [
            {"sources": [{"model": str(tmp_path / "m"), "layer_range": [i, i + 1]}]}
            for i in path]})
        built = PathModels.for_config(cfg).build(cfg)
        assert torch.equal(sf.run_path(model, ids, path)[0],
                           built(input_ids=ids, use_cache=False).logits[:, :-1])
    recipe = sf.RECIPE
    gen = random.Random(0)
    for _ in range(200):
        path, at = sf._stage_path(gen, recipe)
        assert path.count(recipe.map_layer) == 1 and path[at] == recipe.map_layer
    assert len(model.model.layers) == 4         # run_path puts the model's own layers back


def test_cli_dry_run_and_one_line_errors(family, tmp_path, make_genome, capsys):
    from evolve.cli import main

    def cli(genome):
        path = make_genome(tmp_path / "g.yaml", genome)
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main([str(path), "--dry-run"])
        return e.value.code, capsys.readouterr()

    models = [str(family["c0"]), str(family["c1"])]
    code, out = cli({"models": models, "merge_method": "passthrough",
                     "layer_stacking": {"repeats": 2, "scales": "models"}})
    assert code == 0, out.err
    assert "search space: 20 genes = 16 slot inclusions (8 layers × 2 repeats) + 4 hop scales" \
        in out.out
    assert "layer_range: [0, 4]" in out.out and "c0.0 c0.1 c0.2 c0.3" in out.out
    code, out = cli({"models": models, "merge_method": "passthrough",
                     "layer_stacking": {"scale_range": [-1, 1]}})
    assert code == 2 and out.err.count("\n") == 1 and "Traceback" not in out.err
    assert out.err.startswith("error: genome.layer_stacking: scale_range")
