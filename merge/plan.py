"""The planner: a validated config plus tensor headers → one entry per output tensor.

Everything that can be wrong with a config is found here, from headers alone, before any tensor is
loaded: model paths, architectures, layer ranges, shapes, parameter names, ranges and presence.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Optional

from merge import architecture
from merge.config import MergeConfig, SliceSource
from merge.errors import ConfigError, EvomergeError
from merge.methods import Method, get_method
from merge.parameters import Position, as_bool, as_number, resolve
from merge.sources import ModelSource, TensorInfo
from merge.vocab import VocabPlan, plan_vocab

_FLOAT_CODES = {"F64", "F32", "F16", "BF16"}


@dataclass(frozen=True)
class Input:
    model: str      # model reference text, as written in the config
    tensor: str     # tensor name inside that model


@dataclass
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    dtype: str                          # safetensors code of the output
    inputs: list[Input]                 # the weighted (non-base) inputs
    base: Optional[Input]
    model_params: list[dict[str, Any]]
    params: dict[str, Any]
    copy_only: bool = False             # non-float tensors (buffers) are copied from the reference
    vocab: bool = False                 # rows are tokens: re-indexed to the output vocabulary

    @property
    def nbytes(self) -> int:
        from merge.sources import ST_ITEMSIZE

        n = 1
        for d in self.shape:
            n *= d
        return n * ST_ITEMSIZE[self.dtype]


@dataclass
class Plan:
    config: MergeConfig
    method: Method
    sources: dict[str, ModelSource]
    reference: str                      # the model whose config.json and tokenizer we start from
    tensors: list[TensorPlan]
    num_layers: int
    out_config: dict[str, Any]
    compute_dtype: Optional[str]
    layer_map: list[tuple[str, int]] = field(default_factory=list)  # output layer → (model, layer)
    vocab: Optional[VocabPlan] = None    # set when embedding rows are re-indexed
    warnings: list[str] = field(default_factory=list)  # accepted settings that have no effect

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def summary(self) -> str:
        lines = [f"method: {self.method.name}",
                 f"models: {', '.join(self.sources)}",
                 f"reference (config, tokenizer): {self.reference}",
                 f"output layers: {self.num_layers}",
                 f"tensors: {len(self.tensors)} ({self.total_bytes / 2**20:.1f} MiB)"]
        for t in self.tensors:
            srcs = ", ".join(f"{i.model}:{i.tensor}" for i in t.inputs)
            base = f" base={t.base.model}" if t.base else ""
            params = {**t.params, **({"per_model": t.model_params} if t.model_params else {})}
            lines.append(f"  {t.name} {list(t.shape)} {t.dtype} <- [{srcs}]{base} {params}")
        return "\n".join(lines)


class SourceCache:
    """Opened models by reference, so repeated plans (evolution) read each header once."""

    def __init__(self):
        self.models: dict[str, ModelSource] = {}

    def get(self, ref: str, field: str) -> ModelSource:
        if ref not in self.models:
            self.models[ref] = ModelSource.open(ref, field)
        return self.models[ref]


def _field_of(cfg: MergeConfig, ref: str) -> str:
    for i, m in enumerate(cfg.models or []):
        if m.model == ref:
            return f"models[{i}].model"
    for i, s in enumerate(cfg.slices or []):
        for j, src in enumerate(s.sources):
            if src.model == ref:
                return f"slices[{i}].sources[{j}].model"
    return "base_model"


@dataclass
class _Slice:
    """A slice in canonical form: sources with config paths, and which one is the base."""

    path: str
    sources: list[tuple[str, SliceSource]]   # (field path, source)
    parameters: Optional[dict]
    base: Optional[tuple[str, SliceSource]]
    inputs: list[tuple[str, SliceSource]]

    @property
    def length(self) -> int:
        a, b = self.sources[0][1].layer_range
        return b - a

    @property
    def reference(self) -> SliceSource:
        return (self.base or self.sources[0])[1]


def build_plan(cfg: MergeConfig, cache: Optional[SourceCache] = None,
               allow_crimes: bool = False, truncate_vocab: bool = False) -> Plan:
    method = get_method(cfg.merge_method)
    cache = cache or SourceCache()
    warnings = list(cfg.warnings) + _unused_parameters(cfg, method)
    if method.needs_base and not cfg.base_model and not (
            cfg.slices and all(s.base_model for s in cfg.slices)):
        raise ConfigError("base_model", f"{method.name} needs a base model; add base_model: <path>")

    sources = {ref: cache.get(ref, _field_of(cfg, ref)) for ref in cfg.referenced_models()}
    archs = {ref: architecture.infer(src.config, list(src.tensors), _field_of(cfg, ref))
             for ref, src in sources.items()}
    _check_same_family(cfg, archs, allow_crimes)

    slices = _canonical_slices(cfg, method, archs)
    reference = cfg.base_model or cfg.referenced_models()[0]
    vocab = plan_vocab(cfg, sources, truncate_vocab, warnings.append)
    plans: list[TensorPlan] = []
    layer_map: list[tuple[str, int]] = []

    first, last = slices[0], slices[-1]
    ref_first = archs[first.reference.model]
    for name in ref_first.pre:
        plans.append(_tensor_plan(cfg, method, sources, archs, first, name, name, None, vocab=vocab))
    out_layer = 0
    for sl in slices:
        ref_src = sl.reference
        ref_arch = archs[ref_src.model]
        for i in range(sl.length):
            src_layer = ref_src.layer_range[0] + i
            layer_map.append((ref_src.model, src_layer))
            for rest in ref_arch.layers[src_layer]:
                out_name = ref_arch.layer_tensor(out_layer, rest)
                plans.append(_tensor_plan(cfg, method, sources, archs, sl, out_name, rest,
                                          Position(out_name, i, sl.length), layer=i))
            out_layer += 1
    ref_last = archs[last.reference.model]
    for name in ref_last.post:
        plans.append(_tensor_plan(cfg, method, sources, archs, last, name, name, None, vocab=vocab))
    # A tied reference beside untied inputs: their heads carry information, so the output gets a
    # head of its own (the tied models contribute their embeddings to it).
    heads = sorted({archs[s.model].head_name() for _, s in last.sources
                    if not archs[s.model].tied_embeddings and archs[s.model].head_name()})
    untie = ref_last.tied_embeddings and bool(heads)
    if untie:
        plans.append(_tensor_plan(cfg, method, sources, archs, last, heads[0], heads[0], None,
                                  vocab=vocab))

    out_config = _output_config(sources, reference, archs[reference], layer_map, plans, cfg)
    if untie:
        out_config["tie_word_embeddings"] = False
    if vocab is not None:
        _set_vocab_size(out_config, vocab.size)
    if cfg.chat_template not in (None, "auto"):
        from merge.tokenizer import TEMPLATES

        if cfg.chat_template not in TEMPLATES and "{{" not in cfg.chat_template \
                and "{%" not in cfg.chat_template:
            raise ConfigError("chat_template", f"'{cfg.chat_template}' is neither auto, a known "
                                               f"name ({', '.join(TEMPLATES)}) nor a Jinja template")
    return Plan(cfg, method, sources, reference, plans, out_layer, out_config, cfg.dtype, layer_map,
                vocab, warnings)


def _set_vocab_size(config: dict, size: int) -> None:
    for cfg in (config, config.get("text_config")):
        if isinstance(cfg, dict) and "vocab_size" in cfg:
            cfg["vocab_size"] = size


def _unused_parameters(cfg: MergeConfig, method: Method) -> list[str]:
    """One warning per distinct parameter the method does not use, naming where it was given.

    The reference toolkit resolves only the parameters a method declares and ignores the rest:
    per-model weights on slerp, a per-tensor `t` under a model, the base model's own parameters.
    """
    base_of = {i: s.base_model or cfg.base_model for i, s in enumerate(cfg.slices or [])}
    levels = [("parameters", cfg.parameters, "top")]
    for i, m in enumerate(cfg.models or []):
        is_base = method.takes_base and m.model == cfg.base_model
        levels.append((f"models[{i}].parameters", m.parameters, "base" if is_base else "model"))
    for i, s in enumerate(cfg.slices or []):
        levels.append((f"slices[{i}].parameters", s.parameters, "top"))
        for j, src in enumerate(s.sources):
            is_base = method.takes_base and src.model == base_of[i]
            levels.append((f"slices[{i}].sources[{j}].parameters", src.parameters,
                           "base" if is_base else "model"))
    unused: dict[tuple[str, str], list[str]] = {}
    for path, params, kind in levels:
        for name in params or {}:
            spec = method.params.get(name)
            if spec is None:
                why = "unknown"
            elif kind == "model" and not spec.per_model:
                why = "per_tensor"
            elif kind == "base" and spec.per_model:
                why = "base"
            else:
                continue
            unused.setdefault((why, name), []).append(f"{path}.{name}")
    known = ", ".join(method.params) or "no parameters"
    out = []
    for (why, name), places in unused.items():
        where = ", ".join(places[:3]) + (f" (and {len(places) - 3} more)" if len(places) > 3 else "")
        if why == "unknown":
            what = f"{method.name} does not use '{name}' (it takes {known}); ignored"
        elif why == "per_tensor":
            what = (f"'{name}' is one value per tensor for {method.name}; given per model it is "
                    f"ignored (set it in the top-level or slice parameters)")
        else:
            what = f"{method.name} merges the other models into the base; the base's '{name}' is ignored"
        out.append(f"{where}: {what}")
    return out


def _check_same_family(cfg, archs, allow_crimes: bool) -> None:
    types = {ref: a.model_type for ref, a in archs.items()}
    if len(set(types.values())) > 1 and not allow_crimes:
        desc = ", ".join(f"{r}={t}" for r, t in types.items())
        raise EvomergeError(f"models: architectures differ ({desc}); pass --allow-crimes if you "
                            f"really mean to mix them")


def _canonical_slices(cfg: MergeConfig, method: Method, archs) -> list[_Slice]:
    if cfg.models is not None:
        counts = {m.model: archs[m.model].num_layers for m in cfg.models}
        if cfg.base_model:
            counts[cfg.base_model] = archs[cfg.base_model].num_layers
        if len(set(counts.values())) > 1:
            desc = ", ".join(f"{r}: {n}" for r, n in counts.items())
            raise ConfigError("models", f"models have different layer counts ({desc}); use "
                                        f"'slices' with explicit layer_range to combine them")
        n = next(iter(counts.values()))
        srcs = [(f"models[{i}]", SliceSource(model=m.model, layer_range=(0, n),
                                             parameters=m.parameters))
                for i, m in enumerate(cfg.models)]
        if cfg.base_model and cfg.base_model not in {m.model for m in cfg.models}:
            # The reference adds the base to the merged models: as the base for methods that
            # take one, as one more weighted input for those that do not (linear, karcher, ...).
            base_src = ("base_model", SliceSource(model=cfg.base_model, layer_range=(0, n)))
            if method.takes_base:
                srcs.insert(0, base_src)
            else:
                srcs.append(base_src)
        raw = [("models", srcs, None, cfg.base_model)]
    else:
        raw = [(f"slices[{i}]", [(f"slices[{i}].sources[{j}]", src)
                                 for j, src in enumerate(s.sources)], s.parameters,
                s.base_model or cfg.base_model)
               for i, s in enumerate(cfg.slices)]

    out = []
    for path, srcs, params, base_model in raw:
        for spath, src in srcs:
            n = archs[src.model].num_layers
            a, b = src.layer_range
            if b > n:
                raise ConfigError(f"{spath}.layer_range",
                                  f"[{a}, {b}) is out of bounds: '{src.model}' has {n} layers "
                                  f"(valid: 0 <= start < end <= {n})")
        base = None
        inputs = srcs
        if method.takes_base and base_model:
            matches = [(p, s) for p, s in srcs if s.model == base_model]
            if not matches:
                raise ConfigError(f"{path}.sources", f"the base model '{base_model}' must be "
                                                     f"among this slice's sources for "
                                                     f"{method.name}")
            base = matches[0]
            inputs = [(p, s) for p, s in srcs if s.model != base_model]
        elif method.needs_base:
            raise ConfigError(f"{path}.base_model", f"{method.name} needs a base model; add "
                                                    f"base_model: <path>")
        method.check_model_count(len(inputs), path if cfg.slices else "models")
        out.append(_Slice(path, srcs, params, base, inputs))
    return out


def _source_tensor(src_model: str, archs, sources, rest_or_name: str, layer: Optional[int],
                   src: SliceSource) -> Input:
    arch = archs[src_model]
    if layer is not None:
        name = arch.layer_tensor(src.layer_range[0] + layer, rest_or_name)
    else:
        name = rest_or_name
    tensors = sources[src_model].tensors
    if name not in tensors:
        if layer is None and arch.tied_embeddings and arch.embedding_name() and (
                name.endswith("lm_head.weight") or name.endswith("embed_out.weight")):
            name = arch.embedding_name()  # a tied model's head is its embedding
        else:
            raise EvomergeError(f"models: tensor '{name}' is missing from '{src_model}'; the "
                                f"models do not share one layout (--allow-crimes does not fix this)")
    return Input(src_model, name)


def _tensor_plan(cfg: MergeConfig, method: Method, sources, archs, sl: _Slice, out_name: str,
                 key: str, pos: Optional[Position], layer: Optional[int] = None,
                 vocab: Optional[VocabPlan] = None) -> TensorPlan:
    pos = pos or Position(out_name)
    inputs = [_source_tensor(s.model, archs, sources, key, layer, s) for _, s in sl.inputs]
    base = (_source_tensor(sl.base[1].model, archs, sources, key, layer, sl.base[1])
            if sl.base else None)
    infos: list[tuple[Input, TensorInfo]] = [(i, sources[i.model].tensors[i.tensor])
                                              for i in ([base] if base else []) + inputs]
    is_vocab = vocab is not None and layer is None and all(
        info.shape and info.shape[0] == _rows(sources[i.model], archs[i.model]) for i, info in infos)
    shapes = {info.shape[1:] if is_vocab else info.shape for _, info in infos}
    if len(shapes) > 1:
        desc = ", ".join(f"'{i.model}' {list(info.shape)}" for i, info in infos)
        raise EvomergeError(f"models: tensor '{out_name}' has mismatched shapes ({desc}); the models "
                            f"differ in size (hidden size, vocabulary) and cannot be merged "
                            f"tensor by tensor")
    ref_info = infos[0][1]
    shape = (vocab.size, *ref_info.shape[1:]) if is_vocab else ref_info.shape
    copy_only = ref_info.dtype not in _FLOAT_CODES
    out_dtype = ref_info.dtype
    if not copy_only:
        out_dtype = _promoted([info.dtype for _, info in infos])
    if not copy_only and (cfg.out_dtype or cfg.dtype):
        out_dtype = {"float32": "F32", "float16": "F16", "bfloat16": "BF16",
                     "float64": "F64"}[cfg.out_dtype or cfg.dtype]

    params: dict[str, Any] = {}
    model_params: list[dict[str, Any]] = [{} for _ in inputs]
    global_levels = [(sl.path + ".parameters", sl.parameters), ("parameters", cfg.parameters)]
    for pname, spec in method.params.items():
        if spec.per_model:
            for k, (spath, s) in enumerate(sl.inputs):
                levels = [(spath + ".parameters", s.parameters)] + global_levels
                # per-model values are looked up by the model's own tensor name (as the
                # reference does): a filter on a layer number sees the source layer
                logical = (archs[s.model].layer_tensor(s.layer_range[0] + layer, key)
                           if layer is not None else key)   # a tied head is still lm_head
                model_pos = pos.renamed(logical)
                model_params[k][pname] = _value(spec, resolve(levels, pname, model_pos), spath,
                                                s.model, method, out_name)
        else:
            params[pname] = _value(spec, resolve(global_levels, pname, pos), "parameters", None,
                                   method, out_name)
    if method.check is not None:
        problem = method.check(model_params, params)
        if problem:
            raise ConfigError(sl.path if cfg.slices else "parameters",
                              f"{problem} (tensor '{out_name}')")
    return TensorPlan(out_name, shape, out_dtype, inputs, base, model_params, params, copy_only,
                      is_vocab)


def _promoted(codes: list[str]) -> str:
    """The dtype torch promotes mixed float inputs to (what the reference then saves, when no
    dtype is configured): float16 with bfloat16 gives float32."""
    floats = {c for c in codes if c in _FLOAT_CODES}
    if len(floats) <= 1:
        return codes[0]
    if "F64" in floats:
        return "F64"
    return "F32"


def _rows(src: ModelSource, arch) -> int:
    name = arch.embedding_name()
    return src.tensors[name].shape[0] if name else -1


def _value(spec, found, path: str, model: Optional[str], method: Method, tensor: str):
    if found is None:
        if spec.required and path == "base_model":
            raise ConfigError(f"base_model", f"{method.name} merges the base model as one more "
                                             f"input (as mergekit does) and needs its "
                                             f"'{spec.name}'; list the base under models with a "
                                             f"'{spec.name}', or set it in the top-level parameters")
        if spec.required:
            who = f" for '{model}'" if model else ""
            raise ConfigError(f"{path}.parameters.{spec.name}" if model else f"parameters.{spec.name}",
                              f"{method.name} needs '{spec.name}'{who} (no value applies to "
                              f"tensor '{tensor}'); set it")
        return spec.default
    value, where = found
    if spec.kind is bool:
        value = as_bool(value)
        if isinstance(value, bool):
            return value
        raise ConfigError(where, f"must be true or false, got {value!r}")
    value = as_number(value)   # '1e-5': YAML 1.1 reads it as a string, the reference as a number
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(where, f"must be a number, got {value!r}")
    value = float(value)
    if (spec.min is not None and value < spec.min) or (spec.max is not None and value > spec.max):
        lo = "-inf" if spec.min is None else f"{spec.min:g}"
        hi = "inf" if spec.max is None else f"{spec.max:g}"
        raise ConfigError(where, f"{value:g} is outside [{lo}, {hi}]")
    return value


def _output_config(sources, reference: str, ref_arch, layer_map, plans, cfg: MergeConfig) -> dict:
    out = copy.deepcopy(sources[reference].config)
    n_ref = ref_arch.num_layers
    # Per-layer lists (e.g. layer_types) follow the layers they describe, from the model each
    # output layer comes from.
    for key, value in list(out.items()):
        if isinstance(value, list) and len(value) == n_ref and key != "architectures":
            out[key] = [sources[model].config.get(key, value)[src_layer]
                        for model, src_layer in layer_map]
    out[ref_arch.layer_count_key] = len(layer_map)
    dtype = cfg.out_dtype or cfg.dtype
    if dtype is None:
        float_codes = [t.dtype for t in plans if not t.copy_only]
        code = max(set(float_codes), key=float_codes.count) if float_codes else "F32"
        dtype = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}[code]
    # Transformers 5 writes (and the reference's config.json carries) `dtype`; older configs
    # name it `torch_dtype`: update the key the reference model uses, only one of them.
    out["dtype" if "dtype" in out or "torch_dtype" not in out else "torch_dtype"] = dtype
    return out
