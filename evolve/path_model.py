"""In-memory layer-path models: a data-flow candidate built from the tensors a worker already holds.

A worker loads each input model once. A candidate (a passthrough config over slices, as
evolve.dataflow decodes it) becomes a model whose layers are *the input models' own layer modules*,
shallow-copied: every parameter is shared, not copied, except the residual-branch outputs that
carry a folded hop scale, which are computed by the engine's own passthrough kernel (so they are
bit-identical to what `mergekit-yaml` writes for the same config). Nothing is read from disk per
candidate, and building one costs a module-tree copy plus the scaled projections.

The path shares modules with the input models, so it must never be trained or changed in place.
"""
from __future__ import annotations

import copy
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from merge.errors import EvomergeError


def share(module):
    """A shallow copy of a module tree: new module objects (own children, parameter and hook
    dicts), the same parameter and buffer tensors."""
    new = module.__class__.__new__(module.__class__)
    d = dict(module.__dict__)
    for key, value in d.items():
        if isinstance(value, (dict, set)) and key != "_modules":
            d[key] = copy.copy(value)          # hooks, parameters, buffers: own containers
    d["_modules"] = {k: (share(v) if v is not None else None)
                     for k, v in module._modules.items()}
    new.__dict__ = d
    return new


class _LiveReader:
    """merge.engine.TensorReader's interface over the tensors of loaded models."""

    def __init__(self, states: dict[str, dict]):
        self.states = states

    def read(self, model: str, tensor: str):
        try:
            return self.states[model][tensor]
        except KeyError:
            raise EvomergeError(f"the loaded model '{model}' has no tensor '{tensor}'") from None


class PathModels:
    """The input models of a data-flow search, loaded once; `build(config)` assembles a candidate."""

    def __init__(self, refs: list[str], dtype=None, device: str = "cpu",
                 trust_remote_code: bool = False, models: Optional[dict] = None):
        from merge.engine import MergeOptions
        from merge.plan import SourceCache

        self.options = MergeOptions(device=device, quiet=True, trust_remote_code=trust_remote_code)
        self.cache = SourceCache()
        self.dtype = dtype
        self.device = device
        self.trust_remote_code = trust_remote_code
        self.models: dict = {}
        self.reader = _LiveReader({})
        for ref, model in (models or {}).items():
            self._add(ref, model)
        for ref in refs:
            self.ensure(ref)
        self.last_new_bytes = 0     # bytes of tensors made for the last candidate (the scaled ones)

    @classmethod
    def for_config(cls, config, device: str = "cpu", trust_remote_code: bool = False):
        """Models loaded in the dtype the config's checkpoint has (what mergekit-yaml writes for
        it), so a path model computes what the checkpoint does, also over mixed-dtype inputs."""
        from merge.engine import _torch_dtype

        models = cls([], device=device, trust_remote_code=trust_remote_code)
        out = models.plan(config).out_config
        models.dtype = _torch_dtype(out.get("dtype") or out.get("torch_dtype"))  # 5.x, 4.x
        return models

    def _add(self, ref: str, model) -> None:
        self.models[ref] = model
        self.reader.states[ref] = model.state_dict()

    def ensure(self, ref: str) -> None:
        """Load `ref` once (the first candidate that uses it pays for it)."""
        if ref not in self.models:
            self._add(ref, self._load(ref, self.trust_remote_code))

    def _load(self, ref: str, trust_remote_code: bool):
        from transformers import AutoModelForCausalLM

        folder = self.cache.get(ref, "models").folder
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=self.dtype,
                                                     trust_remote_code=trust_remote_code)
        return model.to(self.device).eval().requires_grad_(False)

    def plan(self, config):
        from merge.engine import validate

        return validate(config, self.options, self.cache)

    def build(self, config):
        """The candidate model of a passthrough slices config (a merge.config.MergeConfig)."""
        import torch

        from merge import architecture
        from merge.engine import merge_tensor

        plan = self.plan(config)
        if plan.method.name != "passthrough":
            raise EvomergeError("an in-memory layer path needs a passthrough config")
        first = plan.reference
        last = plan.config.slices[-1].sources[0].model
        for ref in dict.fromkeys([first, last, *(m for m, _ in plan.layer_map)]):
            self.ensure(ref)
        src = plan.sources[first]
        arch = architecture.infer(src.config, list(src.tensors), first)
        by_name = {tp.name: tp for tp in plan.tensors}
        shell = share(self.models[first])
        new_bytes = 0

        layers = []
        for i, (ref, j) in enumerate(plan.layer_map):
            layer = share(self.models[ref].get_submodule(f"{arch.layer_prefix}.{j}"))
            for m in layer.modules():
                if hasattr(m, "layer_idx"):
                    m.layer_idx = i          # the KV cache is indexed by it: one entry per slot
            prefix = f"{arch.layer_prefix}.{i}."
            with torch.no_grad():
                for rest, _ in list(layer.named_parameters()):
                    tp = by_name.get(prefix + rest)
                    if tp is None or float(tp.model_params[0].get("scale", 1.0)) == 1.0:
                        continue
                    t = merge_tensor(plan, tp, self.reader, None)
                    t = t.to(layer.get_parameter(rest).dtype)   # the dtype the models loaded in
                    new_bytes += t.numel() * t.element_size()
                    _set_param(layer, rest, torch.nn.Parameter(t, requires_grad=False))
            layers.append(layer)
        parent_name, _, attr = arch.layer_prefix.rpartition(".")
        parent = shell.get_submodule(parent_name) if parent_name else shell
        setattr(parent, attr, torch.nn.ModuleList(layers))
        # Final norm and head from the last slice's model (the embeddings are the first's).
        if last != first:
            donor = dict(self.models[last].named_parameters(remove_duplicate=False))
            for name in arch.post:
                if name in donor:
                    _set_param(shell, name, donor[name])
        cfg = _path_config(self.models[first].config, plan.out_config)
        for m in shell.modules():
            if getattr(m, "config", None) is not None and any(
                    m.config is s.config for s in self.models.values()):
                m.config = cfg
        self.last_new_bytes = new_bytes
        return shell.eval()

    def tokenizer(self, config, trust_remote_code: bool = False):
        """The tokenizer mergekit-yaml would write next to this merge."""
        from transformers import AutoTokenizer

        from merge.tokenizer import write_tokenizer

        folder = tempfile.mkdtemp(prefix="evomerge-tok-")
        try:
            write_tokenizer(self.plan(config), Path(folder))
            return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def _set_param(root, dotted: str, param) -> None:
    owner, _, leaf = dotted.rpartition(".")
    module = root.get_submodule(owner) if owner else root
    module._parameters[leaf] = param


def _path_config(base_config, out_config: dict):
    """The reference model's config object with the path's layer count and per-layer lists (what
    the merged checkpoint's config.json says)."""
    from merge.architecture import LAYER_COUNT_KEYS

    cfg = copy.deepcopy(base_config)
    text = getattr(cfg, "text_config", None)
    for target in [c for c in (cfg, text) if c is not None]:
        for key in LAYER_COUNT_KEYS:
            if key in out_config and hasattr(target, key):
                setattr(target, key, out_config[key])
        for key, value in out_config.items():
            if isinstance(value, list) and key != "architectures" and hasattr(target, key) \
                    and isinstance(getattr(target, key), list):
                setattr(target, key, list(value))
    return cfg


def start_hf(spec):
    """The Hugging Face backend of a data-flow worker: (scorer, load(MergeConfig)). The models of
    the initial path load at start; any other is loaded the first time a candidate uses it."""
    from merge.config import MergeConfig

    from evolve.fitness import Scorer

    config = MergeConfig.from_dict(spec.initial_config)
    models = PathModels.for_config(config, spec.device, spec.trust_remote_code)
    model = models.build(config)
    scorer = Scorer(model, models.tokenizer(config, spec.trust_remote_code), spec.eval)

    def load(cfg) -> None:
        m = models.build(cfg)
        scorer.lm._model = m       # HFLM reads the model through this attribute
        scorer.lm._config = m.config

    return scorer, load

