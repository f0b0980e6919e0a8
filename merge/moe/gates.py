"""Router weights: one row per expert per layer, so that a token's logit for expert e is ⟨h, gₑ⟩.

    hidden       gₑ(layer) = normalise(mean MLP input over the positive prompts' tokens
                                        − the same over the negative prompts), from the base model
                                        run in transformers: the exact vector the router multiplies
    cheap_embed  gₑ = normalise(mean input embedding of the positive prompts' tokens − negatives'),
                 the same for every layer (no forward pass)
    random       gₑ = normalise(a seeded standard normal vector), per layer

Rows are unit vectors, so routing depends on direction alone and no expert wins by prompt length.
"""
from __future__ import annotations

from typing import Optional

from merge.errors import EvomergeError


def _normalise(v, what: str):
    norm = v.norm(dim=-1, keepdim=True)
    if bool((norm == 0).any()):
        raise EvomergeError(f"{what}: the positive and negative prompts give the same mean hidden "
                            f"state, so the gate has no direction; change the prompts")
    return v / norm


def _tokenizer(base):
    try:
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        # tokenizer.json is the ground truth where it exists; AutoTokenizer may pick a class by
        # model_type that re-derives the tokenizer differently.
        if (base.folder / "tokenizer.json").is_file():
            return PreTrainedTokenizerFast.from_pretrained(base.folder)
        return AutoTokenizer.from_pretrained(base.folder)
    except Exception as e:
        raise EvomergeError(f"base_model: cannot load its tokenizer ({type(e).__name__}); the "
                            f"hidden and cheap_embed gate modes need one to read the prompts — "
                            f"use gate_mode: random or add tokenizer files") from None


def _token_ids(tok, prompt: str, what: str) -> list[int]:
    ids = tok(prompt, add_special_tokens=True)["input_ids"]
    if not ids:
        raise EvomergeError(f"{what}: prompt {prompt!r} has no tokens")
    return ids


class PromptStates:
    """Mean MLP input per layer for each prompt, from one forward pass of the base model."""

    def __init__(self, base, num_layers: int, device: str):
        import torch
        from transformers import AutoModelForCausalLM

        from transformers.utils import logging as hf_logging

        self.tok = _tokenizer(base)
        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()   # stderr stays one line on errors
        try:
            model = AutoModelForCausalLM.from_pretrained(base.folder, dtype=torch.float32)
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        if base.adapter is not None:  # `base+lora`: the same weights the merge reads
            params = dict(model.named_parameters())
            with torch.no_grad():
                for name in base.adapter.targets:
                    if name in params:
                        params[name].copy_(base.read(name).float())
        self.model = model.to(device).eval()
        self.device = device
        layers = model.get_decoder().layers
        if len(layers) != num_layers:
            raise EvomergeError(f"base_model: transformers built {len(layers)} layers, the "
                                f"checkpoint has {num_layers}")
        self._captured: list = [None] * num_layers
        self._hooks = [layer.mlp.register_forward_pre_hook(self._capture(i), with_kwargs=True)
                       for i, layer in enumerate(layers)]
        self._cache: dict[str, object] = {}

    def _capture(self, i: int):
        def hook(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            self._captured[i] = x.detach()
        return hook

    def mean(self, prompt: str, what: str):
        """(layers, hidden): each layer's MLP input averaged over the prompt's tokens."""
        import torch

        if prompt not in self._cache:
            ids = torch.tensor([_token_ids(self.tok, prompt, what)], device=self.device)
            with torch.no_grad():
                self.model(input_ids=ids)
            self._cache[prompt] = torch.stack(
                [c.float().reshape(-1, c.shape[-1]).mean(0) for c in self._captured]).cpu()
        return self._cache[prompt]

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self.model = None


def _contrast(mean_of, positives, negatives):
    import torch

    pos = torch.stack([mean_of(p) for p in positives]).mean(0)
    if not negatives:
        return pos
    return pos - torch.stack([mean_of(p) for p in negatives]).mean(0)


def hidden_gates(base, experts, num_layers: int, device: str, shared=None):
    """Per layer (E, H) router rows, plus the shared-expert gate row (1, H) when prompted."""
    import torch

    states = PromptStates(base, num_layers, device)
    try:
        rows = []
        for i, e in enumerate(experts):
            what = f"experts[{i}]"
            v = _contrast(lambda p: states.mean(p, what), e.positive_prompts, e.negative_prompts)
            rows.append(_normalise(v, what))                  # (L, H)
        gates = torch.stack(rows, dim=1)                      # (L, E, H)
        shared_gate = None
        if shared is not None and shared.positive_prompts:
            v = _contrast(lambda p: states.mean(p, "shared_experts[0]"), shared.positive_prompts,
                          shared.negative_prompts)
            shared_gate = _normalise(v, "shared_experts[0]")[:, None, :]   # (L, 1, H)
    finally:
        states.close()
    return gates, shared_gate


def cheap_embed_gates(base, arch, experts, num_layers: int, shared=None):
    import torch

    name = arch.embedding_name()
    if name is None:
        raise EvomergeError("base_model: no input embedding found; gate_mode cheap_embed needs one")
    tok = _tokenizer(base)
    emb = base.read(name).float()

    def mean_of(what):
        def f(prompt):
            ids = _token_ids(tok, prompt, what)
            if max(ids) >= emb.shape[0]:
                raise EvomergeError(f"{what}: the tokenizer gives id {max(ids)}, beyond the "
                                    f"embedding's {emb.shape[0]} rows")
            return emb[ids].mean(0)
        return f

    rows = [_normalise(_contrast(mean_of(f"experts[{i}]"), e.positive_prompts,
                                 e.negative_prompts), f"experts[{i}]")
            for i, e in enumerate(experts)]
    gates = torch.stack(rows)[None].expand(num_layers, -1, -1).clone()   # (L, E, H)
    shared_gate = None
    if shared is not None and shared.positive_prompts:
        v = _contrast(mean_of("shared_experts[0]"), shared.positive_prompts,
                      shared.negative_prompts)
        shared_gate = _normalise(v, "shared_experts[0]")[None, None].expand(
            num_layers, 1, -1).clone()
    return gates, shared_gate


def random_gates(num_experts: int, hidden: int, num_layers: int, seed: Optional[int]):
    import torch

    g = torch.Generator().manual_seed(_seed(seed))
    v = torch.randn(num_layers, num_experts, hidden, generator=g)
    return v / v.norm(dim=-1, keepdim=True), None


def check_distinct(gates, mode: str) -> None:
    """Different prompts can still give one gate (e.g. every word maps to <unk>): refuse that."""
    import torch

    if gates.shape[1] < 2:
        return
    same = all(torch.allclose(gates[layer], gates[layer, :1].expand_as(gates[layer]), atol=1e-6)
               for layer in range(gates.shape[0]))
    if same:
        raise EvomergeError(f"experts: every expert got the same {mode} gate although the prompts "
                            f"differ — do the prompts tokenize to the same tokens (unknown "
                            f"words)? Use prompts in the base model's vocabulary")


def uniform_random_gates(num_experts: int, hidden: int, num_layers: int, seed: Optional[int]):
    """torch.nn.Linear's default initialisation: U(−1/√hidden, 1/√hidden), not normalised."""
    import torch

    g = torch.Generator().manual_seed(_seed(seed))
    bound = hidden ** -0.5
    return (torch.rand(num_layers, num_experts, hidden, generator=g) * 2 - 1) * bound, None


def _seed(seed: Optional[int]) -> int:
    if seed is None:
        import random

        return random.SystemRandom().getrandbits(63)
    return seed
