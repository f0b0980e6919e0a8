"""LoRA adapters as merge inputs: `model: base+path/to/adapter` reads base weights with the adapter applied.

A PEFT LoRA adapter stores, per target module, two factors A (r × in) and B (out × r); the adapted
weight is W + s·B@A with s = alpha/r (alpha/√r with rsLoRA), transposed for fan-in-fan-out layers
(GPT-2's Conv1D). Embedding modules store `lora_embedding_A` (r × vocab) and `lora_embedding_B`
(dim × r) and add (s·B@A)ᵀ. Whole tensors in the adapter (`modules_to_save`, or a targeted layer's
`base_layer.weight`) replace the base tensor.

Nothing is merged ahead of time: `LoraAdapter.apply` patches one tensor as it is read, so memory stays
bounded by a tensor. Everything checkable from headers is checked when the adapter is opened.

Adapters name modules as the loaded transformers model does; where that differs from the checkpoint
(GPT-NeoX's head is the module `lm_head`, saved as `embed_out`) the targets are renamed to the
checkpoint's names. With tied embeddings the base saves no head: an adapter that saves the head
whole next to the embedding (what mergekit-extract-lora writes for tied models, so that PEFT's
unmerged model is right too) has its head copy dropped, the embedding being the head; a LoRA on
the head alone updates the embedding, as PEFT's merge_and_unload does to the shared matrix.

merge.sources opens adapters for `base+adapter` references; this module does not import it.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from merge.errors import EvomergeError

PEFT_PREFIX = "base_model.model."
_SUFFIXES = {  # adapter key suffix → (factor, module kind)
    ".lora_A.weight": ("A", "linear"),
    ".lora_B.weight": ("B", "linear"),
    ".lora_embedding_A": ("A", "embedding"),
    ".lora_embedding_B": ("B", "embedding"),
}
_UNSUPPORTED = ("lora_magnitude_vector", "trainable_tokens", "lora_E", "hada_", "lokr_", "ia3_")


@dataclass
class LoraDelta:
    """One module's low-rank update: target tensor += scaling · (B@A), transposed if `transpose`."""

    target: str          # tensor name in the model, e.g. model.layers.0.self_attn.q_proj.weight
    a_key: str
    b_key: str
    rank: int
    scaling: float
    transpose: bool      # embeddings and fan-in-fan-out layers store the weight as (in, out)
    embedding: bool = False


@dataclass
class LoraAdapter:
    folder: Path
    label: str
    config: dict[str, Any]
    keys: dict[str, tuple[Path, tuple[int, ...]]]      # adapter tensor key → (file, shape)
    deltas: dict[str, LoraDelta] = field(default_factory=dict)
    replacements: dict[str, str] = field(default_factory=dict)  # target tensor → adapter key
    base_layer_copies: set[str] = field(default_factory=set)    # replacements of a LoRA layer
    _handles: dict[Path, Any] = field(default_factory=dict, repr=False)

    # --- opening and validation -----------------------------------------------------------------
    @classmethod
    def open(cls, folder: Path, label: str, shown: str) -> "LoraAdapter":
        where = f"{label}: LoRA adapter '{shown}'"
        cfg_path = folder / "adapter_config.json"
        if not cfg_path.is_file():
            raise EvomergeError(f"{where} has no adapter_config.json; give a folder saved by "
                                f"PEFT (save_pretrained) or by mergekit-extract-lora")
        try:
            config = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise EvomergeError(f"{where}: adapter_config.json is not valid JSON ({e.msg} at "
                                f"line {e.lineno})") from None
        peft_type = str(config.get("peft_type", "LORA")).upper()
        if peft_type != "LORA":
            raise EvomergeError(f"{where} is a {peft_type} adapter; only LoRA adapters can be "
                                f"applied")
        if config.get("use_dora"):
            raise EvomergeError(f"{where} is a DoRA adapter (use_dora); merge it with PEFT "
                                f"(merge_and_unload) and use the merged model instead")
        keys = _adapter_keys(folder, where)
        adapter = cls(folder, label, config, keys)
        adapter._index(where)
        return adapter

    def _index(self, where: str) -> None:
        factors: dict[str, dict[str, str]] = {}
        kinds: dict[str, str] = {}
        for key in self.keys:
            if any(u in key for u in _UNSUPPORTED):
                raise EvomergeError(f"{where}: tensor '{key}' belongs to a PEFT feature this "
                                    f"reader does not apply (DoRA, trainable tokens, ...); merge "
                                    f"the adapter with PEFT first")
            name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
            name = re.sub(r"\.default(?=\.|$)", "", name)  # keys saved with the adapter name
            for suffix, (factor, kind) in _SUFFIXES.items():
                if name.endswith(suffix):
                    module = name[: -len(suffix)]
                    factors.setdefault(module, {})[factor] = key
                    kinds[module] = kind
                    break
            else:
                target = name.replace(".base_layer.", ".").replace(".modules_to_save.", ".")
                self.replacements[target] = key
                if ".base_layer." in name:      # PEFT's copy of the base's own weight
                    self.base_layer_copies.add(target)
        fan_in_fan_out = bool(self.config.get("fan_in_fan_out", False))
        for module, pair in factors.items():
            if set(pair) != {"A", "B"}:
                missing = "B" if "A" in pair else "A"
                raise EvomergeError(f"{where}: module '{module}' has no lora_{missing} tensor; "
                                    f"the adapter file is incomplete")
            a_shape, b_shape = self.keys[pair["A"]][1], self.keys[pair["B"]][1]
            if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
                raise EvomergeError(f"{where}: module '{module}' has factors of shapes "
                                    f"{list(a_shape)} and {list(b_shape)}, which do not multiply")
            rank = a_shape[0]
            alpha = float(_pattern_value(self.config.get("alpha_pattern") or {}, module,
                                         self.config.get("lora_alpha", 8)))
            scaling = alpha / math.sqrt(rank) if self.config.get("use_rslora") else alpha / rank
            embedding = kinds[module] == "embedding"
            self.deltas[module + ".weight"] = LoraDelta(module + ".weight", pair["A"], pair["B"],
                                                        rank, scaling, embedding or fan_in_fan_out,
                                                        embedding)

    def check_against(self, tensors: dict, where: str, config: dict | None = None) -> None:
        """Every patched tensor must exist in the base with the shape the adapter implies."""
        self._to_checkpoint_names(tensors, config or {}, where)
        for target, d in self.deltas.items():
            a, b = self.keys[d.a_key][1], self.keys[d.b_key][1]
            info = tensors.get(target)
            plain, flipped = (b[0], a[1]), (a[1], b[0])
            if (info is not None and d.transpose and not d.embedding
                    and tuple(info.shape) == plain != flipped):
                # fan_in_fan_out holds for Conv1D layers only; peft turns it off for nn.Linear
                # ones (GPT-2's lm_head), which the shape tells apart.
                d.transpose = False
            implied = flipped if d.transpose else plain
            if info is None:
                raise EvomergeError(f"{where}: the adapter targets '{target}', which the base "
                                    f"model does not have; the adapter was trained on another "
                                    f"base model")
            if tuple(info.shape) != implied:
                raise EvomergeError(f"{where}: the adapter's update for '{target}' has shape "
                                    f"{list(implied)} but the base tensor is {list(info.shape)}; "
                                    f"the adapter was trained on another base model")
        for target, key in self.replacements.items():
            info = tensors.get(target)
            shape = self.keys[key][1]
            if info is None:
                raise EvomergeError(f"{where}: the adapter holds '{key}', which matches no tensor "
                                    f"of the base model; the adapter was trained on another base")
            if tuple(info.shape) != tuple(shape):
                raise EvomergeError(f"{where}: the adapter's '{target}' has shape {list(shape)} "
                                    f"but the base tensor is {list(info.shape)} (a resized "
                                    f"vocabulary?); the adapter does not fit this base model")

    def _to_checkpoint_names(self, tensors: dict, config: dict, where: str) -> None:
        missing = [t for t in (*self.deltas, *self.replacements) if t not in tensors]
        if not missing:
            return
        from merge.architecture import is_embedding, is_head, module_param_names

        by_module = {m: c for c, m in module_param_names(config, list(tensors)).items()}
        for table in (self.deltas, self.replacements):
            for target in [t for t in table if t not in tensors and t in by_module]:
                entry = table.pop(target)
                if isinstance(entry, LoraDelta):
                    entry.target = by_module[target]
                table[by_module[target]] = entry
        if any(is_head(n) for n in tensors):
            return
        # Tied embeddings: the base saves no head, its embedding is the head.
        emb = next((n for n in tensors if is_embedding(n)), None)
        changed = emb is not None and (emb in self.deltas or emb in self.replacements)
        for target in [t for t in self.replacements if t not in tensors and is_head(t)]:
            if not changed and target not in self.base_layer_copies:
                raise EvomergeError(f"{where}: the adapter replaces the output head '{target}', "
                                    f"but the base ties its head to the embedding and saves none; "
                                    f"merge the adapter with PEFT (merge_and_unload) and use the "
                                    f"merged model")
            # the embedding's replacement is the head, or this is PEFT's copy of the base's own
            # (tied) matrix, which the embedding already holds
            del self.replacements[target]
        for target in [t for t in self.deltas if t not in tensors and is_head(t)]:
            if emb is None or changed:
                raise EvomergeError(f"{where}: the adapter changes both the embedding and the "
                                    f"head '{target}' of a model with tied embeddings (one matrix "
                                    f"here); merge it with PEFT (merge_and_unload) and use the "
                                    f"merged model")
            # merge_and_unload adds the head's update to the one shared matrix
            d = self.deltas.pop(target)
            d.target = emb
            self.deltas[emb] = d

    # --- reading ----------------------------------------------------------------------------------
    @property
    def targets(self) -> set[str]:
        return set(self.deltas) | set(self.replacements)

    def _read(self, key: str):
        file = self.keys[key][0]
        if file.suffix == ".safetensors":
            h = self._handles.get(file)
            if h is None:
                from safetensors import safe_open

                h = self._handles[file] = safe_open(file, framework="pt", device="cpu")
            return h.get_tensor(key)
        import torch

        if file not in self._handles:
            self._handles[file] = torch.load(file, map_location="cpu", weights_only=True)
        return self._handles[file][key].clone()

    def delta(self, target: str):
        """The fp32 update s·B@A (transposed where the layer stores (in, out)) for one tensor."""
        d = self.deltas[target]
        a = self._read(d.a_key).float()
        b = self._read(d.b_key).float()
        out = b @ a
        if d.transpose:
            out = out.T
        return out * d.scaling

    def apply(self, name: str, read_base: Callable[[], Any], dtype):
        """The tensor `name` as the adapted model has it (fp32 arithmetic, rounded once to `dtype`)."""
        if name in self.replacements:
            t = self._read(self.replacements[name]).to(dtype)
        else:
            t = read_base()
        if name in self.deltas:
            t = (t.float() + self.delta(name)).to(dtype)
        return t

    def close(self) -> None:
        self._handles.clear()


def _adapter_keys(folder: Path, where: str) -> dict[str, tuple[Path, tuple[int, ...]]]:
    st = folder / "adapter_model.safetensors"
    keys: dict[str, tuple[Path, tuple[int, ...]]] = {}
    if st.is_file():
        from merge.headers import read_safetensors_header

        for k, entry in read_safetensors_header(st).items():
            keys[k] = (st, tuple(entry["shape"]))
        return keys
    binf = folder / "adapter_model.bin"
    if binf.is_file():
        import torch

        try:
            state = torch.load(binf, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise EvomergeError(f"{where}: cannot read adapter_model.bin with weights-only "
                                f"unpickling ({type(e).__name__}); convert it to "
                                f"safetensors") from None
        return {k: (binf, tuple(v.shape)) for k, v in state.items()}
    raise EvomergeError(f"{where} has no adapter_model.safetensors (or adapter_model.bin)")


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank/alpha patterns: a key matches a module name ending in it (as a regex)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default
