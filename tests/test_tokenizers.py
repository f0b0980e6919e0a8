"""Vocabulary merging: models whose tokenizers differ by added tokens and by size."""
from __future__ import annotations

import json

import pytest
import torch

from merge.config import MergeConfig
from merge.engine import MergeOptions, merge_to_folder
from merge.errors import ConfigError, EvomergeError
from merge.plan import build_plan
from tinymodels import build_model, load_state, make_tokenizer

N_BASE = len(make_tokenizer())


@pytest.fixture(scope="module")
def vocab_family(tmp_path_factory):
    """base (no added tokens), a (+<a1>, <a2>), b (+<b1>), each a fine-tune of the base."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("vocab")
    base = build_model(root / "base", vocab_size=N_BASE)
    out = {"base": base}
    for name, extra, seed in (("a", ["<a1>", "<a2>"], 1), ("b", ["<b1>"], 2)):
        tok = make_tokenizer(extra)
        model = AutoModelForCausalLM.from_pretrained(base)
        model.resize_token_embeddings(len(tok))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = root / name
    return out


def cfg_for(fam, **extra):
    d = {"merge_method": "task_arithmetic", "base_model": str(fam["base"]),
         "models": [{"model": str(fam["a"]), "parameters": {"weight": 0.75}},
                    {"model": str(fam["b"]), "parameters": {"weight": 0.25}}]}
    d.update(extra)
    return d


def merge(cfg, out, **opts):
    merge_to_folder(MergeConfig.from_dict(cfg), out, MergeOptions(quiet=True, **opts))
    return load_state(out)


def vocab_of(path):
    return json.loads((path / "tokenizer.json").read_text())


def token_id(path, token):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path / "tokenizer.json")).token_to_id(token)


def test_different_vocabularies_without_setting_are_refused(vocab_family):
    with pytest.raises(ConfigError, match="tokenizer_source"):
        build_plan(MergeConfig.from_dict(cfg_for(vocab_family)))


def test_truncate_is_explicit_opt_in(vocab_family, tmp_path):
    out = merge(cfg_for(vocab_family), tmp_path / "o", truncate_vocab=True)
    assert out["model.embed_tokens.weight"].shape[0] == N_BASE
    base, a, b = (load_state(vocab_family[k]) for k in ("base", "a", "b"))
    k = "model.embed_tokens.weight"
    want = base[k] + 0.75 * (a[k][:N_BASE] - base[k]) + 0.25 * (b[k][:N_BASE] - base[k])
    torch.testing.assert_close(out[k], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tensor", ["model.embed_tokens.weight", "lm_head.weight"])
def test_union_reindexes_rows_token_by_token(vocab_family, tmp_path, tensor):
    out_dir = tmp_path / "o"
    out = merge(cfg_for(vocab_family, tokenizer_source="union"), out_dir)
    base, a, b = (load_state(vocab_family[k]) for k in ("base", "a", "b"))
    assert out[tensor].shape[0] == N_BASE + 3
    assert json.loads((out_dir / "config.json").read_text())["vocab_size"] == N_BASE + 3
    ids = {t: token_id(out_dir, t) for t in ("<a1>", "<a2>", "<b1>", "w5")}
    assert [ids["<a1>"], ids["<a2>"], ids["<b1>"]] == [N_BASE, N_BASE + 1, N_BASE + 2]
    # a shared token: the method (task arithmetic) on the models' own rows; the weights sum to
    # 1, so base + 0.75(a − base) + 0.25(b − base) is 0.75a + 0.25b
    w5 = ids["w5"]
    torch.testing.assert_close(out[tensor][w5], 0.75 * a[tensor][w5] + 0.25 * b[tensor][w5])
    # a token only `a` has: every other model is filled from `a`, so the task vectors are zero
    # there and the merge is a's row
    torch.testing.assert_close(out[tensor][ids["<a2>"]], a[tensor][N_BASE + 1])
    torch.testing.assert_close(out[tensor][ids["<b1>"]], b[tensor][N_BASE])


def test_model_source_takes_that_models_vocabulary(vocab_family, tmp_path):
    out_dir = tmp_path / "o"
    out = merge(cfg_for(vocab_family, tokenizer_source=str(vocab_family["a"])), out_dir)
    a = load_state(vocab_family["a"])
    assert out["model.embed_tokens.weight"].shape[0] == N_BASE + 2
    assert token_id(out_dir, "<b1>") is None and token_id(out_dir, "<a1>") == N_BASE
    torch.testing.assert_close(out["model.embed_tokens.weight"][N_BASE],
                               a["model.embed_tokens.weight"][N_BASE])


def test_base_source_drops_added_tokens(vocab_family, tmp_path):
    out = merge(cfg_for(vocab_family, tokenizer_source="base"), tmp_path / "o")
    assert out["model.embed_tokens.weight"].shape[0] == N_BASE
    assert token_id(tmp_path / "o", "<a1>") is None


def test_explicit_token_sources_force_and_padding(vocab_family, tmp_path):
    fam = vocab_family
    tokens = {"<a1>": {"source": {"kind": "model_token", "model": str(fam["b"]), "token": "w7"}},
              "w5": {"source": str(fam["a"]), "force": True},
              "<new>": {"source": {"kind": "zero"}}}
    cfg = cfg_for(fam, tokenizer={"source": "union", "tokens": tokens, "pad_to_multiple_of": 48})
    out_dir = tmp_path / "o"
    out = merge(cfg, out_dir)
    a, b = load_state(fam["a"]), load_state(fam["b"])
    e = "model.embed_tokens.weight"
    n_tokens = N_BASE + 4
    assert out[e].shape[0] == 144
    assert json.loads((out_dir / "config.json").read_text())["vocab_size"] == out[e].shape[0]
    # explicit fill: b (and the base) lack <a1> and get b's "w7" row; a keeps its own <a1> row
    torch.testing.assert_close(out[e][token_id(out_dir, "<a1>")],
                               0.75 * a[e][N_BASE] + 0.25 * b[e][token_id(fam["b"], "w7")])
    # force: every model gets the named source's row, so the merge of equal rows is that row
    torch.testing.assert_close(out[e][token_id(out_dir, "w5")], a[e][token_id(fam["a"], "w5")])
    assert token_id(out_dir, "<new>") == N_BASE + 3
    assert torch.count_nonzero(out[e][N_BASE + 3]) == 0
    # padding rows: each model's mean row, merged linearly — the mean of the merged rows
    for row in out[e][n_tokens:]:
        torch.testing.assert_close(row, out[e][:n_tokens].mean(0))


def test_merged_tokenizer_and_embeddings_agree_and_generate(vocab_family, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = tmp_path / "o"
    merge(cfg_for(vocab_family, tokenizer_source="union", chat_template="chatml"), out_dir)
    tok = AutoTokenizer.from_pretrained(out_dir)
    model = AutoModelForCausalLM.from_pretrained(out_dir)
    ids = tok("w3 <b1> <a2>")["input_ids"]
    assert ids[-2:] == [N_BASE + 2, N_BASE + 1]
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    gen = model.generate(torch.tensor([ids]), max_new_tokens=3, do_sample=False, pad_token_id=3)
    assert gen.shape[1] == len(ids) + 3
    text = tok.apply_chat_template([{"role": "user", "content": "w1"}], tokenize=False)
    assert "<|im_start|>user" in text


def test_tied_embeddings_stay_tied_under_union(tmp_path):
    from transformers import AutoModelForCausalLM

    base = build_model(tmp_path / "base", vocab_size=N_BASE, tie_word_embeddings=True)
    tok = make_tokenizer(["<x>"])
    m = AutoModelForCausalLM.from_pretrained(base)
    m.resize_token_embeddings(len(tok))
    m.save_pretrained(tmp_path / "x")
    tok.save_pretrained(tmp_path / "x")
    out = merge({"merge_method": "linear", "tokenizer_source": "union",
                 "models": [{"model": str(base), "parameters": {"weight": 1.0}},
                            {"model": str(tmp_path / "x"), "parameters": {"weight": 1.0}}]},
                tmp_path / "o")
    assert "lm_head.weight" not in out and out["model.embed_tokens.weight"].shape[0] == N_BASE + 1
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_chat_template_auto_picks_most_common(vocab_family, tmp_path):
    for k in ("a", "b"):
        (tmp_path / k).mkdir()
        for f in vocab_family[k].iterdir():
            (tmp_path / k / f.name).write_bytes(f.read_bytes())
    (tmp_path / "a" / "chat_template.jinja").write_text("{{ 'A' }}")
    (tmp_path / "b" / "chat_template.jinja").write_text("{{ 'A' }}")
    cfg = {"merge_method": "linear", "chat_template": "auto", "tokenizer_source": "union",
           "models": [{"model": str(tmp_path / k), "parameters": {"weight": 1}} for k in ("a", "b")]}
    merge(cfg, tmp_path / "o")
    assert (tmp_path / "o" / "chat_template.jinja").read_text() == "{{ 'A' }}"


# --- bad inputs ---------------------------------------------------------------------------------

def test_tokens_entry_naming_a_model_not_in_the_merge(vocab_family):
    cfg = cfg_for(vocab_family, tokenizer={"source": "union",
                                           "tokens": {"<a1>": {"source": "/elsewhere/model"}}})
    with pytest.raises(ConfigError, match=r"tokenizer.tokens.<a1>.source.*not one of the merged"):
        build_plan(MergeConfig.from_dict(cfg))


def test_token_id_out_of_range(vocab_family):
    src = {"kind": "model_token", "model": str(vocab_family["b"]), "token_id": 10_000}
    cfg = cfg_for(vocab_family, tokenizer={"source": "union", "tokens": {"<a1>": {"source": src}}})
    with pytest.raises(ConfigError, match=r"token_id.*out of range"):
        build_plan(MergeConfig.from_dict(cfg))


def test_slow_tokenizer_that_cannot_be_rebuilt(vocab_family, tmp_path):
    broken = tmp_path / "slow"
    broken.mkdir()
    for f in vocab_family["b"].iterdir():
        if f.name != "tokenizer.json":
            (broken / f.name).write_bytes(f.read_bytes())
    cfg = cfg_for(vocab_family, tokenizer_source="union")
    cfg["models"][1]["model"] = str(broken)
    with pytest.raises(EvomergeError, match="cannot be rebuilt"):
        build_plan(MergeConfig.from_dict(cfg))


def test_unknown_tokenizer_source_and_chat_template(vocab_family):
    with pytest.raises(EvomergeError, match="tokenizer_source.*does not exist"):
        build_plan(MergeConfig.from_dict(cfg_for(vocab_family, tokenizer_source="/other")))
    with pytest.raises(ConfigError, match="chat_template"):
        build_plan(MergeConfig.from_dict(cfg_for(vocab_family, tokenizer_source="union",
                                                 chat_template="chatmlx")))
