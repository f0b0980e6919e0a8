#!/usr/bin/env python
"""A benchmark model family: three 1.1B-parameter bf16 Llama-shaped models (TinyLlama's shape).

    base, child_a, child_b      child = base + small seeded noise (so task vectors are non-trivial)

The weights are random: this family exists to time the merge engine at a realistic size, not to be
evaluated. It is built FAST, without instantiating a transformers model: tensors are drawn directly
in bf16 with a per-(model, tensor) seeded generator and written with
`safetensors.torch.save_file`, one ~2 GB shard at a time, plus `model.safetensors.index.json`
and a `LlamaConfig(...).to_dict()` config.json. Peak memory while building is about two shards
(~4 GB).

The family is cached: `manifest.json` is written last, so a half-built family (no manifest, or a
manifest that does not match the recipe or the files on disk) is deleted and rebuilt.

Usage:
    python scripts/bench_family.py [--out DIR] [--force]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DIR = REPO_ROOT / ".cache" / "bench_family"
MANIFEST = "manifest.json"
# Bump whenever anything that changes the written files changes: cached families are rebuilt.
RECIPE_VERSION = 1

SHAPE = dict(hidden_size=2048, num_hidden_layers=22, intermediate_size=5632, vocab_size=32000,
             num_attention_heads=32, num_key_value_heads=4)
MODELS = ("base", "child_a", "child_b")
SEED = 20261122
SHARD_BYTES = 2 * 10**9
BASE_STD = 0.02      # initializer_range of Llama
NOISE_STD = 0.002    # children differ from the base by ~10% of the weights' scale


def tensor_specs(shape: dict = SHAPE) -> list[tuple[str, tuple[int, ...]]]:
    """Llama tensor names and shapes in HF order (embeddings, layers, final norm, head)."""
    h, i, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    specs = [("model.embed_tokens.weight", (v, h))]
    for n in range(shape["num_hidden_layers"]):
        p = f"model.layers.{n}."
        specs += [(p + "input_layernorm.weight", (h,)),
                  (p + "self_attn.q_proj.weight", (h, h)),
                  (p + "self_attn.k_proj.weight", (kv, h)),
                  (p + "self_attn.v_proj.weight", (kv, h)),
                  (p + "self_attn.o_proj.weight", (h, h)),
                  (p + "post_attention_layernorm.weight", (h,)),
                  (p + "mlp.gate_proj.weight", (i, h)),
                  (p + "mlp.up_proj.weight", (i, h)),
                  (p + "mlp.down_proj.weight", (h, i))]
    specs += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return specs


def numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def shard_plan(specs, shard_bytes: int = SHARD_BYTES) -> list[list[tuple[str, tuple]]]:
    shards: list[list] = [[]]
    size = 0
    for name, shape in specs:
        nbytes = numel(shape) * 2
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def _generator(model: str, name: str):
    import torch

    digest = hashlib.sha256(f"{SEED}|{model}|{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _base_tensor(name: str, shape):
    import torch

    t = torch.randn(shape, dtype=torch.bfloat16, generator=_generator("base", name))
    if len(shape) == 1:  # RMSNorm weights sit around 1
        return t.mul_(0.1).add_(1.0)
    return t.mul_(BASE_STD)


def _child_tensor(model: str, name: str, base):
    import torch

    noise = torch.randn(base.shape, dtype=torch.bfloat16, generator=_generator(model, name))
    return noise.mul_(NOISE_STD).add_(base)


def config_dict(shape: dict = SHAPE) -> dict:
    from transformers import LlamaConfig

    cfg = LlamaConfig(**shape, max_position_embeddings=2048, rms_norm_eps=1e-5,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                      dtype="bfloat16").to_dict()
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg["torch_dtype"] = "bfloat16"
    cfg.pop("transformers_version", None)
    return cfg


def model_dirs(root: Path) -> dict[str, Path]:
    return {m: Path(root) / m for m in MODELS}


def _expected_manifest(root: Path) -> dict:
    specs = tensor_specs()
    shards = shard_plan(specs)
    n = len(shards)
    files = {}
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        files[fname] = [name for name, _ in shard]
    return {"recipe_version": RECIPE_VERSION, "seed": SEED, "shape": SHAPE, "models": list(MODELS),
            "parameters": sum(numel(s) for _, s in specs), "shard_files": files}


def check_family(root: Path) -> bool:
    """True when a complete family matching this recipe is on disk."""
    root = Path(root)
    mpath = root / MANIFEST
    if not mpath.is_file():
        return False
    try:
        manifest = json.loads(mpath.read_text())
    except ValueError:
        return False
    want = _expected_manifest(root)
    if any(manifest.get(k) != v for k, v in want.items()):
        return False
    sizes = manifest.get("file_sizes", {})
    for model in MODELS:
        for fname in list(want["shard_files"]) + ["config.json", "model.safetensors.index.json"]:
            p = root / model / fname
            key = f"{model}/{fname}"
            if not p.is_file() or sizes.get(key) != p.stat().st_size:
                return False
    return True


def build_family(root: Path = DEFAULT_DIR, force: bool = False, log=print) -> dict[str, Path]:
    """Build (or reuse) the family under `root`; returns {model name: folder}."""
    from safetensors.torch import save_file

    root = Path(root)
    if not force and check_family(root):
        log(f"family: reusing {root} (manifest matches)")
        return model_dirs(root)
    if root.exists():
        log(f"family: {root} is missing, incomplete or stale; rebuilding")
        shutil.rmtree(root)
    root.mkdir(parents=True)
    t0 = time.perf_counter()
    want = _expected_manifest(root)
    specs = tensor_specs()
    shards = shard_plan(specs)
    names = list(want["shard_files"])
    dirs = model_dirs(root)
    cfg = json.dumps(config_dict(), indent=2) + "\n"
    weight_map = {name: fname for fname, shard in zip(names, shards) for name, _ in shard}
    total = sum(numel(s) * 2 for _, s in specs)
    index = json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    for d in dirs.values():
        d.mkdir()
        (d / "config.json").write_text(cfg)
        (d / "model.safetensors.index.json").write_text(index)
    for fname, shard in zip(names, shards):
        base = {name: _base_tensor(name, shape) for name, shape in shard}
        save_file(base, str(dirs["base"] / fname), metadata={"format": "pt"})
        for child in MODELS[1:]:
            tensors = {name: _child_tensor(child, name, t) for name, t in base.items()}
            save_file(tensors, str(dirs[child] / fname), metadata={"format": "pt"})
            del tensors
        del base
        log(f"family: wrote {fname} x{len(MODELS)} ({time.perf_counter() - t0:.1f} s)")
    want["file_sizes"] = {f"{m}/{p.name}": p.stat().st_size
                          for m, d in dirs.items() for p in sorted(d.iterdir())}
    want["build_seconds"] = round(time.perf_counter() - t0, 1)
    # written last: its presence marks the family complete
    (root / MANIFEST).write_text(json.dumps(want, indent=2) + "\n")
    log(f"family: built {root} in {want['build_seconds']} s")
    return dirs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_DIR)
    ap.add_argument("--force", action="store_true", help="rebuild even if a valid family exists")
    args = ap.parse_args()
    build_family(args.out, args.force)


if __name__ == "__main__":
    main()
