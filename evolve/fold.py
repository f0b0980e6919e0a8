"""Folding hidden-state scales into the weights of a layer path (data-flow merges).

A data-flow candidate scales the residual stream by w_k before the k-th layer of its path. For a
pre-norm block every reader of the stream goes through a norm, and norms do not see a positive
factor (up to their epsilon), so the factor can move out of the stream and into the weights: the
k-th layer's residual-branch outputs are divided by the cumulative scale S_k = w_0 · … · w_k
(docs/evolve.md, "Folding the scales"). What "residual-branch output" means depends on the
architecture; this module names those tensors, from the layer's tensor names:

  * o_proj and down_proj (Llama, Mistral, Qwen2/3, Gemma, Phi-3, StableLM, ...)
  * attention.dense and mlp.dense_4h_to_h (GPT-NeoX, parallel residual or not)
  * attn.c_proj and mlp.c_proj (GPT-2), self_attn.dense and mlp.fc2 (Phi, parallel residual)
  * sandwich norms (Gemma 2/3): the branch ends in a norm, so a factor before it is normalised
    away; the norm after the branch (post_attention_layernorm, post_feedforward_layernorm) takes
    the factor instead. Gemma's RMSNorm multiplies by (1 + weight), so the folded weight is
    (1 + w) / S - 1: an affine change that a passthrough `scale` (a product) cannot write.

Biases of the output projections are divided too (the whole branch output is scaled).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from merge.errors import EvomergeError

# (residual-branch outputs, the architectures that use them). Checked in order; the first whose
# every name occurs among a layer's tensors wins.
_PROJECTIONS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("self_attn.o_proj", "mlp.down_proj"), "Llama-style pre-norm"),
    (("attention.dense", "mlp.dense_4h_to_h"), "GPT-NeoX"),
    (("attn.c_proj", "mlp.c_proj"), "GPT-2"),
    (("self_attn.dense", "mlp.fc2"), "Phi (parallel residual)"),
)
_SANDWICH = ("post_attention_layernorm", "post_feedforward_layernorm")
# Families known to read the residual stream through a norm in every sub-block. A family outside
# it (OLMo 2 feeds the raw stream to attention and MLP) cannot fold a scale.
_PRE_NORM = ("input_layernorm", "ln_1")


@dataclass(frozen=True)
class Fold:
    """Where a layer's cumulative scale goes."""

    targets: tuple[str, ...]   # tensor-name substrings inside a layer
    kind: str                  # "projection" | "norm" | "offset_norm"
    family: str

    @property
    def multiplicative(self) -> bool:
        """True when folding is `tensor × (1/S)`, i.e. a passthrough `scale`."""
        return self.kind != "offset_norm"

    def factor_filters(self, inv_scale: float) -> list[dict]:
        """The passthrough `scale` value (a conditional list) that folds 1/S into one layer."""
        if not self.multiplicative:
            raise EvomergeError(f"{self.family}: the folded norm weight (1 + w)/S - 1 is not a "
                                f"multiple of w; a passthrough scale cannot express it")
        return [{"filter": t, "value": inv_scale} for t in self.targets] + [{"value": 1.0}]


def fold_for(model_type: str, layer_tensors: list[str], label: str = "model") -> Fold:
    """The fold of one architecture, from the `rest` names of its first layer's tensors."""
    names = list(layer_tensors)

    def has(sub: str) -> bool:
        return any(sub in n for n in names)

    if not any(has(n) for n in _PRE_NORM):
        raise EvomergeError(f"{label}: no pre-norm (input_layernorm / ln_1) among its layer "
                            f"tensors, so a hidden-state scale cannot be folded into the weights; "
                            f"set genome.layer_stacking.scales: none")
    if has("pre_feedforward_layernorm") and all(has(n) for n in _SANDWICH):
        offset = model_type.startswith("gemma")
        return Fold(_SANDWICH, "offset_norm" if offset else "norm",
                    f"{model_type} (sandwich norms{', 1 + weight' if offset else ''})")
    for targets, family in _PROJECTIONS:
        if all(has(t + ".weight") for t in targets):
            return Fold(targets, "projection", f"{model_type} ({family})")
    raise EvomergeError(f"{label}: cannot tell which of its layer tensors end the residual "
                        f"branches ({model_type}); set genome.layer_stacking.scales: none")


def identity_targets(layer_tensors: list[str], model_type: str = "model") -> tuple[str, ...]:
    """The residual-branch output projections of a layer: zeroed, they make it the identity."""
    for targets, _ in _PROJECTIONS:
        if all(any(t + ".weight" in n for n in layer_tensors) for t in targets):
            return targets
    raise EvomergeError(f"{model_type}: cannot tell which layer tensors end the residual branches, "
                        f"so no identity layer can pad a path for --backend vllm; use --backend hf")


def cumulative(hop_scales: list[float]) -> list[float]:
    """S_k = w_0 · w_1 · … · w_k: the factor by which layer k's input differs from the folded
    model's stream."""
    out, s = [], 1.0
    for w in hop_scales:
        s *= w
        out.append(s)
    return out


def fold_tensor(name: str, tensor, fold: Fold, scale: float):
    """`tensor` of one layer with cumulative scale `scale` folded in (any kind of fold; the
    offset-norm kind is the one a merge config cannot express)."""
    import torch

    if not any(t in name for t in fold.targets) or scale == 1.0:
        return tensor
    x = tensor.to(torch.float32)
    if fold.kind == "offset_norm":
        out = (1.0 + x) / scale - 1.0
    else:
        out = x / scale
    return out.to(tensor.dtype)


def explicit_scale_hooks(layers, hop_scales: list[float]):
    """Forward pre-hooks that multiply each layer's incoming hidden state by its hop scale: the
    unfolded meaning of a data-flow candidate (for tests and checks). Returns the handles."""
    handles = []
    for layer, w in zip(layers, hop_scales):
        def hook(module, args, kwargs, w=float(w)):
            if args:
                return (args[0] * w, *args[1:]), kwargs
            key = "hidden_states"
            kwargs = dict(kwargs)
            kwargs[key] = kwargs[key] * w
            return args, kwargs
        handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    return handles


def describe(fold: Optional[Fold]) -> str:
    if fold is None:
        return "no scales"
    where = ", ".join(fold.targets)
    return f"{fold.family}: 1/S folded into {where}"
