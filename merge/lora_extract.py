"""`mergekit-extract-lora`: approximate a fine-tune as base + LoRA, one truncated SVD per module.

For each linear or embedding module, the weight difference Δ = W_ft − W_base is factored as
Δ ≈ B@A with the rank-r truncated SVD (B = U_r·√Σ_r, A = √Σ_r·V_rᵀ). By Eckart–Young this is the best
rank-r approximation: its Frobenius error is √(Σ_{i>r} σᵢ²), zero when r reaches the rank of Δ.
The adapter is written in PEFT's format (adapter_config.json + adapter_model.safetensors) with
scaling 1 (lora_alpha = r per module), so `PeftModel.from_pretrained(base, out)` reproduces it.

What LoRA cannot express is saved whole when the fine-tune changed it: norms as PEFT
`modules_to_save`, biases of LoRA layers in PEFT's `bias: lora_only` layout, so that the adapter
reproduces the fine-tune exactly at full rank. So is the embedding of a model with tied embeddings
(as the embedding and as the head): PEFT applies an embedding LoRA to the lookup only, so unmerged
the head would keep the base's matrix, and a second LoRA on the head would be merged twice into the
one shared matrix.

Module names are the loaded transformers model's, which PEFT uses (GPT-NeoX's head `embed_out` is
the module `lm_head`); tensors are read under the checkpoint's names.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import click

from merge.errors import EvomergeError


@dataclass
class Target:
    module: str          # e.g. model.layers.0.self_attn.q_proj
    tensor: str          # e.g. model.layers.0.self_attn.q_proj.weight
    kind: str            # linear | conv1d | embedding
    shape: tuple[int, ...]

    @property
    def update_shape(self) -> tuple[int, int]:
        """Shape of PEFT's B@A: (out, in) for linear layers, transposed for the others."""
        rows, cols = self.shape
        return (rows, cols) if self.kind == "linear" else (cols, rows)


@dataclass
class Extracted:
    target: Target
    a: object            # (rank, in) tensor
    b: object            # (out, rank) tensor
    rank: int
    dropped_error: float   # √(Σ dropped σ²): the Frobenius error Eckart–Young predicts


@dataclass
class ModuleMap:
    """What the loaded transformers model makes of the base checkpoint (built on the meta device)."""

    kinds: dict[str, str]             # module name → linear | conv1d | embedding | other
    renames: dict[str, str]           # checkpoint tensor → model parameter, where they differ
    input_embedding: Optional[str]    # module names
    output_embedding: Optional[str]

    def param(self, tensor: str) -> str:
        return self.renames.get(tensor, tensor)


def module_map(base, trust_remote_code: bool = False) -> ModuleMap:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from merge.architecture import module_param_names

    try:
        cfg = AutoConfig.from_pretrained(base.folder, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust_remote_code)
    except Exception as e:  # unknown model_type, remote code refused, ...
        raise EvomergeError(f"--base-model: transformers cannot build this architecture "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:120]}); pass "
                            f"--trust-remote-code if it needs the model's own code") from None
    kinds, names = {}, {}
    for name, mod in model.named_modules():
        names[id(mod)] = name
        cls = type(mod).__name__
        if isinstance(mod, torch.nn.Embedding):
            kinds[name] = "embedding"
        elif isinstance(mod, torch.nn.Linear):
            kinds[name] = "linear"
        elif cls == "Conv1D":
            kinds[name] = "conv1d"
        else:
            kinds[name] = "other"
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    return ModuleMap(kinds, module_param_names(base.config, list(base.tensors)),
                     names.get(id(inp)) if inp is not None else None,
                     names.get(id(out)) if out is not None else None)


def tied_head(modules: ModuleMap, base) -> Optional[str]:
    """The output head's module name when the base saves no head of its own (tied embeddings)."""
    head = modules.output_embedding
    if head is None or modules.input_embedding is None:
        return None
    saved = {modules.param(n) for n in base.tensors}
    return head if f"{head}.weight" not in saved else None


def _selected(module: str, include: tuple[str, ...], exclude: tuple[str, ...]) -> bool:
    if include and not any(re.search(p, module) for p in include):
        return False
    return not any(re.search(p, module) for p in exclude)


def plan_targets(ft, base, modules: ModuleMap, include: tuple[str, ...],
                 exclude: tuple[str, ...], embeddings: bool, save_modules: tuple[str, ...] = (),
                 embeddings_whole: bool = False, skip_undecomposable: bool = False):
    """Decide, from headers alone, which modules get a LoRA and which are candidates to save whole.

    Module names are the loaded model's (what PEFT targets); --include/--exclude match them or the
    checkpoint's own names (GPT-NeoX: `lm_head` or `embed_out`). With tied embeddings the embedding
    goes to the candidates to save whole, once as the embedding and once as the head: a LoRA on a
    shared matrix is right either unmerged (PEFT applies it to the lookup only) or merged, never both.
    `save_modules` (full names or last components) and, with `embeddings_whole`, the embedding and
    head are saved whole too; `skip_undecomposable` leaves out modules LoRA cannot express.
    """
    for pattern in include + exclude:
        try:
            re.compile(pattern)
        except re.error as e:
            raise EvomergeError(f"--include/--exclude: '{pattern}' is not a valid regular "
                                f"expression ({e})") from None
    targets: list[Target] = []
    whole: dict[str, list[str]] = {}   # module → its tensors (norms and other non-LoRA modules)
    tied = tied_head(modules, base)
    for name, info in base.tensors.items():
        module, _, param = modules.param(name).rpartition(".")
        kind = modules.kinds.get(module)
        saved_as = name.rpartition(".")[0]
        if kind is None or not (_selected(module, include, exclude)
                                or (saved_as != module and _selected(saved_as, include, exclude))):
            continue
        ft_info = ft.tensors.get(name)
        if ft_info is None:
            raise EvomergeError(f"--model: '{ft.ref}' has no tensor '{name}'; the fine-tune does "
                                f"not share the base model's layout")
        if tuple(ft_info.shape) != tuple(info.shape):
            raise EvomergeError(f"--model: '{name}' is {list(ft_info.shape)} in the fine-tune but "
                                f"{list(info.shape)} in the base (a resized vocabulary?); LoRA "
                                f"extraction needs equal shapes — exclude it with --exclude")
        if kind == "embedding" and not embeddings:
            continue
        if tied and module == modules.input_embedding and param == "weight":
            whole[module] = [name]
            whole[tied] = [name]       # the head's copy: the same fine-tuned matrix
            continue
        if module in save_modules or module.rpartition(".")[2] in save_modules or (
                embeddings_whole and (kind == "embedding" or module == modules.output_embedding)):
            whole.setdefault(module, []).append(name)
        elif kind in ("linear", "conv1d", "embedding") and param == "weight" and \
                len(info.shape) == 2:
            # The rank is capped per module at min(max_rank, min(shape)), as the reference does:
            # one run gives an exact adapter of modules of any width (grouped-query k/v).
            targets.append(Target(module, name, kind, tuple(info.shape)))
        elif kind == "other" and not skip_undecomposable:
            whole.setdefault(module, []).append(name)
    return targets, whole


def extract(target: Target, ft, base, max_rank: int, sv_threshold: float,
            device: str = "cpu", sv_epsilon: float = 0.0,
            distribute_scale: bool = True) -> Optional[Extracted]:
    """Truncated SVD of one module's weight difference; None when the module did not change."""
    import torch

    delta = ft.read(target.tensor, device).float() - base.read(target.tensor, device).float()
    if target.kind != "linear":
        delta = delta.T   # PEFT stores embedding and Conv1D updates as (B@A)ᵀ
    if not torch.any(delta):
        return None
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    keep = int((s > sv_threshold * s[0]).sum()) if sv_threshold > 0 else len(s)
    if sv_epsilon > 0:
        keep = min(keep, int((s > sv_epsilon).sum()))
    rank = max(1, min(max_rank, keep))
    if distribute_scale:       # √Σ on each side; otherwise Σ in A (the product is the same)
        root = s[:rank].sqrt()
        b = (u[:, :rank] * root).contiguous()
        a = (root[:, None] * vh[:rank]).contiguous()
    else:
        b = u[:, :rank].contiguous()
        a = (s[:rank, None] * vh[:rank]).contiguous()
    dropped = float(s[rank:].double().pow(2).sum().sqrt())
    return Extracted(target, a.cpu(), b.cpu(), rank, dropped)


def changed_whole_modules(whole: dict[str, list[str]], ft, base) -> dict[str, list[str]]:
    import torch

    out, changed = {}, {}
    for module, names in whole.items():
        for n in names:
            if n not in changed:
                changed[n] = not torch.equal(ft.read(n), base.read(n))
        if any(changed[n] for n in names):
            out[module] = names
    return out


def changed_biases(results: list[Extracted], ft, base) -> list[tuple[str, str]]:
    """Bias tensors of LoRA modules that the fine-tune changed (LoRA itself only moves weights)."""
    import torch

    out = []
    for r in results:
        name = r.target.tensor[: -len("weight")] + "bias"     # the checkpoint's name
        if name in base.tensors and name in ft.tensors and \
                not torch.equal(ft.read(name), base.read(name)):
            out.append((r.target.module, name))
    return out


def adapter_config(results: list[Extracted], saved_modules: list[str], base_ref: str) -> dict:
    ranks = {r.target.module: r.rank for r in results}
    top = max(ranks.values())
    pattern = {re.escape(m): k for m, k in ranks.items() if k != top}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_ref,
        "r": top,
        "lora_alpha": top,            # scaling alpha/r = 1 for every module
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(ranks),
        "modules_to_save": saved_modules or None,
        "fan_in_fan_out": any(r.target.kind == "conv1d" for r in results),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "revision": None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def run(model: str, base_model: str, out_path: str, max_rank: int, sv_threshold: float = 0.0,
        include: tuple[str, ...] = (), exclude: tuple[str, ...] = (), embeddings: bool = True,
        modules_to_save: bool = True, device: str = "cpu", overwrite: bool = False,
        trust_remote_code: bool = False, quiet: bool = True, sv_epsilon: float = 0.0,
        save_modules: tuple[str, ...] = (), embeddings_whole: bool = False,
        skip_undecomposable: bool = False, distribute_scale: bool = True) -> dict:
    """Extract and write the adapter; returns a summary {module: (rank, predicted error)}."""
    from merge.sources import ModelSource
    from merge.writer import AtomicFolder, check_output_folder

    if max_rank < 1:
        raise EvomergeError("--max-rank: must be at least 1")
    if sv_epsilon < 0:
        raise EvomergeError(f"--sv-epsilon: {sv_epsilon:g} is negative; it is a singular value "
                            f"below which a module's rank stops")
    if not 0.0 <= sv_threshold < 1.0:
        raise EvomergeError(f"--sv-threshold: {sv_threshold:g} is outside [0, 1); it is a "
                            f"fraction of each module's largest singular value")
    ft = ModelSource.open(model, "--model")
    base = ModelSource.open(base_model, "--base-model")
    out = Path(out_path)
    check_output_folder(out, overwrite, [ft.folder, base.folder])
    modules = module_map(base, trust_remote_code)
    targets, whole = plan_targets(ft, base, modules, tuple(include), tuple(exclude), embeddings,
                                  tuple(save_modules), embeddings_whole, skip_undecomposable)
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise EvomergeError(f"--device: '{device}' requested but no CUDA GPU is available")

    from tqdm import tqdm

    results: list[Extracted] = []
    for t in tqdm(targets, desc="extracting", disable=quiet, leave=False):
        r = extract(t, ft, base, max_rank, sv_threshold, device, sv_epsilon, distribute_scale)
        if r is not None:
            results.append(r)
    if not modules_to_save:   # still saved: what the user named (--save-module, --no-embed-lora)
        whole = {m: n for m, n in whole.items()
                 if m in save_modules or m.rpartition(".")[2] in save_modules
                 or (embeddings_whole and (modules.kinds.get(m) == "embedding"
                                           or m == modules.output_embedding))}
    saved = changed_whole_modules(whole, ft, base)
    biases = changed_biases(results, ft, base) if modules_to_save else []
    if not results:
        raise EvomergeError("--model: no selected linear or embedding module differs from the "
                            "base model; there is nothing to extract (check --include/--exclude)")

    import torch
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for r in results:
        prefix = "base_model.model." + r.target.module
        if r.target.kind == "embedding":
            tensors[prefix + ".lora_embedding_A"] = r.a
            tensors[prefix + ".lora_embedding_B"] = r.b
        else:
            tensors[prefix + ".lora_A.weight"] = r.a
            tensors[prefix + ".lora_B.weight"] = r.b
    for module, names in saved.items():
        for n in names:     # under the module's name in the loaded model, as PEFT saves them
            tensors[f"base_model.model.{module}.{n.rpartition('.')[2]}"] = ft.read(n)
    for module, n in biases:   # peft's bias="lora_only" layout: the LoRA layer's bias, replaced
        tensors[f"base_model.model.{module}.base_layer.bias"] = ft.read(n)
    config = adapter_config(results, sorted(saved), base_model)
    if biases:
        config["bias"] = "lora_only"
    summary = {r.target.module: (r.rank, r.dropped_error) for r in results}
    with AtomicFolder(out, overwrite) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "README.md").write_text(_card(model, base_model, config, summary, sorted(saved)))
    return summary


def _card(model, base_model, config, summary, saved) -> str:
    total = math.sqrt(sum(e * e for _, e in summary.values()))
    front = "---\nlibrary_name: peft\nbase_model: " + json.dumps(base_model) + \
            "\ntags:\n- lora\n- evomerge\n---\n\n"
    return (front + f"# LoRA extracted from {model}\n\n"
            f"Truncated SVD of each module's weight difference against `{base_model}` "
            f"(mergekit-extract-lora). {len(summary)} modules, rank up to {config['r']}"
            + (f", {len(saved)} modules saved whole" if saved else "") + ".\n\n"
            f"Predicted Frobenius error over all modules (Eckart–Young): {total:.4g}.\n")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", required=True, help="The fine-tuned model (folder or hub id).")
@click.option("--base-model", required=True, help="The model it was fine-tuned from.")
@click.option("--out-path", required=True, type=click.Path(file_okay=False),
              help="Folder for the PEFT adapter.")
@click.option("--max-rank", required=True, type=int, help="Largest LoRA rank per module.")
@click.option("--sv-threshold", type=float, default=0.0, show_default=True,
              help="Also drop singular values below this fraction of the module's largest.")
@click.option("--sv-epsilon", type=float, default=0.0, show_default=True,
              help="Also drop singular values at or below this absolute value (the reference's).")
@click.option("--include", "--include-regex", multiple=True,
              help="Regex: only modules whose name matches (repeatable).")
@click.option("--exclude", "--exclude-regex", multiple=True,
              help="Regex: skip modules whose name matches (repeatable).")
@click.option("--embeddings/--no-embeddings", default=True, show_default=True,
              help="Extract LoRA for embedding layers too (PEFT lora_embedding_A/B).")
@click.option("--embed-lora/--no-embed-lora", default=None,
              help="The reference's switch: --no-embed-lora saves the embedding and head whole "
                   "instead (default here: --embed-lora).")
@click.option("--save-module", multiple=True,
              help="Save this module whole instead of as a LoRA (full or last name; repeatable).")
@click.option("--modules-to-save/--no-modules-to-save", default=True, show_default=True,
              help="Save what LoRA cannot express (changed norms, biases of LoRA layers) whole.")
@click.option("--skip-undecomposable", is_flag=True,
              help="Leave out modules LoRA cannot express (norms ...) instead of saving them whole.")
@click.option("--distribute-scale/--no-distribute-scale", default=True, show_default=True,
              help="√Σ in both factors, or Σ in lora_A only (the same product).")
@click.option("--device", default=None, help="Device for the SVDs (default cpu).")
@click.option("--cuda", is_flag=True, help="Same as --device cuda.")
@click.option("--trust-remote-code", is_flag=True, help="Allow model code from the model folder.")
@click.option("--overwrite", is_flag=True, help="Replace OUT_PATH if it is not empty.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary.")
def cli(model, base_model, out_path, max_rank, sv_threshold, sv_epsilon, include, exclude,
        embeddings, embed_lora, save_module, modules_to_save, skip_undecomposable,
        distribute_scale, device, cuda, trust_remote_code, overwrite, quiet):
    """Extract a PEFT LoRA adapter that turns BASE into the fine-tuned MODEL."""
    from merge.command import device as device_from_flags, reporting

    with reporting("--out-path"):
        summary = run(model, base_model, out_path, max_rank, sv_threshold, include, exclude,
                      embeddings, modules_to_save, device_from_flags(cuda, device), overwrite,
                      trust_remote_code, quiet, sv_epsilon=sv_epsilon, save_modules=save_module,
                      embeddings_whole=embed_lora is False,
                      skip_undecomposable=skip_undecomposable,
                      distribute_scale=distribute_scale)
    if not quiet:
        ranks = sorted({r for r, _ in summary.values()})
        click.echo(f"wrote {out_path}: {len(summary)} modules, ranks {ranks[0]}..{ranks[-1]}")


def main() -> None:
    cli(prog_name="mergekit-extract-lora")
