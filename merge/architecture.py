"""Infer a decoder's layer structure from its tensor names and config.json.

No per-architecture tables: a decoder's layer tensors are `<prefix>.<i>.<rest>` with i running over
0..L-1, where L is the config's layer count (`num_hidden_layers`, `n_layer`, `num_layers` or
`n_layers`). Everything else is either before the layers (embeddings) or after them (final norm, the
output head — `lm_head`, or GPT-NeoX's `embed_out`, which is a head although its name says embed).
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

from merge.errors import EvomergeError

# num_hidden_layers: most; n_layer: GPT-2, GPT-J, BLOOM, CodeGen; num_layers: ChatGLM, GPT-Neo;
# n_layers: MPT, DBRX.
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
_INDEXED = re.compile(r"^(?P<prefix>(?:[^.]+\.)*?[^.]+)\.(?P<idx>\d+)\.(?P<rest>.+)$")
_PRE_LAYER = re.compile(r"(embed|wte|wpe|word_embeddings|embd|emb_ln|rotary)", re.IGNORECASE)
_EMBEDDING = re.compile(r"(embed_tokens|wte|word_embeddings|embed_in)\.weight$")
_HEAD = re.compile(r"(^|\.)(lm_head|embed_out)\.(weight|bias)$")


@dataclass(frozen=True)
class Architecture:
    model_type: str
    layer_prefix: str          # e.g. "model.layers"
    num_layers: int
    layer_count_key: str
    pre: tuple[str, ...]       # tensor names before the layers
    layers: tuple[tuple[str, ...], ...]  # per layer: the `rest` parts
    post: tuple[str, ...]      # tensor names after the layers
    tied_embeddings: bool

    def layer_tensor(self, layer: int, rest: str) -> str:
        return f"{self.layer_prefix}.{layer}.{rest}"

    def head_name(self) -> str | None:
        for n in self.post:
            if is_head(n) and n.endswith(".weight"):
                return n
        return None

    def embedding_name(self) -> str | None:
        for n in self.pre:
            if is_embedding(n):
                return n
        return None


def is_head(name: str) -> bool:
    """The output head's tensors (a tied model saves none)."""
    return bool(_HEAD.search(name))


def is_embedding(name: str) -> bool:
    """The input token embedding's weight."""
    return bool(_EMBEDDING.search(name))


def layer_count(config: dict) -> tuple[str, int]:
    for cfg in (config, config.get("text_config") or {}):
        for key in LAYER_COUNT_KEYS:
            if isinstance(cfg.get(key), int):
                return key, cfg[key]
    raise EvomergeError(f"config.json names no layer count ({' / '.join(LAYER_COUNT_KEYS)}); "
                        f"this layout is not supported")


def infer(config: dict, tensor_names: list[str], label: str = "model") -> Architecture:
    key, n = layer_count(config)
    by_prefix: dict[str, dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))
    for name in tensor_names:
        m = _INDEXED.match(name)
        if m:
            by_prefix[m["prefix"]][int(m["idx"])].append(m["rest"])
    candidates = [p for p, layers in by_prefix.items() if sorted(layers) == list(range(n))]
    if not candidates:
        raise EvomergeError(
            f"{label}: cannot find {n} numbered decoder layers (config '{key}') among its tensor "
            f"names; this layout is not supported")
    # Nested indices (experts inside a layer) have the layer prefix as their own prefix; the
    # shortest matching prefix is the decoder stack.
    prefix = min(candidates, key=len)
    layers = tuple(tuple(by_prefix[prefix][i]) for i in range(n))
    pre, post = [], []
    layer_re = re.compile(rf"^{re.escape(prefix)}\.\d+\.")
    for name in tensor_names:
        if layer_re.match(name):
            continue
        (pre if _PRE_LAYER.search(name) and not is_head(name) else post).append(name)
    tied = bool(config.get("tie_word_embeddings", config.get("model_type") == "gpt2"))
    if not any(is_head(n) and n.endswith(".weight") for n in post):
        tied = True  # no separate head is saved: the embedding doubles as the head
    return Architecture(config.get("model_type", "unknown"), prefix, n, key, tuple(pre), layers,
                        tuple(post), tied)


def module_param_names(config: dict, tensor_names) -> dict[str, str]:
    """Checkpoint tensor name → that parameter's name in the transformers model, where they differ.

    transformers renames some checkpoint keys as it loads them (GPT-NeoX's `embed_out` is the module
    `lm_head`), and PEFT adapters name modules as the loaded model does. Only renames are followed;
    tensors that transformers fuses (MoE experts) keep their names.
    """
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:      # older transformers load checkpoints under their own names
        return {}
    rules = None
    for key in [*(config.get("architectures") or []), config.get("model_type")]:
        if key and (rules := get_checkpoint_conversion_mapping(key)):
            break
    renames = [(src, tgt) for r in rules or () if type(r).__name__ == "WeightRenaming"
               for src, tgt in zip(r.source_patterns, r.target_patterns)]
    out = {}
    for name in tensor_names:
        new = name
        for src, tgt in renames:
            new = re.sub(src, tgt, new)
        if new != name:
            out[name] = new
    return out
