"""The demo model family (scripts/make_demo_family.py) and its lm-eval tasks (eval_tasks/).

Uses the quick recipe: small enough to build twice in a test session, offline.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
TASKS_DIR = REPO / "eval_tasks"


def _load_script():
    spec = importlib.util.spec_from_file_location("make_demo_family", REPO / "scripts" / "make_demo_family.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it is executing
    spec.loader.exec_module(module)
    return module


demo = _load_script()


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return demo.build_family(tmp_path_factory.mktemp("demo") / "fam", seed=0, quick=True)


def _state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


def _model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def test_family_layout_and_loading(family):
    from transformers import AutoTokenizer

    assert set(family) == {"base", *demo.SKILLS}
    for path in family.values():
        tok = AutoTokenizer.from_pretrained(path)
        assert tok.encode("rev: ab = ba</s>") == [demo.BOS_ID, *demo.encode("rev: ab = ba"), demo.EOS_ID]
        assert tok.decode(tok.encode("cip: ab =", add_special_tokens=False)) == "cip: ab ="
        assert all(t.dtype == torch.float32 for t in _state(path).values())


def test_build_is_deterministic_and_cached(family, tmp_path):
    again = demo.build_family(tmp_path / "fam", seed=0, quick=True)
    for name in family:
        a, b = _state(family[name]), _state(again[name])
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    # A complete family with the same seed and recipe is reused, not retrained.
    stamp = (again["base"] / "model.safetensors").stat().st_mtime_ns
    t0 = time.time()
    assert demo.build_family(tmp_path / "fam", seed=0, quick=True) == again
    assert time.time() - t0 < 5
    assert (again["base"] / "model.safetensors").stat().st_mtime_ns == stamp
    # The manifest (written last) is what identifies the family: seed, recipe and its version.
    manifest = json.loads((tmp_path / "fam" / demo.MANIFEST).read_text())
    assert manifest["seed"] == 0 and manifest["quick"] is True
    assert manifest["recipe_version"] == demo.RECIPE_VERSION


def test_specialists_beat_base_on_their_skill(family):
    items = demo.make_eval_items()
    base = _model(family["base"])
    for skill in demo.SKILLS:
        rows = items[(skill, "fit")]
        own, ref = demo.score(_model(family[skill]), rows), demo.score(base, rows)
        assert own >= ref + 0.2, (skill, own, ref)


def test_committed_task_data_is_current_and_disjoint(tmp_path):
    demo.write_tasks(tmp_path)
    for f in sorted((tmp_path).rglob("*.*")):
        committed = TASKS_DIR / f.relative_to(tmp_path)
        assert committed.read_text() == f.read_text(), f"{committed} is stale: rerun --write-tasks"
    inputs = [r["input"] for rows in demo.make_eval_items().values() for r in rows]
    assert len(inputs) == len(set(inputs)) == len(demo.SKILLS) * sum(demo.SPLIT_SIZES.values())


def test_training_sampler_never_emits_evaluation_inputs():
    forbidden = demo.eval_inputs()
    # A sampler restricted to 3-letter strings hits the forbidden ones often if it does not reject.
    sampler = demo.Sampler(0, forbidden, max_len=3)
    mix = (("copy", 1.0),)
    texts = set()
    for _ in range(20):
        ids, answer = sampler.batch(mix, 64)
        for row in ids.tolist():
            text = "".join(demo.VOCAB[i] for i in row)
            texts.add(text.split(": ")[1].split(" =")[0])
    short_forbidden = {s for s in forbidden if len(s) == 3}
    assert short_forbidden and not texts & short_forbidden


def test_tasks_load_in_lm_eval_from_any_cwd(family, tmp_path, monkeypatch):
    import lm_eval.evaluator
    import lm_eval.tasks
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    monkeypatch.chdir(tmp_path)  # the data must not be looked up relative to the cwd
    names = [f"demo_{s}_{split}" for s in demo.SKILLS for split in ("fit", "heldout")]
    tm = lm_eval.tasks.TaskManager(include_path=str(TASKS_DIR))
    task_dict = lm_eval.tasks.get_task_dict(names + ["demo_fit"], tm)
    model = _model(family["double"])
    lm = HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(family["double"]),
              batch_size=16, device="cpu")
    limit = 20
    res = lm_eval.evaluator.evaluate(lm=lm, task_dict=task_dict, limit=limit, verbosity="ERROR")["results"]
    items = demo.make_eval_items()
    for name in names:
        _, skill, split = name.split("_")
        # lm-eval's exact match (loglikelihood + acc) agrees with the family's own greedy scorer.
        assert res[name]["acc,none"] == pytest.approx(demo.score(model, items[(skill, split)][:limit])), name
    assert res["demo_double_fit"]["acc,none"] > 0
    assert "demo_fit" in res
