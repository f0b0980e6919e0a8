"""Vocabulary merging: build the output vocabulary first, then re-index every model's embedding and
head rows to it before they are merged.

Rules (docs/tokenizers.md):
* output vocabulary: `base` (the base's tokens), `union` (the base's, then every other model's new
  tokens in order of appearance), or a model reference (that model's tokens); plus any token named
  under `tokenizer.tokens` that is not there yet.
* a model that lacks a token gets the row from, in order: an explicit `tokens` entry, the only model
  that has it, the base, the mean over the models that have it.
* under a built vocabulary, embedding rows are merged linearly with the models' weights
  (`embed_slerp: true` interpolates spherically for two-model merges); `force: true` puts the named
  source's row in the output as-is.
* without any tokenizer setting, models whose vocabularies differ are refused, unless the user opts
  in to truncation (`--truncate-vocab`: rows past the smallest vocabulary are dropped).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from merge.errors import ConfigError, EvomergeError

ZERO = ("zero",)


@dataclass
class VocabPlan:
    tokens: list[str]                        # output vocabulary in id order (before padding)
    size: int                                # rows in the output (after pad_to_multiple_of)
    rows: dict[str, list[int]]               # model → its row for each output id, -1 if missing
    fills: dict[int, tuple]                  # output id → ("row", model, row) | ("mean", [(m, r)]) | ZERO
    forced: dict[int, tuple[str, int]] = field(default_factory=dict)
    source: str = "base"                     # base | union | model reference | truncate
    linear: bool = True                      # merge rows linearly (False: run the method kernel)
    embed_slerp: bool = False
    tokenizer_from: Optional[str] = None     # model whose tokenizer files are the starting point
    added: list[tuple[str, bool]] = field(default_factory=list)  # (token, special) to add to it


def tokenizer_vocab(folder: Path, label: str) -> tuple[dict[str, int], set[str]]:
    """token → id (added tokens included) and the set of special tokens, without importing torch."""
    tj = folder / "tokenizer.json"
    if tj.is_file():
        data = json.loads(tj.read_text())
        from tokenizers import Tokenizer

        vocab = Tokenizer.from_str(json.dumps(data)).get_vocab(with_added_tokens=True)
        special = {t["content"] for t in data.get("added_tokens", []) if t.get("special")}
        return vocab, special
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(folder, use_fast=True)
        if not getattr(tok, "is_fast", False):
            raise ValueError("no fast version")
        return tok.get_vocab(), set(tok.all_special_tokens)
    except Exception as e:
        raise EvomergeError(f"{label}: its tokenizer has no tokenizer.json and cannot be rebuilt as "
                            f"a fast tokenizer ({type(e).__name__}: {str(e)[:80]}); save it with a "
                            f"recent transformers or choose another tokenizer source") from None


def _embedding_rows(src) -> int:
    from merge import architecture

    arch = architecture.infer(src.config, list(src.tensors))
    name = arch.embedding_name()
    if name is None:
        raise EvomergeError(f"{src.label}: cannot find its token embedding tensor")
    return src.tensors[name].shape[0]


def plan_vocab(cfg, sources: dict[str, Any], inputs_order: list[str], truncate: bool,
               ) -> Optional[VocabPlan]:
    """The vocabulary plan, or None when every model already shares one vocabulary."""
    tok_cfg = cfg.tokenizer
    source = tok_cfg.source if tok_cfg else cfg.tokenizer_source
    rows = {ref: _embedding_rows(src) for ref, src in sources.items()}
    base = cfg.base_model

    if source is None:
        if len(set(rows.values())) > 1 or not _same_tokenizers(sources):
            if truncate:
                return _truncated(rows)
            desc = ", ".join(f"'{r}': {n}" for r, n in rows.items())
            raise ConfigError("tokenizer_source", f"the models' vocabularies differ (embedding rows "
                                                  f"{desc}); set tokenizer_source: base, union or a "
                                                  f"model (see docs/tokenizers.md), or pass "
                                                  f"--truncate-vocab to cut to the smallest")
        return None

    field_name = "tokenizer.source" if tok_cfg else "tokenizer_source"
    if source not in ("base", "union") and source not in sources:
        raise ConfigError(field_name, f"'{source}' is not one of the merged models; use base, union "
                                      f"or one of {', '.join(sources)}")
    if not base:
        base = inputs_order[0]  # no base model: the first model plays its part
    vocabs = {ref: tokenizer_vocab(src.folder, src.label) for ref, src in sources.items()}
    tokens_cfg = (tok_cfg.tokens if tok_cfg else None) or {}
    pad = tok_cfg.pad_to_multiple_of if tok_cfg else None
    if pad is not None and pad < 1:
        raise ConfigError("tokenizer.pad_to_multiple_of", "must be a positive integer")

    start = base if source in ("base", "union") else source
    out_tokens = _ordered(vocabs[start][0])
    added: list[tuple[str, bool]] = []
    if source == "union":
        known = set(out_tokens)
        for ref in inputs_order:
            vocab, special = vocabs[ref]
            for tok in _ordered(vocab):
                if tok not in known:
                    known.add(tok)
                    out_tokens.append(tok)
                    added.append((tok, tok in special))
    for tok in tokens_cfg:
        if tok not in set(out_tokens):
            out_tokens.append(tok)
            added.append((tok, True))

    unchanged = (len(set(rows.values())) == 1 and not added and not tokens_cfg and pad is None
                 and all(v[0] == vocabs[start][0] for v in vocabs.values()))
    if unchanged:
        return None  # one shared vocabulary: the method merges embeddings like any other tensor

    out_id = {t: i for i, t in enumerate(out_tokens)}
    model_rows = {}
    for ref, (vocab, _) in vocabs.items():
        r = [-1] * len(out_tokens)
        for tok, i in vocab.items():
            if tok in out_id and i < rows[ref]:
                r[out_id[tok]] = i
        model_rows[ref] = r

    explicit, forced = _explicit_sources(tokens_cfg, sources, vocabs, rows, out_id)
    fills: dict[int, tuple] = {}
    for j, tok in enumerate(out_tokens):
        have = [(ref, model_rows[ref][j]) for ref in sources if model_rows[ref][j] >= 0]
        if len(have) == len(sources) and j not in explicit:
            continue
        if j in explicit:
            fills[j] = explicit[j]
        elif len(have) == 1:
            fills[j] = ("row", *have[0])
        elif base and model_rows[base][j] >= 0:
            fills[j] = ("row", base, model_rows[base][j])
        elif have:
            fills[j] = ("mean", have)
        else:
            fills[j] = ZERO
    # Rows past the tokenizer (padding some models carry, e.g. for tensor parallelism) are kept
    # as zero rows so the output is never smaller than its vocabulary source.
    size = max(len(out_tokens), rows[start])
    if pad:
        size = -(-size // pad) * pad
    embed_slerp = bool((cfg.parameters or {}).get("embed_slerp", False))
    return VocabPlan(out_tokens, size, model_rows, fills, forced, source, True, embed_slerp,
                     tokenizer_from=start, added=added)


def _ordered(vocab: dict[str, int]) -> list[str]:
    return [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]


def _same_tokenizers(sources) -> bool:
    blobs = set()
    for src in sources.values():
        tj = src.folder / "tokenizer.json"
        if not tj.is_file():
            return True  # nothing to compare cheaply; row counts already agree
        blobs.add(tj.read_bytes())
    if len(blobs) <= 1:
        return True
    vocabs = [tokenizer_vocab(src.folder, src.label)[0] for src in sources.values()]
    return all(v == vocabs[0] for v in vocabs)


def _truncated(rows: dict[str, int]) -> VocabPlan:
    n = min(rows.values())
    return VocabPlan([], n, {ref: list(range(n)) for ref in rows}, {}, source="truncate",
                     linear=False)


def _explicit_sources(tokens_cfg: dict, sources, vocabs, rows, out_id):
    """`tokenizer.tokens` entries → fills and forced rows, each checked before any tensor loads."""
    explicit: dict[int, tuple] = {}
    forced: dict[int, tuple[str, int]] = {}
    for tok, entry in tokens_cfg.items():
        path = f"tokenizer.tokens.{tok}"
        if not isinstance(entry, dict) or "source" not in entry:
            raise ConfigError(path, "give {source: MODEL} or {source: {kind: model_token, model: "
                                    "MODEL, token: T | token_id: N}} or {source: {kind: zero}}")
        unknown = set(entry) - {"source", "force"}
        if unknown:
            raise ConfigError(path, f"unknown key(s) {sorted(unknown)}; use source and force")
        src = entry["source"]
        if isinstance(src, str):
            src = {"kind": "model_token", "model": src, "token": tok}
        if not isinstance(src, dict) or src.get("kind") not in ("model_token", "zero"):
            raise ConfigError(path + ".source", "kind must be model_token or zero")
        j = out_id[tok]
        if src["kind"] == "zero":
            fill = ZERO
        else:
            model = src.get("model")
            if model not in sources:
                raise ConfigError(path + ".source", f"'{model}' is not one of the merged models; "
                                                    f"name one of {', '.join(sources)}")
            if "token_id" in src:
                row = src["token_id"]
                if not isinstance(row, int) or not 0 <= row < rows[model]:
                    raise ConfigError(path + ".source.token_id",
                                      f"{row!r} is out of range for '{model}' (0 … {rows[model] - 1})")
            else:
                name = src.get("token", tok)
                row = vocabs[model][0].get(name, -1)
                if row < 0 or row >= rows[model]:
                    raise ConfigError(path + ".source", f"'{model}' has no token {name!r}; name a "
                                                        f"model that has it or use kind: zero")
            fill = ("row", model, row)
        explicit[j] = fill
        if entry.get("force"):
            if fill == ZERO:
                forced[j] = ("", -1)
            else:
                forced[j] = (fill[1], fill[2])
    return explicit, forced


# --- execution ----------------------------------------------------------------------------------

def reindex(vp: VocabPlan, raw: dict[str, Any]) -> dict[str, Any]:
    """Each model's tensor with rows in output-vocabulary order (fills applied, padding zero)."""
    import torch

    any_t = next(iter(raw.values()))
    rest = tuple(any_t.shape[1:])
    fill_rows = {}
    for j, spec in vp.fills.items():
        if spec[0] == "row":
            fill_rows[j] = raw[spec[1]][spec[2]].float()
        elif spec[0] == "mean":
            fill_rows[j] = torch.stack([raw[m][r].float() for m, r in spec[1]]).mean(0)
        else:
            fill_rows[j] = torch.zeros(rest, dtype=torch.float32, device=any_t.device)
    out = {}
    for ref, t in raw.items():
        rows = torch.tensor(vp.rows[ref], dtype=torch.long, device=t.device)
        x = torch.zeros((vp.size, *rest), dtype=t.dtype, device=t.device)
        present = (rows >= 0).nonzero().flatten()
        x[present] = t[rows[present]]
        for j, row in fill_rows.items():
            if vp.rows[ref][j] < 0:  # models that have the token keep their own row
                x[j] = row.to(t.dtype)
        out[ref] = x
    return out


def apply_forced(vp: VocabPlan, merged, raw: dict[str, Any]):
    for j, (model, row) in vp.forced.items():
        merged[j] = 0 if not model else raw[model][row].to(merged.dtype)
    return merged
