"""mergekit-legacy: flag-style arguments and bakllama files become ordinary merge configs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from merge.errors import EvomergeError
from merge.legacy import bakllama_to_config, cli, flags_to_config
from tinymodels import load_state

BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def legacy(*args):
    return subprocess.run([BIN / "mergekit-legacy", *map(str, args)], capture_output=True,
                          text=True, timeout=300, env=ENV)


def run_inprocess(*args):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(list(map(str, args)), prog_name="mergekit-legacy")
    assert exit_info.value.code == 0


def test_print_yaml_round_trips_through_mergekit_yaml(family, tmp_path):
    flags = ["--base-model", family["base"], "--merge", family["c0"], "--merge", family["c1"],
             "--weight", 0.6, "--weight", 0.4, "--density", 0.5, "--no-bf16"]
    r = legacy(tmp_path / "unused", *flags, "--print-yaml")
    assert r.returncode == 0, r.stderr
    config = yaml.safe_load(r.stdout)
    assert config == {
        "merge_method": "ties", "base_model": str(family["base"]),
        "models": [{"model": str(family["c0"]), "parameters": {"weight": 0.6, "density": 0.5}},
                   {"model": str(family["c1"]), "parameters": {"weight": 0.4, "density": 0.5}}]}
    assert not (tmp_path / "unused").exists()
    (tmp_path / "printed.yml").write_text(r.stdout)
    r = subprocess.run([sys.executable, "-m", "merge", tmp_path / "printed.yml", tmp_path / "a",
                        "-q"], capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr
    run_inprocess(tmp_path / "b", *flags, "-q")
    a, b = load_state(tmp_path / "a"), load_state(tmp_path / "b")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_flag_defaults_and_spreading():
    cfg = flags_to_config(("m1", "m2"), "B", "ties", (), (0.3,), None, False, True)
    assert cfg["dtype"] == "bfloat16"   # legacy default: --bf16
    assert [m["parameters"] for m in cfg["models"]] == [{"weight": 1.0, "density": 0.3}] * 2
    slerp = flags_to_config(("m1",), "B", "slerp", (0.25,), (), None, False, False)
    assert slerp["parameters"] == {"t": 0.25} and "parameters" not in slerp["models"][0]
    linear = flags_to_config(("m1",), "B", "linear", (0.5, 0.5), (), False, False, False)
    assert [m["model"] for m in linear["models"]] == ["m1", "B"]   # no-base methods merge B too
    assert linear["parameters"] == {"normalize": False}
    with pytest.raises(EvomergeError, match="--weight: got 3 values for 2 models"):
        flags_to_config(("m1", "m2"), "B", "ties", (1, 2, 3), (), None, False, False)
    with pytest.raises(EvomergeError, match="--density: linear has no density"):
        flags_to_config(("m1",), None, "linear", (), (0.5,), None, False, False)
    with pytest.raises(EvomergeError, match="--naive-count"):
        flags_to_config(("m1",), "B", "ties", (), (), None, True, False)


def test_bakllama_file_becomes_passthrough_slices(family, tmp_path):
    spec = {"layer_slices": [{"model": str(family["base"]), "start": 0, "end": 3},
                             {"model": str(family["c0"]), "start": 1, "end": 4, "scale": 0.5}],
            "embedding_source": str(family["base"]), "lm_head_source": str(family["c0"])}
    (tmp_path / "bak.yml").write_text(yaml.safe_dump(spec))
    config = bakllama_to_config(str(tmp_path / "bak.yml"), fp16=False)
    assert config["merge_method"] == "passthrough"
    assert [s["sources"][0]["layer_range"] for s in config["slices"]] == [[0, 3], [1, 4]]
    run_inprocess(tmp_path / "out", "--bakllama", tmp_path / "bak.yml", "-q")
    out, base, c0 = (load_state(tmp_path / "out"), load_state(family["base"]),
                     load_state(family["c0"]))
    assert sum(k.endswith("input_layernorm.weight") for k in out) == 6
    layer = "model.layers.{}.{}"
    for i in range(3):
        assert torch.equal(out[layer.format(i, "self_attn.o_proj.weight")],
                           base[layer.format(i, "self_attn.o_proj.weight")])
    for out_i, src_i in zip(range(3, 6), range(1, 4)):
        # scale multiplies what the layer writes into the residual stream: o_proj and down_proj
        for name in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
            torch.testing.assert_close(out[layer.format(out_i, name)],
                                       0.5 * c0[layer.format(src_i, name)])
        assert torch.equal(out[layer.format(out_i, "self_attn.q_proj.weight")],
                           c0[layer.format(src_i, "self_attn.q_proj.weight")])
    assert torch.equal(out["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert torch.equal(out["lm_head.weight"], c0["lm_head.weight"])


def assert_one_line_error(r, *needles):
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, \
        r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_bad_inputs_are_one_line(family, tmp_path):
    assert_one_line_error(legacy(tmp_path / "o", "--base-model", family["base"], "--merge",
                                 family["c0"], "--merge", family["c1"], "--weight", 1, "--weight",
                                 2, "--weight", 3), "--weight", "3 values for 2 models")
    assert_one_line_error(legacy(tmp_path / "o", "--merge", family["c0"], "--method", "tiess"),
                          "merge_method", "tiess")
    spec = {"layer_slices": [{"model": str(family["base"]), "start": 0, "end": 2}],
            "embedding_source": str(family["c0"])}
    (tmp_path / "bak.yml").write_text(yaml.safe_dump(spec))
    assert_one_line_error(legacy(tmp_path / "o", "--bakllama", tmp_path / "bak.yml"),
                          "embedding_source", "first slice")
    assert not (tmp_path / "o").exists()
