"""The genome: schema, search space and the decoder to the engine's merge config (no Ray or
lm-eval here)."""
from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from evolve.genome import GenomeSpace, parse_evolve_config
from merge.config import MergeConfig
from merge.engine import validate
from merge.errors import ConfigError
from merge.methods import METHODS


def space_for(genome: dict) -> GenomeSpace:
    return GenomeSpace.build(parse_evolve_config({"genome": genome,
                                                  "tasks": [{"name": "t"}]}).genome)


def genome_for(method_name: str, family, **extra) -> dict:
    """A valid genome for any registered method: the right number of models, a base if used."""
    method = METHODS[method_name]
    n = max(method.min_models, min(2, method.max_models or 2))
    models = [str(family[f"c{i}"]) for i in range(n)]
    genome = {"models": models, "merge_method": method_name, **extra}
    if method.takes_base:
        genome["base_model"] = str(family["base"])
    elif method.min_models > n:
        pytest.skip(f"{method_name} needs {method.min_models} models")
    return genome


def random_point(space: GenomeSpace, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    return [rng.uniform(lo, hi) for lo, hi in zip(space.lower, space.upper)]


def evolvable(method_name: str) -> bool:
    m = METHODS[method_name]
    return any(p in (("weight", "density") if s.per_model else ("t", "select_topk"))
               for p, s in m.params.items())


LAYOUTS = {
    "whole": dict(layer_granularity=0),
    "blocks+filters": dict(layer_granularity=2, filters=["self_attn", "mlp"]),
    "smooth+filters": dict(layer_granularity=1, smooth=True, filters=["mlp"]),
    "smooth": dict(layer_granularity=2, smooth=True),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("method_name", sorted(METHODS))
def test_decode_round_trips_for_every_method(family, method_name, layout):
    genome = genome_for(method_name, family, **LAYOUTS[layout])
    if not evolvable(method_name):
        with pytest.raises(ConfigError, match="no parameter that evolution tunes"):
            space_for(genome)
        return
    space = space_for(genome)
    x = random_point(space)
    config = space.decode(x)
    # the engine accepts it, plans it (no tensor loaded), and gives it back unchanged
    parsed = MergeConfig.from_dict(config)
    plan = validate(parsed)
    assert plan.num_layers == 4
    through_yaml = yaml.safe_load(yaml.safe_dump(parsed.to_dict()))
    assert space.encode(through_yaml) == x
    assert space.encode(config) == x


def test_piecewise_blocks_become_slices_with_per_source_parameters(family):
    space = space_for(genome_for("ties", family, layer_granularity=2, filters=["self_attn"]))
    assert space.dim == 2 * 2 * 2 * 2   # blocks × filter groups × params × models
    cfg = space.decode(space.initial_vector())
    assert [s["sources"][0]["layer_range"] for s in cfg["slices"]] == [[0, 2], [2, 4]]
    base, c0, c1 = cfg["slices"][1]["sources"]
    assert base == {"model": str(family["base"]), "layer_range": [2, 4]}   # the base: no genes
    weight = c0["parameters"]["weight"]
    assert weight[0]["filter"] == "self_attn" and "filter" not in weight[-1]   # catch-all last
    assert cfg["base_model"] == str(family["base"])


def test_smooth_genes_are_gradient_anchors(family):
    space = space_for(genome_for("linear", family, layer_granularity=1, smooth=True,
                                 normalize=True))
    x = [i / 10 for i in range(space.dim)]
    cfg = space.decode(x)
    assert "slices" not in cfg
    w0 = cfg["models"][0]["parameters"]["weight"]
    assert len(w0) == 4 and w0 == [x[space.genes.index(g)] for g in space.genes
                                   if g.model == str(family["c0"])]
    assert cfg["parameters"] == {"normalize": True}


def test_shared_parameters_are_one_gene_per_block(family):
    space = space_for(genome_for("slerp", family, layer_granularity=2))
    assert [g.model for g in space.genes] == [None, None]
    cfg = space.decode([0.25, 0.75])
    assert [s["parameters"]["t"] for s in cfg["slices"]] == [0.25, 0.75]


def test_model_references_are_kept_verbatim(family, tmp_path, monkeypatch):
    monkeypatch.chdir(family["base"].parent)
    space = space_for({"models": ["c0/", "./c1"], "merge_method": "task_arithmetic",
                       "base_model": "base"})
    cfg = space.decode(space.initial_vector())
    assert [m["model"] for m in cfg["models"]] == ["c0/", "./c1"]
    assert cfg["base_model"] == "base"


def test_bounds_initial_point_and_clipping(family):
    space = space_for(genome_for("ties", family, allow_negative_weights=True,
                                 parameters={"weight": None, "density": [0.2, 0.9]}))
    ranges = {g.param: (lo, hi) for g, lo, hi in zip(space.genes, space.lower, space.upper)}
    assert ranges == {"weight": (-1.0, 1.0), "density": (0.2, 0.9)}
    x0 = space.initial_vector()
    assert all(lo < v < hi for v, lo, hi in zip(x0, space.lower, space.upper))
    assert space.decode([5.0] * space.dim)["models"][0]["parameters"] == {"weight": 1.0,
                                                                          "density": 0.9}
    xr = space.initial_vector(random=True, seed=3)
    assert xr == space.initial_vector(random=True, seed=3) != x0


def test_required_parameters_that_do_not_evolve_are_fixed(family):
    space = space_for(genome_for("ties", family, parameters=["density"],
                                 fixed_parameters={"lambda": 0.8}))
    cfg = space.decode(space.initial_vector())
    # normalize: left out of the genome, on for ties as in the reference tool
    assert cfg["parameters"] == {"normalize": True, "lambda": 0.8, "weight": 1.0}
    MergeConfig.from_dict(cfg)


@pytest.mark.parametrize("genome, field, words", [
    ({"merge_method": "passthrough", "base_model": None, "models": ["c0"]},
     "genome.merge_method", "no parameter that evolution tunes"),
    ({"merge_method": "passthrough", "base_model": None, "models": ["c0"],
      "parameters": ["scale"]}, "genome.parameters.scale", "no default search range"),
    ({"merge_method": "nope"}, "genome.merge_method", "unknown method"),
    ({"merge_method": "ties", "base_model": None}, "genome.base_model", "needs a base model"),
    ({"merge_method": "slerp"}, "genome.base_model", "picks both endpoints"),
    ({"merge_method": "slerp", "base_model": None, "models": ["c0"]}, "genome.models",
     "at least two"),
    ({"merge_method": "slerp", "base_model": None, "filters": ["mlp"]}, "genome.filters",
     "no filters"),
    ({"layer_granularity": 3}, "genome.layer_granularity", "does not divide the 4 layers"),
    ({"parameters": ["gamma"]}, "genome.parameters.gamma", "has no parameter"),
    ({"parameters": ["normalize"]}, "genome.parameters.normalize", "switch"),
    ({"parameters": {"weight": [1, 0]}}, "genome.parameters", "low < high"),
    ({"parameters": {"weight": [-1, 1]}}, "genome.parameters.weight", "allow_negative_weights"),
    ({"layer_stacking": {"x": 1}}, "genome.layer_stacking.x", "unknown key"),
    ({"fixed_parameters": {"weight": 1}}, "genome.fixed_parameters.weight", "also evolved"),
    ({"typo_key": 1}, "genome.typo_key", "unknown key"),
    ({"models": []}, "genome.models", None),
    ({"models": ["c0", "c0"]}, "genome.models", "listed twice"),
])
def test_bad_genomes_name_the_field(family, genome, field, words):
    g = {"models": ["c0", "c1"], "merge_method": "task_arithmetic", "base_model": "base"}
    g.update(genome)
    g = {k: v for k, v in g.items() if v is not None}
    g["models"] = [str(family[m]) for m in g["models"]]
    if "base_model" in g:
        g["base_model"] = str(family[g["base_model"]])
    with pytest.raises(ConfigError) as e:
        space_for(g)
    assert str(e.value).startswith(field + ":"), str(e.value)
    if words:
        assert words in str(e.value)


def test_della_density_range_keeps_density_plus_minus_epsilon_valid(family):
    space = space_for(genome_for("della", family))
    density = next(p for p in space.params if p.name == "density")
    assert density.low > 0.15 and density.high < 0.85
    space = space_for(genome_for("della", family, parameters={"weight": None, "density": None,
                                                              "epsilon": [0.0, 0.1]}))
    density = next(p for p in space.params if p.name == "density")
    assert 0.1 < density.low < 0.11 and 0.89 < density.high < 0.9


def test_models_with_different_layer_counts_are_refused(family, tmp_path):
    import tinymodels

    deep = tinymodels.build_model(tmp_path / "deep", num_hidden_layers=6)
    with pytest.raises(ConfigError, match=r"genome.models: .*different layer counts.*: 6"):
        space_for({"models": [str(family["c0"]), str(deep)], "merge_method": "linear"})


def test_tasks_section_is_checked():
    base = {"genome": {"models": ["a"], "merge_method": "linear"}}
    with pytest.raises(ConfigError, match="tasks: required"):
        parse_evolve_config(base)
    with pytest.raises(ConfigError, match="listed twice"):
        parse_evolve_config({**base, "tasks": [{"name": "x"}, {"name": "x"}]})
    with pytest.raises(ConfigError, match=r"^limit:"):
        parse_evolve_config({**base, "tasks": [{"name": "x"}], "limit": 0})
    cfg = parse_evolve_config({**base, "tasks": [{"name": "x"}]})
    assert cfg.tasks[0].metric == "acc,none" and cfg.tasks[0].weight == 1.0


def test_dry_run_prints_dimensions_and_the_starting_config(family, tmp_path, make_genome, capsys):
    from evolve.cli import main

    path = make_genome(tmp_path / "g.yaml", {
        "models": [str(family["c0"]), str(family["c1"])], "merge_method": "ties",
        "base_model": str(family["base"]), "layer_granularity": 2, "filters": ["mlp"]})
    with pytest.raises(SystemExit) as e:
        main([str(path), "--dry-run"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "search space: 16 genes" in out
    decoded = yaml.safe_load(out.split("starting point (decoded merge config):")[1])
    assert decoded["merge_method"] == "ties" and len(decoded["slices"]) == 2
    MergeConfig.from_dict(decoded)


def test_help_is_fast_and_imports_nothing_heavy():
    code = ("import sys, evolve.cli\n"
            "heavy = [m for m in ('torch', 'ray', 'lm_eval', 'wandb', 'cma', 'matplotlib',"
            " 'transformers') if m in sys.modules]\n"
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    help_out = subprocess.run([sys.executable, "-c", "from evolve.cli import main; main()",
                               "--help"], capture_output=True, text=True)
    assert help_out.returncode == 0 and "--storage-path" in help_out.stdout


# --- genomes written for the reference tool (tests/genomes/, see its README) ----------------------
GENOMES = Path(__file__).parent / "genomes"
PLACEHOLDERS = ("MODEL_A", "MODEL_B", "MODEL_C", "BASE")


def reference_genome(name: str, models: dict, folder: Path) -> Path:
    """A corpus genome with its placeholders replaced by model folders."""
    text = (GENOMES / name).read_text()
    for key in PLACEHOLDERS:
        if key in models:
            text = text.replace(key, str(models[key]))
    path = Path(folder) / name
    path.write_text(text)
    return path


def _slerp_pairs(cfg, models):
    assert cfg["merge_method"] == "nuslerp" and "base_model" not in cfg
    for s in cfg["slices"]:
        a, b = s["sources"]
        assert a["layer_range"] == b["layer_range"]
        assert a["parameters"]["weight"] + b["parameters"]["weight"] == pytest.approx(1.0)
        assert {a["model"], b["model"]} <= set(models)


# What the reference reads in each (mergekit/evo/genome.py): normalize on for linear, ties and
# dare_ties when left out, off for task_arithmetic; bfloat16 always; slerp over models' weights.
CORPUS = {
    "docs_general_syntax.yml": lambda cfg, space, m: (
        cfg["parameters"] == {"normalize": False} and len(cfg["slices"]) == 2
        and space.dim == 2 * 3 * 2 * 2),   # blocks × filter groups × (weight, density) × models
    "dare_ties_reference.yml": lambda cfg, space, m: cfg["parameters"]["normalize"] is True,
    "ties_filters.yml": lambda cfg, space, m: (
        cfg["parameters"]["normalize"] is True
        and [e.get("filter") for e in cfg["models"][0]["parameters"]["weight"]]
        == ["self_attn", "mlp", None]),
    "task_arithmetic_negative.yml": lambda cfg, space, m: (
        cfg["parameters"]["normalize"] is False and set(space.lower) == {-1.0}
        and len(cfg["slices"]) == 4),
    "linear_smooth.yml": lambda cfg, space, m: (
        cfg["parameters"]["normalize"] is True
        and all(len(e["parameters"]["weight"]) == 2 for e in cfg["models"])),
    "linear_bare_tasks.yml": lambda cfg, space, m: (
        cfg["parameters"] == {"normalize": True} and "slices" not in cfg),
    "slerp_two_models.yml": lambda cfg, space, m: (
        _slerp_pairs(cfg, [m["MODEL_A"], m["MODEL_B"]]) is None and len(cfg["slices"]) == 2
        and space.dim == 2 * 2),
    "slerp_three_models.yml": lambda cfg, space, m: (
        _slerp_pairs(cfg, [m["MODEL_A"], m["MODEL_B"], m["MODEL_C"]]) is None
        and space.dim == 2 * 3),
    "slerp_base_in_models.yml": lambda cfg, space, m: (
        _slerp_pairs(cfg, [m["BASE"], m["MODEL_A"]]) is None and len(cfg["slices"]) == 1),
    "tokenizer_source.yml": lambda cfg, space, m: (
        cfg["tokenizer_source"] == "base" and cfg["parameters"]["normalize"] is True),
}


def test_the_corpus_is_complete():
    assert sorted(p.name for p in GENOMES.glob("*.yml")) == sorted(CORPUS)


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_reference_genomes_are_read_as_the_reference_reads_them(family, name, tmp_path, capsys):
    from evolve.cli import main
    from evolve.genome import load_evolve_config

    models = {"BASE": str(family["base"]), "MODEL_A": str(family["c0"]),
              "MODEL_B": str(family["c1"]), "MODEL_C": str(family["c2"])}
    path = reference_genome(name, models, tmp_path)
    with pytest.raises(SystemExit) as e:
        main([str(path), "--dry-run"])
    out = capsys.readouterr()
    assert e.value.code == 0, out.err
    cfg = yaml.safe_load(out.out.split("starting point (decoded merge config):")[1])
    validate(MergeConfig.from_dict(cfg))
    assert cfg["dtype"] == "bfloat16"                 # evaluated and written as the reference
    genome = load_evolve_config(path)
    assert all(t.name == "evo_toy" for t in genome.tasks)
    assert CORPUS[name](cfg, GenomeSpace.build(genome.genome), models)


def test_slerp_over_several_models_interpolates_the_two_highest_weights(family):
    import math

    space = space_for({"models": [str(family[c]) for c in ("c0", "c1", "c2")],
                       "merge_method": "slerp", "layer_granularity": 2})
    # genes: block → model
    cfg = space.decode([0.2, 0.9, 0.5, 0.7, 0.1, 0.7])
    first, second = cfg["slices"]
    assert [s["model"] for s in first["sources"]] == [str(family["c1"]), str(family["c2"])]
    t = 1 / (1 + math.exp(0.9 - 0.5))          # softmax of the two highest, second component
    assert first["sources"][1]["parameters"]["weight"] == pytest.approx(t)
    # a tie keeps the model listed first as the start of the interpolation
    assert [s["model"] for s in second["sources"]] == [str(family["c0"]), str(family["c2"])]
    assert second["sources"][1]["parameters"]["weight"] == pytest.approx(0.5)


def test_reference_cli_options_are_accepted_or_name_ours(family, tmp_path, capsys):
    from evolve.cli import main

    path = reference_genome("dare_ties_reference.yml", {
        "BASE": family["base"], "MODEL_A": family["c0"], "MODEL_B": family["c1"]}, tmp_path)

    def cli(*args):
        with pytest.raises(SystemExit) as e:
            main([str(path), *map(str, args)])
        return e.value.code, capsys.readouterr().err

    code, err = cli("--dry-run", "--strategy", "buffered", "--in-memory", "--random-seed", 3,
                    "--force-population-size", 6, "--save-final-model", "--no-reshard",
                    "--i-understand-the-depths-of-the-evils-i-am-unleashing", "--sigma0", 0.2,
                    "--merge-cuda", "--no-trust-remote-code", "--no-allow-crimes")
    assert code == 0, err
    assert "note: --strategy buffered" in err and "note: --reshard" in err
    for args, expect in [
            (["--vllm"], "--backend vllm: vLLM is not installed"),
            (["--load-in-8bit"], "--load-in-8bit: quantized evaluation is not supported"),
            (["--no-merge-cuda"],
             "--no-merge-cuda: merging runs on the device that evaluates; use --device cpu"),
            (["--allow-crimes"], "--allow-crimes: "),
            (["--vllm", "--backend", "hf"], "--vllm: contradicts --backend hf")]:
        code, err = cli("--storage-path", tmp_path / "run", *args)
        assert code == 2 and err.startswith("error: " + expect.split(":")[0]), err
        assert expect in err and len(err.strip().splitlines()) == 1, err
        assert "--limit" not in err
