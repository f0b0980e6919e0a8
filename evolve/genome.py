"""The genome: which merge parameters evolve, and how a vector of genes becomes a merge config.

The phenotype is the engine's own merge config (a plain dict, the same YAML `mergekit-yaml`
reads), so a candidate can be reproduced on disk exactly, and the best one is written out as a
normal config.

Genes are laid out block by block:  for block → for filter group → for parameter → for model.
  * block         a run of `layer_granularity` layers (one block for the whole model when 0); with
                  `smooth: true` the block genes are the anchors of a gradient instead of constants
  * filter group  one per `filters` entry (a tensor-name substring) plus a catch-all
  * parameter     an evolved method parameter (weight, density, t, ...)
  * model         one gene per input model for per-model parameters, one shared gene otherwise
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from merge.errors import ConfigError

from evolve.space import BoxSpace
from evolve.vllm_backend import VllmSettings   # pydantic only: vLLM itself is not imported

# Ranges used when neither the user nor the method registry bounds a parameter. A range is what
# CMA-ES explores, so it has to be finite; these are the ranges practitioners actually use.
DEFAULT_RANGES: dict[str, tuple[float, float]] = {
    "weight": (0.0, 1.0),
    "density": (0.0, 1.0),
    "t": (0.0, 1.0),
    "lambda": (0.0, 2.0),
    "epsilon": (0.0, 0.2),
    "gamma": (0.0, 0.2),
    "select_topk": (0.0, 1.0),
}
# What evolves when `genome.parameters` is not given: the knobs that define a merge recipe. Others
# (lambda, epsilon, scale, ...) evolve only when listed: they mostly rescale the same search.
DEFAULT_PER_MODEL = ("weight", "density")
DEFAULT_SHARED = ("t", "select_topk")

# Read as the reference tool (mergekit-evolve 0.1.5) reads a genome:
# every candidate is merged and evaluated in bfloat16 unless genome.dtype says otherwise,
DEFAULT_DTYPE = "bfloat16"
# and `normalize`, when the genome leaves it out, is on for these methods and off for this one.
REFERENCE_NORMALIZE = {"linear": True, "ties": True, "dare_ties": True, "task_arithmetic": False}


# ---------------------------------------------------------------------------------------------
# The genome file
# ---------------------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TaskSpec(_Strict):
    name: str
    weight: float = 1.0
    metric: str = "acc,none"
    # the objective's direction (evolve.pareto); None = maximize (kept out of old runs' identity)
    goal: Optional[Literal["maximize", "minimize"]] = None

    @model_validator(mode="before")
    @classmethod
    def _bare_name(cls, v):
        return {"name": v} if isinstance(v, str) else v    # `tasks: [arith, other]`

    @field_validator("name", "metric")
    @classmethod
    def _nonempty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v.strip()


class GenomeSpec(_Strict):
    models: list[str] = Field(min_length=1)
    merge_method: str
    base_model: Optional[str] = None
    layer_granularity: int = Field(0, ge=0)
    filters: list[str] = Field(default_factory=list)
    normalize: Optional[bool] = None
    allow_negative_weights: bool = False
    smooth: bool = False
    # a list of names, or {name: [low, high]} (null keeps the default range)
    parameters: Optional[Union[list[str], dict[str, Optional[list[float]]]]] = None
    fixed_parameters: Optional[dict[str, Any]] = None   # method parameters held constant
    layer_stacking: Optional[Any] = None
    tokenizer_source: Optional[str] = None
    chat_template: Optional[str] = None
    dtype: Optional[str] = None

    @field_validator("models", mode="before")
    @classmethod
    def _models(cls, v):
        if isinstance(v, list):
            # mergekit also accepts [{model: path}] entries
            v = [m["model"] if isinstance(m, dict) and "model" in m else m for m in v]
            if any(not isinstance(m, str) or not m.strip() for m in v):
                raise ValueError("each entry must be a model path or hub id")
            v = [m.strip() for m in v]
            dup = sorted({m for m in v if v.count(m) > 1})
            if dup:
                raise ValueError(f"'{dup[0]}' is listed twice; list each model once")
        return v

    @field_validator("merge_method")
    @classmethod
    def _method(cls, v: str) -> str:
        return v.strip().lower()

    @field_validator("filters")
    @classmethod
    def _filters(cls, v: list[str]) -> list[str]:
        if any(not f.strip() for f in v):
            raise ValueError("a filter is a non-empty tensor-name substring such as self_attn")
        if len(set(v)) != len(v):
            raise ValueError("each filter may appear once")
        return v

    @field_validator("parameters")
    @classmethod
    def _params(cls, v):
        if isinstance(v, dict):
            for name, rng in v.items():
                if rng is None:
                    continue
                if len(rng) != 2 or not rng[0] < rng[1]:
                    raise ValueError(f"'{name}': a range is [low, high] with low < high, got {rng}")
        return v


class EvolveConfig(_Strict):
    genome: GenomeSpec
    tasks: list[TaskSpec] = Field(min_length=1)
    limit: Optional[Union[int, float]] = Field(None, gt=0)   # items per task (float < 1: fraction)
    num_fewshot: Optional[int] = Field(None, ge=0)
    shuffle: bool = False          # evaluate a fixed random subset of `limit` items, not the first
    random_init: bool = False      # start CMA-ES from a random point instead of an even mix
    # None: as the reference (on), when the evaluated tokenizer has a chat template (evolve.run)
    apply_chat_template: Optional[bool] = None
    fewshot_as_multiturn: Optional[bool] = None
    # `--backend vllm` engine settings. Not part of the run's identity (evolve.cli leaves them out
    # of it): like --batch-size or --backend, they may change on --resume (after an OOM, say).
    vllm: Optional[VllmSettings] = None

    @model_validator(mode="after")
    def _unique_tasks(self):
        names = [t.name for t in self.tasks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"tasks: '{dup[0]}' is listed twice; list each task once")
        return self


def _one_line(e: ValidationError, prefix: str = "") -> ConfigError:
    err = e.errors()[0]
    field = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in err["loc"])
    field = (prefix + field).replace(".[", "[") or "genome file"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key; check its spelling against docs/evolve.md"
    elif err["type"] == "missing":
        msg = "required but missing"
    return ConfigError(field, msg)


def parse_evolve_config(data: Any) -> EvolveConfig:
    if not isinstance(data, dict) or "genome" not in data:
        raise ConfigError("genome file", "expected a mapping with 'genome:' and 'tasks:' sections "
                                         "(see docs/evolve.md)")
    try:
        return EvolveConfig.model_validate(data)
    except ValidationError as e:
        raise _one_line(e) from None


def load_evolve_config(path: str | Path) -> EvolveConfig:
    from merge.config import read_yaml

    return parse_evolve_config(read_yaml(path, field="GENOME"))


# ---------------------------------------------------------------------------------------------
# The search space
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Gene:
    param: str
    block: int
    filter: Optional[str]     # None: the catch-all group (or no filters at all)
    model: Optional[str]      # None: one value shared by all models (a per-tensor parameter)


@dataclass(frozen=True)
class EvolvedParam:
    name: str
    per_model: bool
    low: float
    high: float


class GenomeSpace(BoxSpace):
    """The vector space CMA-ES searches, and its decoder to (and encoder from) merge configs."""

    def __init__(self, spec: GenomeSpec, method, num_layers: int):
        self.spec = spec
        self.method = method
        self.num_layers = num_layers
        self.notes: list[str] = []   # things the user should know (printed at start)
        base = spec.base_model
        self.pick_two = picks_two(spec, method)
        # The weighted inputs: with a base that the method uses, the base carries no genes.
        self.inputs = (list(spec.models) if self.pick_two else
                       [m for m in spec.models if not (method.takes_base and base and m == base)])
        g = spec.layer_granularity
        self.num_blocks = num_layers // g if g else 1
        self.blocks = ([(b * g, (b + 1) * g) for b in range(self.num_blocks)] if g
                       else [(0, num_layers)])
        self.groups: list[Optional[str]] = [*spec.filters, None] if spec.filters else [None]
        self.use_slices = (bool(g) and not spec.smooth) or self.pick_two
        self.params = self._evolved_params()
        self.genes = [Gene(p.name, b, f, m)
                      for b in range(self.num_blocks)
                      for f in self.groups
                      for p in self.params
                      for m in (self.inputs if p.per_model else [None])]
        self._index = {gene: i for i, gene in enumerate(self.genes)}
        ranges = {p.name: (p.low, p.high) for p in self.params}
        self.lower = [ranges[gene.param][0] for gene in self.genes]
        self.upper = [ranges[gene.param][1] for gene in self.genes]
        self.static = self._static_parameters()

    # --- construction and checks --------------------------------------------------------------
    @classmethod
    def build(cls, spec: GenomeSpec, get_method: Optional[Callable] = None,
              layer_count: Optional[Callable[[str], int]] = None) -> "GenomeSpace":
        """Check the genome against the engine (method, models, layer counts); build the space."""
        if spec.layer_stacking is not None:   # data-flow search: a space of its own
            from evolve.dataflow import DataflowSpace

            return DataflowSpace.build(spec, layer_count)
        if get_method is None:
            from merge.methods import get_method
        if layer_count is None:
            from merge.engine import model_layer_count as layer_count
        try:
            method = get_method(spec.merge_method)
        except ConfigError as e:
            raise ConfigError("genome.merge_method", str(e).split(": ", 1)[-1]) from None
        base = spec.base_model
        if picks_two(spec, method):
            _check_pick_two(spec)
        else:
            if method.needs_base and not spec.base_model:
                raise ConfigError("genome.base_model", f"{method.name} needs a base model; add "
                                                       f"base_model: <path>")
            inputs = [m for m in spec.models if not (method.takes_base and base and m == base)]
            method.check_model_count(len(inputs), "genome.models")
        refs = list(dict.fromkeys(([base] if base else []) + spec.models))
        counts = {ref: layer_count(ref) for ref in refs}
        if len(set(counts.values())) > 1:
            desc = ", ".join(f"{r}: {n}" for r, n in counts.items())
            raise ConfigError("genome.models",
                              f"the models have different layer counts ({desc}); evolution merges "
                              f"layer by layer, so every model and the base need the same count")
        n = next(iter(counts.values()))
        g = spec.layer_granularity
        if g and (n % g or g > n):
            divisors = [d for d in range(1, n + 1) if n % d == 0]
            raise ConfigError("genome.layer_granularity",
                              f"{g} does not divide the {n} layers of the models; use 0 (one gene "
                              f"set for the whole model) or one of {divisors}")
        return cls(spec, method, n)

    def _evolved_params(self) -> list[EvolvedParam]:
        spec, method = self.spec, self.method
        if self.pick_two:       # one weight per model and block; the two highest are slerped
            low = -1.0 if spec.allow_negative_weights else 0.0
            self.notes.append(f"slerp over {len(self.inputs)} models, as the reference tool: per "
                              f"block the two models with the highest weights are interpolated "
                              f"at t = softmax of their weights (decoded as nuslerp)")
            return [EvolvedParam("weight", True, low, 1.0)]
        known = method.params
        if spec.parameters is None:
            names = [p for p, s in known.items() if not s.inert    # evolving those does nothing
                     and p in (DEFAULT_PER_MODEL if s.per_model else DEFAULT_SHARED)]
            if not names:
                raise ConfigError(
                    "genome.merge_method",
                    f"{method.name} has no parameter that evolution tunes by default "
                    f"(it takes: {', '.join(known) or 'none'}); choose a method with per-model "
                    f"weights (linear, task_arithmetic, ties, ...) or list the parameters to "
                    f"evolve under genome.parameters")
            user_ranges: dict = {}
        else:
            names = list(spec.parameters)
            user_ranges = spec.parameters if isinstance(spec.parameters, dict) else {}
            if not names:
                raise ConfigError("genome.parameters", "the list is empty; name at least one "
                                                       f"parameter of {method.name}")
        out = []
        for name in names:
            field = f"genome.parameters.{name}"
            p = known.get(name)
            if p is None:
                raise ConfigError(field, f"{method.name} has no parameter '{name}'; it takes "
                                         f"{', '.join(known) or 'none'}")
            if getattr(p, "kind", float) is not float:
                raise ConfigError(field, f"'{name}' is a {p.kind.__name__} switch, not a number; "
                                         f"set it under genome.fixed_parameters instead")
            low, high = self._range(name, p, user_ranges.get(name), field)
            out.append(EvolvedParam(name, bool(p.per_model), low, high))
        return self._couple_density_epsilon(out)

    def _couple_density_epsilon(self, params: list[EvolvedParam]) -> list[EvolvedParam]:
        """DELLA keeps entries with probabilities density ± epsilon, which must stay inside (0, 1).
        Rather than let CMA-ES waste evaluations on invalid pairs, shrink the density range by the
        largest epsilon the search can produce."""
        names = {p.name: p for p in params}
        if "density" not in names or "epsilon" not in self.method.params:
            return params
        if "epsilon" in names:
            eps = names["epsilon"].high
        else:
            fixed = (self.spec.fixed_parameters or {}).get("epsilon")
            eps = float(fixed if fixed is not None else self.method.params["epsilon"].default)
        d = names["density"]
        low, high = max(d.low, eps + 1e-3), min(d.high, 1.0 - eps - 1e-3)
        if low >= high:
            raise ConfigError("genome.parameters.density",
                              f"{self.method.name} needs density ± epsilon inside (0, 1), which "
                              f"leaves no density range with epsilon up to {eps:g}; lower epsilon")
        if (low, high) != (d.low, d.high):
            self.notes.append(f"density range narrowed to [{low:g}, {high:g}] so that density ± "
                              f"epsilon ({eps:g}) stays inside (0, 1)")
        return [EvolvedParam(p.name, p.per_model, low, high) if p.name == "density" else p
                for p in params]

    def _range(self, name: str, p, user: Optional[list[float]], field: str) -> tuple[float, float]:
        if user is not None:
            low, high = float(user[0]), float(user[1])
        elif name == "weight" and self.spec.allow_negative_weights:
            low, high = -1.0, 1.0
        elif _finite(p.min) and _finite(p.max):
            low, high = float(p.min), float(p.max)
        elif name in DEFAULT_RANGES:
            low, high = DEFAULT_RANGES[name]
            if name == "weight" and self.spec.allow_negative_weights:
                low = -high
        else:
            raise ConfigError(field, f"no default search range for '{name}'; give one, e.g. "
                                     f"parameters: {{{name}: [0.0, 1.0]}}")
        if (_finite(p.min) and low < p.min) or (_finite(p.max) and high > p.max):
            raise ConfigError(field, f"range [{low}, {high}] leaves the valid range of '{name}' "
                                     f"[{p.min}, {p.max}]")
        if name == "weight" and low < 0 and not self.spec.allow_negative_weights:
            raise ConfigError(field, "a negative weight range needs allow_negative_weights: true")
        return low, high

    def _static_parameters(self) -> dict[str, Any]:
        """Top-level parameters that do not evolve: normalize, fixed_parameters, fillers."""
        spec, method = self.spec, self.method
        evolved = {p.name for p in self.params}
        static: dict[str, Any] = {}
        if self.pick_two:
            if spec.fixed_parameters or spec.parameters is not None or spec.normalize is not None:
                self.notes.append("genome.parameters, fixed_parameters and normalize are not used "
                                  "by slerp over several models")
            return static
        if spec.normalize is None and "normalize" in method.params \
                and method.name in REFERENCE_NORMALIZE:
            static["normalize"] = REFERENCE_NORMALIZE[method.name]
        elif spec.normalize is not None:
            if "normalize" in method.params:
                static["normalize"] = spec.normalize
            else:
                self.notes.append(f"genome.normalize is ignored: {method.name} does not normalize")
        for name, value in (spec.fixed_parameters or {}).items():
            field = f"genome.fixed_parameters.{name}"
            if name not in method.params:
                raise ConfigError(field, f"{method.name} has no parameter '{name}'; it takes "
                                         f"{', '.join(method.params) or 'none'}")
            if name in evolved:
                raise ConfigError(field, f"'{name}' is also evolved; remove it from one of "
                                         f"genome.parameters and genome.fixed_parameters")
            static[name] = value
        for name, p in method.params.items():
            if name in evolved or name in static or not getattr(p, "required", False):
                continue
            if name == "weight":
                static[name] = 1.0       # equal weights: the neutral choice
            elif name in DEFAULT_RANGES:
                low, high = DEFAULT_RANGES[name]
                static[name] = (low + high) / 2
            else:
                raise ConfigError("genome.parameters",
                                  f"{method.name} requires '{name}'; evolve it or set it under "
                                  f"genome.fixed_parameters")
            self.notes.append(f"'{name}' is not evolved; it is fixed at {static[name]}")
        return static

    # --- the vector ----------------------------------------------------------------------------
    def initial_vector(self, random: bool = False, seed: int = 0) -> list[float]:
        """An even mix (weights 1/N, density and t at 0.5), or a uniform random point."""
        if random:
            return self.random_point(seed)
        x = []
        for gene, lo, hi in zip(self.genes, self.lower, self.upper):
            if gene.param == "weight":
                v = 1.0 / max(1, len(self.inputs))
            elif gene.param in ("density", "t"):
                v = 0.5
            else:
                default = getattr(self.method.params[gene.param], "default", None)
                v = default if isinstance(default, (int, float)) else (lo + hi) / 2
            # CMA-ES does poorly when it starts on a bound: keep x0 inside the inner 80 %.
            span = hi - lo
            x.append(float(min(max(v, lo + 0.1 * span), hi - 0.1 * span)))
        return x

    # --- decoding ------------------------------------------------------------------------------
    def decode(self, x) -> dict[str, Any]:
        """The merge config for gene vector `x` (values are clipped into their ranges)."""
        if len(x) != self.dim:
            raise ValueError(f"expected {self.dim} genes, got {len(x)}")
        x = self.clip(x)
        spec = self.spec
        if self.pick_two:
            cfg: dict[str, Any] = {"merge_method": "nuslerp", "slices": [
                self._pick_two_slice(x, b) for b in range(self.num_blocks)]}
        else:
            cfg = {"merge_method": self.method.name}
            if spec.base_model:
                cfg["base_model"] = spec.base_model
            if self.use_slices:
                cfg["slices"] = [self._slice(x, b) for b in range(self.num_blocks)]
            else:
                cfg["models"] = []
                for m in spec.models:
                    entry: dict[str, Any] = {"model": m}
                    params = self._params_for(x, m, blocks=list(range(self.num_blocks)))
                    if params:
                        entry["parameters"] = params
                    cfg["models"].append(entry)
        top = dict(self.static)
        if not self.use_slices and not self.pick_two:
            top.update(self._params_for(x, None, blocks=list(range(self.num_blocks))))
        if top:
            cfg["parameters"] = top
        cfg["dtype"] = spec.dtype or DEFAULT_DTYPE
        if spec.tokenizer_source:
            cfg["tokenizer_source"] = spec.tokenizer_source
        if spec.chat_template:
            cfg["chat_template"] = spec.chat_template
        return cfg

    def _pick_two_slice(self, x, b: int) -> dict[str, Any]:
        """The reference's slerp over N models: the two models with the highest weights in this
        block (the lower index first on ties), at t = softmax(w₁, w₂)[1] from the first."""
        import math

        a, e = self.blocks[b]
        w = [x[self._index[Gene("weight", b, None, m)]] for m in self.inputs]
        first, second = sorted(range(len(w)), key=lambda i: (-w[i], i))[:2]
        t = 1.0 / (1.0 + math.exp(w[first] - w[second]))
        return {"sources": [{"model": self.inputs[first], "layer_range": [a, e],
                             "parameters": {"weight": 1.0 - t}},
                            {"model": self.inputs[second], "layer_range": [a, e],
                             "parameters": {"weight": t}}]}

    def _slice(self, x, b: int) -> dict[str, Any]:
        a, e = self.blocks[b]
        sources = []
        base = self.spec.base_model
        if self.method.takes_base and base:
            sources.append({"model": base, "layer_range": [a, e]})
        for m in self.inputs:
            src: dict[str, Any] = {"model": m, "layer_range": [a, e]}
            params = self._params_for(x, m, blocks=[b])
            if params:
                src["parameters"] = params
            sources.append(src)
        out: dict[str, Any] = {"sources": sources}
        shared = self._params_for(x, None, blocks=[b])
        if shared:
            out["parameters"] = shared
        return out

    def _params_for(self, x, model: Optional[str], blocks: list[int]) -> dict[str, Any]:
        """Parameter values of `model` (None: the shared ones) over `blocks`.

        One block gives a scalar; several (smooth mode) a gradient of anchors. With filters, the
        value is a conditional list: one entry per filter, then the catch-all.
        """
        if model is not None and model not in self.inputs:
            return {}
        out: dict[str, Any] = {}
        for p in self.params:
            if p.per_model != (model is not None):
                continue
            per_group = {}
            for f in self.groups:
                anchors = [x[self._index[Gene(p.name, b, f, model)]] for b in blocks]
                per_group[f] = anchors[0] if len(anchors) == 1 else anchors
            if self.groups == [None]:
                out[p.name] = per_group[None]
            else:
                out[p.name] = ([{"filter": f, "value": per_group[f]} for f in self.spec.filters]
                               + [{"value": per_group[None]}])
        return out

    # --- encoding (the inverse of decode, for round trips and seeding from a config) ------------
    def encode(self, config: dict[str, Any]) -> list[float]:
        """The gene vector of a config in this genome's shape (as decode writes it)."""
        if self.pick_two:
            raise ValueError("slerp over several models keeps only the two highest weights per "
                             "block; its genes cannot be read back from a config")
        x = []
        for gene in self.genes:
            if self.use_slices:
                sl = config["slices"][gene.block]
                if gene.model is None:
                    value = sl["parameters"][gene.param]
                else:
                    src = next(s for s in sl["sources"] if s["model"] == gene.model)
                    value = src["parameters"][gene.param]
            else:
                if gene.model is None:
                    value = config["parameters"][gene.param]
                else:
                    entry = next(m for m in config["models"] if m["model"] == gene.model)
                    value = entry["parameters"][gene.param]
            if isinstance(value, list) and value and isinstance(value[0], dict):
                value = next(e["value"] for e in value if e.get("filter") == gene.filter)
            if isinstance(value, list):
                value = value[0 if self.use_slices else gene.block]
            x.append(float(value))
        return x

    # --- views -----------------------------------------------------------------------------------
    def block_label(self, b: int) -> str:
        a, e = self.blocks[b]
        if self.spec.smooth and self.num_blocks > 1:
            return f"anchor {b} (layer {round(b * (self.num_layers - 1) / (self.num_blocks - 1))})"
        return f"layers {a}-{e - 1}"

    def grids(self, x) -> list[tuple[str, list[str], list[str], list[list[float]]]]:
        """(title, row labels, column labels, values): one block × model table per parameter and
        filter group, for the report's heatmap."""
        out = []
        for p in self.params:
            cols = self.inputs if p.per_model else ["(all models)"]
            for f in self.groups:
                title = (p.name if self.groups == [None]
                         else f"{p.name} [{f or 'rest'}]")
                rows = [self.block_label(b) for b in range(self.num_blocks)]
                values = [[x[self._index[Gene(p.name, b, f, m if p.per_model else None)]]
                           for m in cols] for b in range(self.num_blocks)]
                out.append((title, rows, [short_name(c) for c in cols], values))
        return out

    def describe(self, x=None) -> str:
        spec = self.spec
        x = self.initial_vector() if x is None else x
        lines = [f"search space: {self.dim} genes = {self.num_blocks} block(s) × "
                 f"{len(self.groups)} filter group(s) × "
                 + " + ".join(f"{p.name}({len(self.inputs) if p.per_model else 1})"
                              for p in self.params),
                 f"  method {self.method.name}, {self.num_layers} layers, "
                 f"{'smooth gradients' if spec.smooth else 'piecewise blocks'}"
                 + (f", filters {spec.filters} + rest" if spec.filters else "")]
        for p in self.params:
            first = next(i for i, g in enumerate(self.genes) if g.param == p.name)
            lines.append(f"  {p.name:<12} {'per model' if p.per_model else 'shared':<10} "
                         f"range [{p.low:g}, {p.high:g}]  start {x[first]:.4g}")
        for name, value in self.static.items():
            lines.append(f"  {name:<12} fixed      {value}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def picks_two(spec: GenomeSpec, method) -> bool:
    """slerp as the reference tool evolves it: a weight per model; per block the two highest
    are interpolated. Our own slerp genome (a `t` gene) is a base_model plus exactly one model,
    which the reference cannot run, so the two never overlap."""
    if method.name != "slerp":
        return False
    others = [m for m in spec.models if m != spec.base_model]
    return not (spec.base_model and len(others) == 1 and spec.base_model not in spec.models)


def _check_pick_two(spec: GenomeSpec) -> None:
    if len(spec.models) < 2:
        raise ConfigError("genome.models", "slerp interpolates two models; list at least two "
                                           "(or a base_model and one model)")
    if spec.base_model and spec.base_model not in spec.models:
        raise ConfigError("genome.base_model", "slerp over several models picks both endpoints "
                                               "of each block from genome.models; remove "
                                               "base_model or list it among the models (the "
                                               "reference tool cannot run this genome either)")
    if spec.smooth:
        raise ConfigError("genome.smooth", "slerp over several models has no smooth form (nor "
                                           "in the reference tool); use smooth: false")
    if spec.filters:
        raise ConfigError("genome.filters", "slerp over several models takes no filters (nor "
                                            "in the reference tool); remove them")


def _finite(v) -> bool:
    return v is not None and abs(float(v)) != float("inf")


def short_name(ref: str) -> str:
    """A model reference as a short label (last path component)."""
    return ref.rstrip("/").split("/")[-1] or ref
