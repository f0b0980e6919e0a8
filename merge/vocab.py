"""Vocabulary merging: build the output vocabulary first, then re-index every model's embedding and
head rows to it; the configured merge method then runs on the re-indexed rows like on any tensor.

The rules are the reference toolkit's (mergekit 0.1.5; docs/tokenizers.md):
* output vocabulary: `base` (the base's tokens; without a base model, the first model's), `union`
  (those, then the other models' new vocabulary tokens, then their new added tokens, in the order
  the models are listed), or a model reference (that model's tokens); plus every token named under
  `tokenizer.tokens` that is not there yet (as a plain added token). One row per token id, padded
  to `pad_to_multiple_of`.
* every model keeps its own row for a token it has. Where a model lacks the token (or the token is
  forced), it gets a fill row: the `tokens` entry's source if there is one; else the row of the only
  model that has it; else the base's; else the mean over the models that have it; else zeros.
  `force: true` gives every model the fill row, so the method merges equal rows.
* padding rows are, per model, the mean of its re-indexed rows.
* without any tokenizer setting, models whose embeddings differ in size are refused unless the user
  opts in to truncation (`--truncate-vocab`: rows past the smallest vocabulary are dropped).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from merge.errors import ConfigError, EvomergeError

ZERO = ("zero",)


@dataclass
class VocabPlan:
    tokens: list[Optional[str]]              # output vocabulary by id (None: an unused id)
    size: int                                # rows in the output (after pad_to_multiple_of)
    rows: dict[str, list[int]]               # model → its row for each output id, -1 if missing
    configured: dict[int, tuple] = field(default_factory=dict)  # id → ("row", model, row) | ZERO
    forced: set[int] = field(default_factory=set)
    base: Optional[str] = None               # the config's base model: fills rows others lack
    source: str = "base"                     # base | union | model reference | truncate
    tokenizer_from: Optional[str] = None     # model whose tokenizer files are the starting point
    tokenizer_folder: Optional[Path] = None  # its folder (it need not be one of the merged models)
    added: list[dict] = field(default_factory=list)  # added-token entries appended to it, in id order

    @property
    def n_tokens(self) -> int:
        return len(self.tokens) if self.source != "truncate" else self.size


@dataclass
class TokenizerVocab:
    ids: dict[str, int]                      # token → id, added tokens included
    added: dict[str, dict]                   # added token → its entry (special, normalized, ...)


def tokenizer_vocab(folder: Path, label: str) -> TokenizerVocab:
    """A model's tokenizer vocabulary and added tokens, read without importing torch."""
    tj = folder / "tokenizer.json"
    if tj.is_file():
        data = json.loads(tj.read_text())
        from tokenizers import Tokenizer

        vocab = Tokenizer.from_str(json.dumps(data)).get_vocab(with_added_tokens=True)
        added = {t["content"]: {k: v for k, v in t.items() if k != "id"}
                 for t in sorted(data.get("added_tokens", []), key=lambda t: t["id"])}
        return TokenizerVocab(vocab, added)
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(folder, use_fast=True)
        if not getattr(tok, "is_fast", False):
            raise ValueError("no fast version")
        added = {a.content: {"content": a.content, "single_word": a.single_word,
                             "lstrip": a.lstrip, "rstrip": a.rstrip,
                             "normalized": a.normalized, "special": a.special}
                 for _, a in sorted(tok.added_tokens_decoder.items())}
        return TokenizerVocab(tok.get_vocab(), added)
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


def plain_token(token: str) -> dict:
    """The entry of a token added as plain text (not special), as `add_tokens` makes it."""
    return {"content": token, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": True, "special": False}


def plan_vocab(cfg, sources: dict[str, Any], truncate: bool,
               warn: Callable[[str], None] = lambda msg: None) -> Optional[VocabPlan]:
    """The vocabulary plan, or None when no tokenizer setting is given and none is needed."""
    tok_cfg = cfg.tokenizer
    source = tok_cfg.source if tok_cfg else cfg.tokenizer_source
    rows = {ref: _embedding_rows(src) for ref, src in sources.items()}

    if source is None:
        if len(set(rows.values())) > 1:
            if truncate:
                return _truncated(rows)
            desc = ", ".join(f"'{r}': {n}" for r, n in rows.items())
            raise ConfigError("tokenizer_source", f"the models' vocabularies differ (embedding rows "
                                                  f"{desc}); set tokenizer_source: base, union or a "
                                                  f"model (see docs/tokenizers.md), or pass "
                                                  f"--truncate-vocab to cut to the smallest")
        if not _same_tokenizers(sources):
            warn("tokenizer_source: the models' tokenizers differ but their embeddings have the "
                 "same size; rows are merged by position, as mergekit does (set tokenizer_source: "
                 "union to match them token by token)")
        return None

    field_name = "tokenizer.source" if tok_cfg else "tokenizer_source"
    order = cfg.referenced_models()          # base first, then the models as listed
    first = cfg.base_model or order[0]       # no base model: the first model plays its part
    vocabs = {ref: tokenizer_vocab(src.folder, src.label) for ref, src in sources.items()}
    folders = {ref: src.folder for ref, src in sources.items()}
    if source not in ("base", "union") and source not in sources:
        # a model outside the merge lends only its tokenizer, as in the reference
        from merge.sources import ModelRef, resolve_folder

        folders[source] = resolve_folder(ModelRef.parse(source), field_name)
        if not any((folders[source] / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            raise ConfigError(field_name, f"'{source}' has no tokenizer files; use base, union, "
                                          f"one of the merged models or a folder with a tokenizer")
        vocabs[source] = tokenizer_vocab(folders[source], field_name)
    tokens_cfg = (tok_cfg.tokens if tok_cfg else None) or {}
    pad = tok_cfg.pad_to_multiple_of if tok_cfg else None
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 1):
        raise ConfigError("tokenizer.pad_to_multiple_of", "must be a positive integer")

    start = first if source in ("base", "union") else source
    out_id = dict(vocabs[start].ids)
    added: list[dict] = []

    def add(entry: dict) -> None:
        out_id[entry["content"]] = max(out_id.values(), default=-1) + 1
        added.append(entry)

    if source == "union":
        others = [r for r in order if r != start]
        for ref in others:   # new vocabulary tokens first, in id order ...
            v = vocabs[ref]
            for tok, i in sorted(v.ids.items(), key=lambda kv: kv[1]):
                if tok not in out_id and tok not in v.added and i < rows[ref]:
                    add(plain_token(tok))
        for ref in others:   # ... then new added tokens, with their own settings
            v = vocabs[ref]
            for tok, entry in v.added.items():
                if tok not in out_id and v.ids.get(tok, rows[ref]) < rows[ref]:
                    add(dict(entry))
    for tok in tokens_cfg:
        if tok not in out_id:
            add(plain_token(tok))

    n = max(out_id.values(), default=-1) + 1
    tokens: list[Optional[str]] = [None] * n
    for tok, i in out_id.items():
        tokens[i] = tok
    model_rows = {}
    for ref, v in vocabs.items():
        if ref not in sources:
            continue
        r = [-1] * n
        for j, tok in enumerate(tokens):
            i = v.ids.get(tok, -1) if tok is not None else -1
            if 0 <= i < rows[ref]:
                r[j] = i
        model_rows[ref] = r

    configured, forced = _configured_rows(tokens_cfg, sources, vocabs, rows, out_id, model_rows,
                                           warn)
    size = -(-n // pad) * pad if pad else n
    return VocabPlan(tokens, size, model_rows, configured, forced, cfg.base_model, source,
                     tokenizer_from=start, tokenizer_folder=folders[start], added=added)


def _same_tokenizers(sources) -> bool:
    blobs = set()
    for src in sources.values():
        tj = src.folder / "tokenizer.json"
        if not tj.is_file():
            return True  # nothing to compare cheaply; row counts already agree
        blobs.add(tj.read_bytes())
    if len(blobs) <= 1:
        return True
    vocabs = [tokenizer_vocab(src.folder, src.label).ids for src in sources.values()]
    return all(v == vocabs[0] for v in vocabs)


def _truncated(rows: dict[str, int]) -> VocabPlan:
    n = min(rows.values())
    return VocabPlan([], n, {ref: list(range(n)) for ref in rows}, source="truncate")


def _configured_rows(tokens_cfg: dict, sources, vocabs, rows, out_id, model_rows, warn):
    """`tokenizer.tokens` entries → fill rows and forced ids, each checked before any tensor loads."""
    configured: dict[int, tuple] = {}
    forced: set[int] = set()
    for tok, entry in tokens_cfg.items():
        path = f"tokenizer.tokens.{tok}"
        if entry is None:
            entry = {}
        if not isinstance(entry, dict):
            raise ConfigError(path, "give {source: MODEL} or {source: {kind: model_token, model: "
                                    "MODEL, token: T | token_id: N}} or {source: {kind: zero}}")
        for key in sorted(set(entry) - {"source", "force"}):
            warn(f"{path}.{key}: unknown key, ignored (a token entry takes source and force)")
        from merge.parameters import as_bool

        force = as_bool(entry.get("force", False))
        if not isinstance(force, bool):
            raise ConfigError(path + ".force", f"must be true or false, got {force!r}")
        j = out_id[tok]
        src = entry.get("source")
        if src is None:
            if force:
                raise ConfigError(path + ".source", "force: true needs a source to take the row from")
            continue
        if isinstance(src, str):
            src = {"kind": "model_token", "model": src, "_same_token": True}
        if not isinstance(src, dict) or src.get("kind") not in ("model_token", "zero"):
            raise ConfigError(path + ".source", "kind must be model_token or zero")
        if src["kind"] == "zero":
            fill = ZERO
        else:
            model = src.get("model")
            if model not in sources:
                raise ConfigError(path + ".source", f"'{model}' is not one of the merged models; "
                                                    f"name one of {', '.join(sources)}")
            if "token_id" in src and "token" in src:
                raise ConfigError(path + ".source", "give token or token_id, not both")
            if src.get("_same_token"):
                row = model_rows[model][j]
                if row < 0:
                    raise ConfigError(path + ".source", f"'{model}' has no token {tok!r}; name a "
                                                        f"model that has it or use kind: zero")
            elif "token_id" in src:
                row = src["token_id"]
                if isinstance(row, str) and row.strip().isdigit():
                    row = int(row)
                if isinstance(row, bool) or not isinstance(row, int) or not 0 <= row < rows[model]:
                    raise ConfigError(path + ".source.token_id",
                                      f"{row!r} is out of range for '{model}' (0 … {rows[model] - 1})")
            else:
                name = src.get("token", tok)
                row = vocabs[model].ids.get(name, -1)
                if row < 0 or row >= rows[model]:
                    raise ConfigError(path + ".source", f"'{model}' has no token {name!r}; name a "
                                                        f"model that has it or use kind: zero")
            fill = ("row", model, row)
        configured[j] = fill
        if force:
            forced.add(j)
    return configured, forced


# --- execution ----------------------------------------------------------------------------------

def reindex(vp: VocabPlan, raw: dict[str, Any], base: Optional[str] = None) -> dict[str, Any]:
    """Each model's tensor with rows in output-vocabulary order: own rows where it has the token
    (and it is not forced), fill rows elsewhere, padding rows the model's mean row. `base` is the
    base this tensor is merged against (a slice's own base_model), else the config's."""
    import functools

    import torch

    models = list(raw)
    first = raw[models[0]]
    rest = tuple(first.shape[1:])
    dtype = functools.reduce(torch.promote_types, [t.dtype for t in raw.values()])
    device = first.device
    n = vp.n_tokens
    if vp.source == "truncate":
        return {m: t[:n] for m, t in raw.items()}

    own, present, borrowed = {}, {}, set()
    for m in models:
        idx = torch.tensor(vp.rows[m], dtype=torch.long, device=device)
        have = idx >= 0
        if vp.size == n == raw[m].shape[0] and bool((idx == torch.arange(n, device=device)).all()):
            own[m] = raw[m].to(dtype)      # already in output order: no copy
            borrowed.add(m)
        else:
            own[m] = torch.zeros((vp.size, *rest), dtype=dtype, device=device)
            own[m][:n][have] = raw[m][idx[have]].to(dtype)
        present[m] = have
    count = torch.stack([present[m] for m in models]).sum(0)
    forced = torch.zeros(n, dtype=torch.bool, device=device)
    if vp.forced:
        forced[list(vp.forced)] = True
    # Fill rows are needed only where some model lacks the token or it is forced: usually a few
    # added tokens, so the work (and memory) stays proportional to those rows.
    need = (forced | (count < len(models))).nonzero().flatten()
    if need.numel():
        slot = {int(j): k for k, j in enumerate(need.tolist())}
        sub_own = {m: own[m][need] for m in models}
        sub_have = {m: present[m][need] for m in models}
        sub_count = count[need]
        fill = torch.zeros((len(slot), *rest), dtype=dtype, device=device)
        configured = torch.zeros(len(slot), dtype=torch.bool, device=device)
        for j, spec in vp.configured.items():
            if j not in slot:
                continue
            configured[slot[j]] = True
            if spec == ZERO:
                continue
            _, model, row = spec
            if model not in raw:
                raise EvomergeError(f"tokenizer.tokens: the row of token {vp.tokens[j]!r} comes "
                                    f"from '{model}', which does not contribute to this tensor")
            fill[slot[j]] = raw[model][row].to(dtype)
        free = ~configured
        total = torch.zeros_like(fill)
        for m in models:           # models lacking a token hold zeros there
            total += sub_own[m]
        shape = (-1,) + (1,) * len(rest)
        fill = torch.where((free & (sub_count == 1)).view(shape), total, fill)  # the only donor
        several = free & (sub_count > 1)
        base = base or vp.base
        if base in raw:
            fill = torch.where((several & sub_have[base]).view(shape), sub_own[base], fill)
            several = several & ~sub_have[base]
        mean = total / sub_count.clamp_min(1).to(dtype).view(shape)
        fill = torch.where(several.view(shape), mean, fill)
        sub_forced = forced[need]
        for m in models:
            replace = ~(sub_have[m] & ~sub_forced)
            if bool(replace.any()):
                if m in borrowed:          # never write into the caller's (cached) tensor
                    own[m] = own[m].clone()
                    borrowed.discard(m)
                own[m][need[replace]] = fill[replace]

    if vp.size > n:
        for m in models:
            own[m][n:] = own[m][:n].mean(0)
    return own
