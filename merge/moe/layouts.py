"""Output architectures: how dense models' tensors become a native transformers MoE checkpoint.

Tensor names follow the checkpoint layout that transformers itself writes with `save_pretrained`
(per-expert tensors; transformers 5 fuses them into 3-D parameters when it loads them, and older
versions read them as they are), so the output loads in either without remote code:

    mixtral   (from llama, mistral)  layers.i.block_sparse_moe.{gate, experts.e.w1|w2|w3}
    qwen2_moe (from qwen2)           layers.i.mlp.{gate, experts.e.*_proj, shared_expert.*_proj,
                                                   shared_expert_gate}
    qwen3_moe (from qwen3)           layers.i.mlp.{gate, experts.e.*_proj}
    phimoe    (from phi3)            as mixtral; Phi-3's fused qkv_proj and gate_up_proj are split

w1 = gate_proj, w3 = up_proj, w2 = down_proj.

Routing weights. Mixtral and Qwen3-MoE (norm_topk_prob) renormalise the chosen experts' weights to
sum to 1, so an MoE of identical experts is the dense model. Two outputs do not, and the assembly
compensates exactly by scaling the routed experts' down projections (a power of two: exact in
floating point):
  * PhiMoE's sparsemixer gives each of its two chosen experts a weight of its own, both exactly 1
    with router_jitter_noise 0 (which the output config sets): routed down_proj × ½.
  * Qwen2-MoE adds sigmoid(gate·x)·shared_expert(x). With an unprompted shared expert the gate row
    is 0, sigmoid(0) = ½ for every token: routed down_proj × ½, so that the routed mixture and the
    shared expert each weigh ½. A prompted shared gate varies per token and is not compensated.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

from merge.errors import EvomergeError

Producer = Callable[[], Any]


@dataclass
class OutTensor:
    name: str
    shape: tuple[int, ...]
    produce: Producer


@dataclass
class MLPPart:
    shape: tuple[int, ...]
    produce: Producer


class DenseMLP:
    """The gate/up/down projections of one dense model's layer, read lazily."""

    def __init__(self, source, arch, label: str):
        self.source = source
        self.arch = arch
        self.label = label
        self.fused = source.config.get("model_type") == "phi3"

    def parts(self, layer: int) -> dict[str, MLPPart]:
        src, arch = self.source, self.arch

        def info(rest):
            name = arch.layer_tensor(layer, rest)
            if name not in src.tensors:
                raise EvomergeError(f"{self.label}: '{src.ref}' has no tensor '{name}'; its MLP "
                                    f"does not have the expected gate/up/down layout")
            return name, tuple(src.tensors[name].shape)

        down, down_shape = info("mlp.down_proj.weight")
        if self.fused:
            fused, shape = info("mlp.gate_up_proj.weight")
            inter = shape[0] // 2
            return {"gate": MLPPart((inter, shape[1]), lambda: src.read(fused)[:inter].clone()),
                    "up": MLPPart((inter, shape[1]), lambda: src.read(fused)[inter:].clone()),
                    "down": MLPPart(down_shape, lambda: src.read(down))}
        gate, gate_shape = info("mlp.gate_proj.weight")
        up, up_shape = info("mlp.up_proj.weight")
        return {"gate": MLPPart(gate_shape, lambda: src.read(gate)),
                "up": MLPPart(up_shape, lambda: src.read(up)),
                "down": MLPPart(down_shape, lambda: src.read(down))}

    def sizes(self) -> tuple[int, int]:
        """(hidden size, intermediate size) from the first layer's tensors."""
        p = self.parts(0)
        return p["down"].shape[0], p["gate"].shape[0]


@dataclass(frozen=True)
class Layout:
    model_type: str                # output model_type
    class_name: str                # output architectures[0]
    inputs: tuple[str, ...]        # dense model_types it is built from
    block: str                     # the MoE block's name inside a layer
    router: str                    # the router weight inside the block
    expert_names: tuple[str, str, str]   # gate, up, down names inside experts.e.
    shared_expert: bool = False
    fixed_top_k: Optional[int] = None    # PhiMoE's sparsemixer always picks 2
    # Sum of the routed experts' weights per token, when the router does not renormalise it to 1
    # (PhiMoE: two weights of exactly 1); the routed down projections are divided by it.
    routed_weight_sum: float = 1.0


LAYOUTS = {
    "mixtral": Layout("mixtral", "MixtralForCausalLM", ("llama", "mistral"), "block_sparse_moe",
                      "gate.weight", ("w1.weight", "w3.weight", "w2.weight")),
    "qwen2_moe": Layout("qwen2_moe", "Qwen2MoeForCausalLM", ("qwen2",), "mlp", "gate.weight",
                        ("gate_proj.weight", "up_proj.weight", "down_proj.weight"),
                        shared_expert=True),
    "qwen3_moe": Layout("qwen3_moe", "Qwen3MoeForCausalLM", ("qwen3",), "mlp", "gate.weight",
                        ("gate_proj.weight", "up_proj.weight", "down_proj.weight")),
    "phimoe": Layout("phimoe", "PhimoeForCausalLM", ("phi3",), "block_sparse_moe", "gate.weight",
                     ("w1.weight", "w3.weight", "w2.weight"), fixed_top_k=2,
                     routed_weight_sum=2.0),
}


# The reference toolkit's output names; its `architecture:` key matches them by prefix, any case.
REFERENCE_NAMES = {"mixtral": "Mixtral", "qwen2_moe": "Qwen MoE", "qwen3_moe": "Qwen3 MoE",
                   "phimoe": "PhiMoE"}


def layout_for(base_type: str, requested: Optional[str]) -> Layout:
    by_input = {t: lay for lay in LAYOUTS.values() for t in lay.inputs}
    wanted = None
    if requested is not None:
        r = requested.strip().lower()
        wanted = {k for k in LAYOUTS if k == r or REFERENCE_NAMES[k].lower().startswith(r)}
        if not wanted:
            raise EvomergeError(f"architecture: unknown output '{requested}'; use one of "
                                f"{', '.join(LAYOUTS)}")
    layout = by_input.get(base_type)
    if layout is None:
        supported = ", ".join(f"{'/'.join(lay.inputs)} → {lay.model_type}"
                              for lay in LAYOUTS.values())
        raise EvomergeError(f"base_model: architecture '{base_type}' is not supported for MoE "
                            f"merges (supported: {supported})")
    if wanted is not None and layout.model_type not in wanted:
        raise EvomergeError(f"architecture: a {base_type} base model becomes {layout.model_type}, "
                            f"not {requested}; remove the key or change the base model")
    return layout


# --- non-MLP tensors of the base ----------------------------------------------------------------

def base_layer_tensors(layout: Layout, base, arch, layer: int) -> list[OutTensor]:
    """Attention and norms of one layer, renamed/split as the output architecture needs."""
    out: list[OutTensor] = []
    cfg = base.config
    for rest in arch.layers[layer]:
        if rest.startswith("mlp.") or rest.endswith("rotary_emb.inv_freq"):
            continue
        name = arch.layer_tensor(layer, rest)
        shape = tuple(base.tensors[name].shape)
        if layout.model_type == "phimoe" and rest == "self_attn.qkv_proj.weight":
            heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or \
                cfg["num_attention_heads"]
            head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
            q, k = heads * head_dim, kv * head_dim
            if shape[0] != q + 2 * k:
                raise EvomergeError(f"base_model: '{name}' has {shape[0]} rows, expected "
                                    f"{q + 2 * k} for {heads} query and {kv} key/value heads")
            for part, lo, hi in (("q_proj", 0, q), ("k_proj", q, q + k), ("v_proj", q + k, q + 2 * k)):
                out.append(OutTensor(arch.layer_tensor(layer, f"self_attn.{part}.weight"),
                                     (hi - lo, shape[1]),
                                     lambda n=name, lo=lo, hi=hi: base.read(n)[lo:hi].clone()))
            continue
        out.append(OutTensor(name, shape, lambda n=name: base.read(n)))
        if layout.model_type == "phimoe" and rest.endswith("layernorm.weight"):
            out.append(_zero_bias(name, shape))
    return out


def base_outer_tensors(layout: Layout, base, names) -> list[OutTensor]:
    out = []
    for name in names:
        if name.endswith("rotary_emb.inv_freq"):
            continue
        shape = tuple(base.tensors[name].shape)
        out.append(OutTensor(name, shape, lambda n=name: base.read(n)))
        if layout.model_type == "phimoe" and name.endswith("norm.weight"):
            out.append(_zero_bias(name, shape))
    return out


def _zero_bias(weight_name: str, shape) -> OutTensor:
    import torch

    # Phi-3 normalises with RMSNorm (no bias); PhiMoE with LayerNorm (weight and bias).
    return OutTensor(weight_name[: -len("weight")] + "bias", shape, lambda: torch.zeros(shape))


# --- output config ------------------------------------------------------------------------------

_NOT_CARRIED = {"architectures", "model_type", "transformers_version", "_auto_class", "dtype",
                "id2label", "label2id", "attribute_map", "sub_configs_defaults",
                "base_model_tp_plan", "base_model_pp_plan", "base_model_ep_plan",
                "base_model_fsdp_plan", "base_config_key", "extra_files", "extra_config_files",
                "output_hidden_states", "return_dict", "problem_type", "is_encoder_decoder",
                "chunk_size_feed_forward"}


def check_base_config(layout: Layout, base_cfg) -> None:
    """Dense features the MoE class has no place for → a clear error, not a silent wrong model."""
    t = base_cfg.model_type
    if t in ("llama",) and (getattr(base_cfg, "attention_bias", False)
                            or getattr(base_cfg, "mlp_bias", False)):
        raise EvomergeError("base_model: this Llama model uses attention_bias/mlp_bias, which "
                            "Mixtral has no place for; it cannot become a Mixtral MoE")
    if t == "phi3":
        rope = dict(base_cfg.rope_parameters or {})
        if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
            raise EvomergeError("base_model: this Phi-3 model rotates only part of each head "
                                "(partial_rotary_factor < 1), which PhiMoE does not support")
        if rope.get("rope_type", "default") not in ("default", "longrope"):
            raise EvomergeError(f"base_model: rope type '{rope.get('rope_type')}' has no PhiMoE "
                                f"equivalent")


def output_config(layout: Layout, base_cfg, n_experts: int, top_k: int, intermediate: int,
                  shared_intermediate: Optional[int], dtype: str, norm_topk_prob: Optional[bool]):
    """A transformers config object for the output, built from the base's settings."""
    from transformers import AutoConfig, CONFIG_MAPPING

    target_cls = CONFIG_MAPPING[layout.model_type]
    fields: set[str] = set()
    for cls in target_cls.__mro__:
        fields |= set(getattr(cls, "__annotations__", {}))
    base = base_cfg.to_dict()
    kwargs: dict[str, Any] = {k: v for k, v in base.items()
                              if k in fields and k not in _NOT_CARRIED}
    kwargs["intermediate_size"] = intermediate
    if layout.model_type == "mixtral":
        kwargs.update(num_local_experts=n_experts, num_experts_per_tok=top_k,
                      router_jitter_noise=0.0)
    elif layout.model_type == "qwen2_moe":
        kwargs.update(num_experts=n_experts, num_experts_per_tok=top_k,
                      moe_intermediate_size=intermediate,
                      intermediate_size=base.get("intermediate_size", intermediate),
                      shared_expert_intermediate_size=shared_intermediate,
                      decoder_sparse_step=1, mlp_only_layers=[], qkv_bias=True,
                      norm_topk_prob=True if norm_topk_prob is None else norm_topk_prob)
    elif layout.model_type == "qwen3_moe":
        kwargs.update(num_experts=n_experts, num_experts_per_tok=top_k,
                      moe_intermediate_size=intermediate, decoder_sparse_step=1,
                      mlp_only_layers=[],
                      norm_topk_prob=True if norm_topk_prob is None else norm_topk_prob)
    elif layout.model_type == "phimoe":
        # router_jitter_noise 0: the sparsemixer keeps only the top expert in each of its two
        # picks, so both weights are exactly 1 (see routed_weight_sum).
        kwargs.update(num_local_experts=n_experts, num_experts_per_tok=top_k,
                      attention_bias=False, lm_head_bias=False, input_jitter_noise=0.0,
                      router_jitter_noise=0.0)
        rope = dict(kwargs.get("rope_parameters") or {})
        rope.pop("partial_rotary_factor", None)
        if rope.get("rope_type", "default") != "default":
            # Phi-3's LongRoPE scales attention by √(1 + ln(s)/ln(L₀)) for short and long inputs
            # alike; PhiMoE wants that factor spelt out as short_mscale / long_mscale.
            original = rope.get("original_max_position_embeddings") or \
                base.get("original_max_position_embeddings") or kwargs["max_position_embeddings"]
            scale = kwargs["max_position_embeddings"] / original
            m = math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0
            rope.setdefault("short_mscale", m)
            rope.setdefault("long_mscale", m)
            rope["original_max_position_embeddings"] = original
        kwargs["rope_parameters"] = rope
    if norm_topk_prob is not None and layout.model_type not in ("qwen2_moe", "qwen3_moe"):
        raise EvomergeError(f"norm_topk_prob: only Qwen2-MoE and Qwen3-MoE have this setting; "
                            f"{layout.model_type} has no such setting")
    cfg = AutoConfig.for_model(layout.model_type, **kwargs)
    cfg.architectures = [layout.class_name]
    cfg.dtype = dtype
    return cfg
