"""Assemble a mixture-of-experts model: the base donates attention, norms, embeddings and head;
each expert donates its MLPs; the router rows come from prompts (see gates.py).

    plan_moe(config)                 headers only: models, architectures, sizes — every check
    build_moe(config, out, options)  compute the gates, then stream every tensor to a sharded folder

Experts are copied, not merged: expert e's MLP weights in layer i are exactly source e's, except
that the routed down projections are divided by the routing weights' per-token sum where the output
architecture does not renormalise it to 1 (PhiMoE; Qwen2-MoE with its constant shared gate), so that
an MoE of identical experts computes exactly the dense model's MLP (see layouts.py).

Options are merge.engine.MergeOptions (device, random_seed, out_shard_size, copy_tokenizer,
write_model_card, overwrite, quiet); the merge-only fields are ignored.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from merge.errors import ConfigError, EvomergeError
from merge.moe.config import RANDOM_MODES, MoEConfig
from merge.moe.layouts import (DenseMLP, Layout, OutTensor, base_layer_tensors, base_outer_tensors,
                               check_base_config, layout_for, output_config)

if TYPE_CHECKING:
    from merge.engine import MergeOptions

_CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}


@dataclass
class MoEPlan:
    config: MoEConfig
    layout: Layout
    base: Any                      # ModelSource
    base_arch: Any                 # merge.architecture.Architecture
    experts: list[DenseMLP]
    shared: Optional[DenseMLP]
    hidden: int
    intermediate: int
    shared_intermediate: Optional[int]
    hf_config: Any                 # the output's transformers config
    dtype: str                     # output dtype name
    sources: dict[str, Any] = field(default_factory=dict)
    routed_scale: float = 1.0      # factor on the routed experts' down projections

    @property
    def num_layers(self) -> int:
        return self.base_arch.num_layers

    def summary(self) -> str:
        lines = [f"output: {self.layout.class_name} ({self.layout.model_type}), {self.dtype}",
                 f"base (attention, norms, embeddings, head): {self.config.base_model}",
                 f"layers: {self.num_layers}, hidden {self.hidden}, expert intermediate "
                 f"{self.intermediate}",
                 f"experts: {len(self.experts)}, {self.config.experts_per_token} per token, gates: "
                 f"{self.config.gate_mode}"]
        if self.layout.model_type == "phimoe":
            lines.append("note: PhiMoE normalises with LayerNorm where Phi-3 uses RMSNorm, so the "
                         "MoE is not the dense model even with identical experts")
        if self.routed_scale != 1.0:
            lines.append(f"routed down projections × {self.routed_scale:g} (the routing weights "
                         f"sum to {1 / self.routed_scale:g} per token)")
        lines += [f"  [{i}] {e.source.ref}" for i, e in enumerate(self.experts)]
        if self.shared is not None:
            lines.append(f"shared expert: {self.shared.source.ref} (intermediate "
                         f"{self.shared_intermediate})")
        return "\n".join(lines)


def plan_moe(cfg: MoEConfig) -> MoEPlan:
    """Validate the whole build from config.json files and tensor headers; load no tensor."""
    from merge import architecture
    from merge.sources import ModelSource

    sources: dict[str, Any] = {}

    def open_model(ref: str, label: str):
        if ref not in sources:
            sources[ref] = ModelSource.open(ref, label)
        return sources[ref]

    base = open_model(cfg.base_model, "base_model")
    base_type = base.config.get("model_type", "unknown")
    layout = layout_for(base_type, cfg.architecture)
    base_arch = architecture.infer(base.config, list(base.tensors), "base_model")
    n_layers = base_arch.num_layers
    hidden = base.config.get("hidden_size")
    n = len(cfg.experts)

    if layout.fixed_top_k is not None:
        if cfg.experts_per_token != layout.fixed_top_k:
            raise ConfigError("experts_per_token", f"{layout.class_name} always routes each token "
                                                   f"to {layout.fixed_top_k} experts; set "
                                                   f"experts_per_token: {layout.fixed_top_k}")
        if n < layout.fixed_top_k:
            raise ConfigError("experts", f"{layout.class_name} needs at least "
                                         f"{layout.fixed_top_k} experts, got {n}")
    if cfg.shared_experts and not layout.shared_expert:
        raise ConfigError("shared_experts", f"{layout.class_name} has no shared expert; remove "
                                            f"the key (only Qwen2-MoE outputs have one)")

    def dense(ref: str, label: str) -> DenseMLP:
        src = open_model(ref, label)
        t = src.config.get("model_type", "unknown")
        if t not in layout.inputs:
            raise EvomergeError(f"{label}: a {t} model cannot be an expert of a "
                                f"{layout.model_type} MoE (base {base_type}); experts must be "
                                f"{' or '.join(layout.inputs)} models")
        arch = architecture.infer(src.config, list(src.tensors), label)
        if arch.num_layers != n_layers:
            raise EvomergeError(f"{label}: '{ref}' has {arch.num_layers} layers, the base model "
                                f"{n_layers}; experts must have the base's layer count")
        mlp = DenseMLP(src, arch, label)
        h, inter = mlp.sizes()
        if h != hidden:
            raise EvomergeError(f"{label}: '{ref}' has hidden size {h}, the base model {hidden}; "
                                f"experts must share the base's hidden size")
        for layer in range(1, n_layers):
            p = mlp.parts(layer)
            if p["gate"].shape != (inter, h) or p["down"].shape != (h, inter):
                raise EvomergeError(f"{label}: '{ref}' changes its MLP size at layer {layer}; "
                                    f"every layer must have the same intermediate size")
        return mlp

    experts = [dense(e.source_model, f"experts[{i}].source_model")
               for i, e in enumerate(cfg.experts)]
    intermediate = experts[0].sizes()[1]
    for i, mlp in enumerate(experts[1:], start=1):
        if mlp.sizes()[1] != intermediate:
            raise EvomergeError(f"experts[{i}].source_model: intermediate size "
                                f"{mlp.sizes()[1]} differs from experts[0]'s {intermediate}; all "
                                f"routed experts of one MoE share one MLP size")
    shared = None
    shared_intermediate = None
    if layout.shared_expert:
        if cfg.shared_experts:
            shared = dense(cfg.shared_experts[0].source_model, "shared_experts[0].source_model")
        else:
            shared = dense(cfg.base_model, "base_model")   # the base's own MLP by default
        shared_intermediate = shared.sizes()[1]

    if cfg.gate_mode in ("hidden", "cheap_embed") and not any(
            (base.folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model",
                                                  "tokenizer_config.json", "vocab.json")):
        raise EvomergeError(f"base_model: '{cfg.base_model}' has no tokenizer files; gate_mode "
                            f"{cfg.gate_mode} needs the base's tokenizer to read the prompts "
                            f"(or use gate_mode: random)")

    from transformers import AutoConfig

    base_cfg = AutoConfig.from_pretrained(base.folder)
    check_base_config(layout, base_cfg)
    dtype = cfg.dtype or _base_dtype(base)
    hf_config = output_config(layout, base_cfg, n, cfg.experts_per_token, intermediate,
                              shared_intermediate, dtype, cfg.norm_topk_prob)
    return MoEPlan(cfg, layout, base, base_arch, experts, shared, hidden, intermediate,
                   shared_intermediate, hf_config, dtype, sources, routed_scale(cfg, layout))


def routed_scale(cfg: MoEConfig, layout: Layout) -> float:
    """1 / (the routing weights' sum per token) where that sum is a known constant other than 1.

    PhiMoE: its two picks weigh exactly 1 each. Qwen2-MoE: the routed weights sum to 1, and the
    shared expert adds sigmoid(gate·x) of its own; an unprompted shared gate is 0, sigmoid(0) = ½
    for every token, so the total is 1½ and the routed experts take ½ (the shared expert the other
    ½). A prompted shared gate varies per token: nothing to compensate exactly, the routed
    experts stay as they are (as in the reference toolkit).
    """
    total = layout.routed_weight_sum
    if layout.shared_expert and not _shared_gate_prompted(cfg):
        return 0.5
    return 1.0 / total


def _shared_gate_prompted(cfg: MoEConfig) -> bool:
    return bool(cfg.gate_mode not in RANDOM_MODES and cfg.shared_experts
                and cfg.shared_experts[0].positive_prompts)


def _base_dtype(base) -> str:
    name = base.config.get("dtype") or base.config.get("torch_dtype")
    if name in _CODES:
        return name
    codes = [t.dtype for t in base.tensors.values()]
    code = max(set(codes), key=codes.count)
    return {v: k for k, v in _CODES.items()}.get(code, "float32")


def compute_gates(plan: MoEPlan, options: "MergeOptions"):
    """(layers, experts, hidden) router rows and the optional (layers, 1, hidden) shared gate."""
    from merge.moe import gates

    cfg = plan.config
    shared_cfg = cfg.shared_experts[0] if cfg.shared_experts else None
    if cfg.gate_mode == "hidden":
        g, sg = gates.hidden_gates(plan.base, cfg.experts, plan.num_layers, options.device,
                                   shared_cfg)
    elif cfg.gate_mode == "cheap_embed":
        g, sg = gates.cheap_embed_gates(plan.base, plan.base_arch, cfg.experts, plan.num_layers,
                                        shared_cfg)
    elif cfg.gate_mode == "uniform_random":
        g, sg = gates.uniform_random_gates(len(cfg.experts), plan.hidden, plan.num_layers,
                                           options.random_seed)
    else:
        g, sg = gates.random_gates(len(cfg.experts), plan.hidden, plan.num_layers,
                                   options.random_seed)
    if cfg.gate_mode not in RANDOM_MODES:
        gates.check_distinct(g, cfg.gate_mode)
    return g, sg


def _expert_weight(produce, name: str, expert, scale: float, seed: Optional[int]):
    """An expert's MLP weight with its `noise_scale` noise (seeded per tensor name, so independent
    of the order tensors are written in) and, for down_proj, the factor `scale`."""
    noise = expert.noise_scale if expert is not None else None
    if not noise and scale == 1.0:
        return produce

    def make():
        import zlib

        import torch

        t = produce()
        if noise:
            from merge.moe.gates import _seed

            g = torch.Generator().manual_seed(_seed(seed) ^ zlib.crc32(name.encode()))
            t = t.float() + torch.randn(t.shape, generator=g) * noise
        # fp32 product, rounded once on writing; ½ (the routing compensation) is exact
        return t.float() * scale if scale != 1.0 else t
    return make


def output_tensors(plan: MoEPlan, gates, shared_gate, seed: Optional[int] = None
                   ) -> list[OutTensor]:
    import torch

    lay, arch, cfg = plan.layout, plan.base_arch, plan.config
    if seed is None and any(e.noise_scale for e in [*cfg.experts, *(cfg.shared_experts or [])]):
        from merge.moe.gates import _seed

        seed = _seed(None)   # one draw for the whole build
    out = base_outer_tensors(lay, plan.base, arch.pre)
    n = len(plan.experts)
    for i in range(plan.num_layers):
        out += base_layer_tensors(lay, plan.base, arch, i)
        block = f"{lay.block}."
        out.append(OutTensor(arch.layer_tensor(i, block + lay.router), (n, plan.hidden),
                             lambda i=i: gates[i]))
        for e, (mlp, expert) in enumerate(zip(plan.experts, cfg.experts)):
            parts = mlp.parts(i)
            for part, leaf in zip(("gate", "up", "down"), lay.expert_names):
                name = arch.layer_tensor(i, f"{block}experts.{e}.{leaf}")
                scale = plan.routed_scale * (expert.residual_scale or 1.0) if part == "down" \
                    else 1.0
                out.append(OutTensor(name, parts[part].shape,
                                     _expert_weight(parts[part].produce, name, expert, scale,
                                                    seed)))
        if plan.shared is not None:
            parts = plan.shared.parts(i)
            expert = cfg.shared_experts[0] if cfg.shared_experts else None
            for part in ("gate", "up", "down"):
                name = arch.layer_tensor(i, f"mlp.shared_expert.{part}_proj.weight")
                scale = (expert.residual_scale or 1.0) if expert is not None and part == "down" \
                    else 1.0
                out.append(OutTensor(name, parts[part].shape,
                                     _expert_weight(parts[part].produce, name, expert, scale,
                                                    seed)))
            # Without prompts the shared gate is 0: sigmoid(0) = ½ for every token.
            produce = ((lambda i=i: shared_gate[i]) if shared_gate is not None
                       else (lambda: torch.zeros(1, plan.hidden)))
            out.append(OutTensor(arch.layer_tensor(i, "mlp.shared_expert_gate.weight"),
                                 (1, plan.hidden), produce))
    out += base_outer_tensors(lay, plan.base, arch.post)
    return out


def build_moe(cfg: MoEConfig, out_dir, options: Optional["MergeOptions"] = None,
              plan: Optional[MoEPlan] = None) -> Path:
    import torch
    import yaml
    from tqdm import tqdm

    from merge.engine import MergeOptions
    from merge.sources import ST_ITEMSIZE
    from merge.writer import AtomicFolder, ShardedWriter, check_output_folder

    options = options or MergeOptions()
    out_dir = Path(out_dir)
    plan = plan or plan_moe(cfg)
    check_output_folder(out_dir, options.overwrite, [s.folder for s in plan.sources.values()])
    if options.device.startswith("cuda") and not torch.cuda.is_available():
        raise EvomergeError(f"--device: '{options.device}' requested but no CUDA GPU is "
                            f"available; drop --cuda/--device")
    gates, shared_gate = compute_gates(plan, options)
    tensors = output_tensors(plan, gates, shared_gate, options.random_seed)
    dtype = getattr(torch, plan.dtype)
    code = _CODES[plan.dtype]
    specs = []
    for t in tensors:
        numel = 1
        for d in t.shape:
            numel *= d
        specs.append((t.name, t.shape, code, numel * ST_ITEMSIZE[code]))
    with AtomicFolder(out_dir, options.overwrite) as tmp:
        writer = ShardedWriter(tmp, specs, options.out_shard_size)
        try:
            with torch.no_grad():
                for t in tqdm(tensors, desc="writing", disable=options.quiet, leave=False):
                    writer.write(t.name, t.produce().to(dtype))
            writer.finish()
        finally:
            writer.abort()
        plan.hf_config.to_json_file(str(tmp / "config.json"))
        base = plan.base.folder
        if options.copy_tokenizer:
            _copy_tokenizer(base, tmp)
        if (base / "generation_config.json").is_file():
            (tmp / "generation_config.json").write_bytes((base / "generation_config.json").read_bytes())
        (tmp / "mergekit_moe_config.yml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        if options.write_model_card:
            (tmp / "README.md").write_text(_card(plan, out_dir.name))
    return out_dir


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "vocab.txt")


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            (dst / name).write_bytes((src / name).read_bytes())


def _card(plan: MoEPlan, title: str) -> str:
    import yaml

    front = {"library_name": "transformers", "tags": ["merge", "moe", "evomerge"]}
    experts = "\n".join(f"- {e.source_model}" for e in plan.config.experts)
    return (f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n\n# {title}\n\n"
            f"A {plan.layout.class_name} mixture of experts assembled with evomerge's "
            f"mergekit-moe: attention, norms, embeddings and head from `{plan.config.base_model}`, "
            f"one expert per source model's MLPs, router gates from `{plan.config.gate_mode}`, "
            f"{plan.config.experts_per_token} experts per token.\n\n## Experts\n\n{experts}\n\n"
            f"## Configuration\n\n```yaml\n"
            f"{yaml.safe_dump(plan.config.to_dict(), sort_keys=False)}```\n")
