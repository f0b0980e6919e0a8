"""Every bad input: one line naming the field, exit code 2, no traceback, nothing written."""
from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from tinymodels import build_model


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("wide") / "m", hidden_size=48)


def mergekit_yaml(*args):
    return subprocess.run([sys.executable, "-m", "merge", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def assert_one_line_error(result, *needles):
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def two(family, p0=None, p1=None):
    return [{"model": str(family["c0"]), "parameters": p0 or {"weight": 0.5}},
            {"model": str(family["c1"]), "parameters": p1 or {"weight": 0.5}}]


CASES = {
    "unknown method": (lambda f, w: {"merge_method": "tiess", "models": two(f)},
                       ["merge_method", "tiess", "ties"]),
    "missing base for ties": (lambda f, w: {"merge_method": "ties", "models": two(f)},
                              ["base_model"]),
    "slerp with three models": (
        lambda f, w: {"merge_method": "slerp", "base_model": str(f["base"]), "parameters": {"t": 0.5},
                      "models": [{"model": str(f[k])} for k in ("base", "c0", "c1")]},
        ["models", "exactly 1"]),
    "missing weight": (
        lambda f, w: {"merge_method": "linear",
                      "models": [{"model": str(f["c0"])},
                                 {"model": str(f["c1"]), "parameters": {"weight": 0.5}}]},
        ["models[0].parameters.weight", "c0"]),
    "density outside [0, 1]": (
        lambda f, w: {"merge_method": "ties", "base_model": str(f["base"]),
                      "models": two(f, {"weight": 0.5, "density": 1.5})},
        ["models[0].parameters.density", "[0, 1]"]),
    "layer_range out of bounds": (
        lambda f, w: {"merge_method": "passthrough",
                      "slices": [{"sources": [{"model": str(f["c0"]), "layer_range": [2, 9]}]}]},
        ["slices[0].sources[0].layer_range", "4 layers"]),
    "unequal layer ranges in one slice": (
        lambda f, w: {"merge_method": "linear", "slices": [{"sources": [
            {"model": str(f["c0"]), "layer_range": [0, 2], "parameters": {"weight": 1}},
            {"model": str(f["c1"]), "layer_range": [0, 3], "parameters": {"weight": 1}}]}]},
        ["slices[0].sources", "unequal"]),
    "nonexistent model path": (
        lambda f, w: {"merge_method": "linear",
                      "models": [{"model": str(f["c0"]), "parameters": {"weight": 1}},
                                 {"model": "/no/such/model", "parameters": {"weight": 1}}]},
        ["models[1].model", "/no/such/model"]),
    "mismatched hidden sizes": (
        lambda f, w: {"merge_method": "linear",
                      "models": [{"model": str(f["c0"]), "parameters": {"weight": 1}},
                                 {"model": str(w), "parameters": {"weight": 1}}]},
        ["mismatched shapes"]),
    "empty models list": (lambda f, w: {"merge_method": "linear", "models": []}, ["models", "empty"]),
    "both models and slices": (
        lambda f, w: {"merge_method": "linear", "models": two(f),
                      "slices": [{"sources": [{"model": str(f["c0"]), "layer_range": [0, 4]}]}]},
        ["models/slices"]),
    "unknown dtype": (lambda f, w: {"merge_method": "linear", "models": two(f), "dtype": "bf17"},
                      ["dtype", "bfloat16"]),
    "non-numeric string for a number": (
        lambda f, w: {"merge_method": "ties", "base_model": str(f["base"]),
                      "models": two(f, {"weight": 0.5, "density": "half"})},
        ["models[0].parameters.density", "must be a number", "half"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_config(case, family, wide_model, tmp_path):
    make, needles = CASES[case]
    cfg = tmp_path / "cfg.yml"
    cfg.write_text(yaml.safe_dump(make(family, wide_model)))
    out = tmp_path / "out"
    assert_one_line_error(mergekit_yaml(cfg, out), *needles)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.yml"]


def test_malformed_yaml(tmp_path):
    cfg = tmp_path / "cfg.yml"
    cfg.write_text("merge_method: linear\nmodels:\n  - model: a\n   parameters: {weight: 1\n")
    assert_one_line_error(mergekit_yaml(cfg, tmp_path / "out"), "cfg.yml", "malformed YAML", "line")
    assert not (tmp_path / "out").exists()


def test_missing_config_file(tmp_path):
    assert_one_line_error(mergekit_yaml(tmp_path / "nope.yml", tmp_path / "out"), "nope.yml")


def test_output_folder_not_empty_is_left_untouched(family, tmp_path):
    cfg = tmp_path / "cfg.yml"
    cfg.write_text(yaml.safe_dump({"merge_method": "linear", "models": two(family)}))
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert_one_line_error(mergekit_yaml(cfg, out), "OUT_DIR", "--overwrite")
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    assert (out / "precious.txt").read_text() == "keep me"


def test_bad_shard_size(family, tmp_path):
    cfg = tmp_path / "cfg.yml"
    cfg.write_text(yaml.safe_dump({"merge_method": "linear", "models": two(family)}))
    assert_one_line_error(mergekit_yaml(cfg, tmp_path / "out", "--out-shard-size", "lots"),
                          "--out-shard-size")


def test_dry_run_prints_plan_and_writes_nothing(family, tmp_path):
    cfg = tmp_path / "cfg.yml"
    cfg.write_text(yaml.safe_dump({"merge_method": "linear", "models": two(family)}))
    result = mergekit_yaml(cfg, tmp_path / "out", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "method: linear" in result.stdout and "model.layers.3.mlp.down_proj.weight" in result.stdout
    assert not (tmp_path / "out").exists()


def test_help_does_not_import_torch():
    code = ("import sys; from merge import cli; "
            "assert 'torch' not in sys.modules, 'torch imported'; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "ok", result.stderr


def test_validation_reads_headers_without_importing_torch(family, tmp_path):
    cfg = tmp_path / "cfg.yml"
    cfg.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": str(family["base"]),
                                   "models": two(family, {"weight": 1, "density": 0.5})}))
    code = ("import sys; from merge.config import load_config; from merge.plan import build_plan; "
            f"p = build_plan(load_config({str(cfg)!r})); assert len(p.tensors) > 30; "
            "assert 'torch' not in sys.modules, 'torch imported'; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "ok", result.stderr
