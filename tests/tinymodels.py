"""Tiny Hugging Face models built in-process for tests: nothing is downloaded.

A "family" is a base model plus children that differ from it by small perturbations, all with the
same architecture and a shared word-level tokenizer, saved as ordinary model folders.
"""
from __future__ import annotations

from pathlib import Path

import torch

WORDS = [f"w{i}" for i in range(120)]


def make_tokenizer(extra_tokens: list[str] | None = None):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    for w in WORDS:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    if extra_tokens:
        fast.add_tokens(extra_tokens)
    return fast


ARCH_KWARGS = {
    "llama": dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64),
    "mistral": dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=64),
    "qwen2": dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64),
    "gemma": dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, head_dim=8),
    "phi3": dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=64, pad_token_id=3),
    "gpt_neox": dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64),
    "gpt2": dict(n_embd=32, n_layer=4, n_head=4),
    "qwen3": dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, head_dim=8),
    "mpt": dict(d_model=32, n_layers=4, n_heads=4, expansion_ratio=2),   # layer count: n_layers
    "mixtral": dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=64, num_local_experts=2),
}


def make_config(arch: str = "llama", vocab_size: int = 128, **overrides):
    from transformers import AutoConfig

    kwargs = dict(ARCH_KWARGS[arch])
    kwargs.update(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2)
    if arch == "gpt2":
        kwargs["n_positions"] = 128
    elif arch == "mpt":
        kwargs["max_seq_len"] = 128
    else:
        kwargs.setdefault("max_position_embeddings", 128)
    kwargs.update(overrides)
    return AutoConfig.for_model(arch, **kwargs)


def build_model(path: Path, arch: str = "llama", seed: int = 0, dtype=torch.float32,
                tokenizer=None, **config_overrides) -> Path:
    """Build a randomly initialised model from a config and save it (safetensors) to `path`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = make_config(arch, **config_overrides)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    model.save_pretrained(path)
    (tokenizer or make_tokenizer()).save_pretrained(path)
    return Path(path)


def perturb(src: Path, dst: Path, seed: int, scale: float = 0.02, dtype=None) -> Path:
    """A child of `src`: every weight plus seeded noise (a fake fine-tune)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(dst)
    make_tokenizer().save_pretrained(dst)
    return Path(dst)


def build_family(root: Path, arch: str = "llama", children: int = 3, dtype=torch.float32,
                 **config_overrides) -> dict[str, Path]:
    """base + `children` perturbed children under `root`; returns {"base": path, "c0": path, ...}."""
    root = Path(root)
    out = {"base": build_model(root / "base", arch=arch, seed=0, dtype=dtype, **config_overrides)}
    for i in range(children):
        out[f"c{i}"] = perturb(out["base"], root / f"c{i}", seed=100 + i, dtype=dtype)
    return out


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a saved model folder (any number of shards)."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(f))
    return state


def extend_vocab(src: Path, dst: Path, tokens: list[str], seed: int, rows: int | None = None,
                 chat_template: str | None = None, scale: float = 0.02) -> Path:
    """A child of `src` whose tokenizer has `tokens` appended and whose embedding (and head) has
    `rows` rows (default: exactly the new tokenizer length), then seeded noise as in `perturb`.
    Optionally the child's tokenizer carries `chat_template`."""
    from transformers import AutoModelForCausalLM

    tok = make_tokenizer(tokens)
    if chat_template is not None:
        tok.chat_template = chat_template
    model = AutoModelForCausalLM.from_pretrained(src)
    torch.manual_seed(seed)
    model.resize_token_embeddings(rows or len(tok), mean_resizing=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    return Path(dst)
