"""The data-flow search space (arXiv 2403.13187 §3.2): which layers, of which models, in what order.

All layers of the candidate models are laid out in order (model 0's layers, then model 1's, ...:
M layers in all) and the sequence is repeated r times, giving T = M·r slots. A candidate is

  * one inclusion gene per slot: slot t (layer t mod M) is on the path when its gene is > 0;
  * scales on the hops of the path: with `scales: pairs` (the paper's W ∈ R^{M×M}) the hidden state
    entering layer j from layer i is multiplied by W[i, j]; with `scales: models` there is one
    scale per ordered pair of models, applied on every hop that is not a layer's natural successor
    (same model, next layer), which gets 1; `scales: none` evolves the path alone.

The phenotype is a plain merge config: a passthrough frankenmerge whose slices are the path, with
each hop scale folded into the weights of the layers after it (evolve.fold). So the best candidate
is an ordinary checkpoint that stock transformers, vLLM and the reference toolkit load and build.

`DataflowSpace` has the interface of evolve.genome.GenomeSpace (dim, lower, upper, initial_vector,
clip, decode, encode, grids, describe, notes), so the search, the report and the tracker treat it
alike. It does not import evolve.genome: the genome module hands it the parsed spec.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from merge.errors import ConfigError, EvomergeError

from evolve import fold as fold_lib
from evolve.space import BoxSpace

FIELD = "genome.layer_stacking"


class LayerStacking(BaseModel):
    """The `genome.layer_stacking:` section (`true` means every default)."""

    model_config = ConfigDict(extra="forbid")

    repeats: int = Field(3, ge=1)            # r: how often the M layers are laid out
    min_layers: int = Field(1, ge=1)         # depth bounds of every decoded path
    max_layers: Optional[int] = Field(None, ge=1)
    scales: Literal["pairs", "models", "none"] = "pairs"
    scale_range: list[float] = Field(default_factory=lambda: [0.5, 2.0])
    # the starting path: the first model's layers, once (the paper's runs start from a model)
    start: Literal["first_model", "all_off"] = "first_model"

    @model_validator(mode="after")
    def _check(self):
        lo_hi = self.scale_range
        if len(lo_hi) != 2 or not 0 < lo_hi[0] < lo_hi[1]:
            raise ValueError(f"scale_range: [low, high] with 0 < low < high (a hop scale must "
                             f"be positive: norms see only its size), got {lo_hi}")
        if self.max_layers is not None and self.max_layers < self.min_layers:
            raise ValueError(f"max_layers ({self.max_layers}) is below min_layers "
                             f"({self.min_layers})")
        return self


def parse_layer_stacking(value: Any) -> LayerStacking:
    if value is True:
        value = {}
    if not isinstance(value, dict):
        raise ConfigError(FIELD, "expected a mapping (repeats, min_layers, max_layers, scales, "
                                 "scale_range, start) or true for the defaults")
    try:
        return LayerStacking.model_validate(value)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key; check its spelling against docs/evolve.md"
        raise ConfigError(f"{FIELD}.{loc}" if loc else FIELD, msg) from None


@dataclass(frozen=True)
class Gene:
    """Same fields as evolve.genome.Gene, for the tracker's column names."""

    param: str            # "include" | "scale"
    block: int            # the gene's own index (block_label names it)
    filter: Optional[str] = None
    model: Optional[str] = None


@dataclass(frozen=True)
class GeneRange:
    name: str
    per_model: bool
    low: float
    high: float


@dataclass(frozen=True)
class Layer:
    model: str       # reference as the user wrote it
    index: int       # 0..M-1 over all models
    layer: int       # inside its model


@dataclass(frozen=True)
class Hop:
    """One layer of a decoded path and the hop scale on the hidden state entering it."""

    layer: Layer
    scale: float


class DataflowSpace(BoxSpace):
    """Inclusion genes (one per slot) then scale genes; decoded to a passthrough merge config."""

    def __init__(self, spec, stacking: LayerStacking, layer_counts: dict[str, int],
                 folds: dict[str, Optional[fold_lib.Fold]]):
        self.spec = spec
        self.stacking = stacking
        self.models = list(spec.models)
        self.inputs = self.models           # what the tracker labels models by
        self.layers = []
        for m in self.models:
            self.layers += [Layer(m, len(self.layers) + i, i) for i in range(layer_counts[m])]
        self.M = len(self.layers)
        self.T = self.M * stacking.repeats
        self.folds = folds
        self.notes: list[str] = []
        self.max_layers = min(stacking.max_layers or self.T, self.T)
        self.min_layers = min(stacking.min_layers, self.max_layers)
        if stacking.max_layers and stacking.max_layers > self.T:
            self.notes.append(f"max_layers {stacking.max_layers} exceeds the {self.T} slots; "
                              f"the bound is {self.T}")
        lo, hi = stacking.scale_range
        k = len(self.models)
        self.n_scales = {"pairs": self.M * self.M, "models": k * k, "none": 0}[stacking.scales]
        self.params = [GeneRange("include", False, -1.0, 1.0)]
        if self.n_scales:
            self.params.append(GeneRange("scale", False, float(lo), float(hi)))
        self.genes = ([Gene("include", t) for t in range(self.T)]
                      + [Gene("scale", self.T + s) for s in range(self.n_scales)])
        self.lower = [-1.0] * self.T + [float(lo)] * self.n_scales
        self.upper = [1.0] * self.T + [float(hi)] * self.n_scales
        self.num_blocks = len(self.genes)    # tracker: every gene gets its own label
        self.groups: list[Optional[str]] = [None]

    # --- construction and checks --------------------------------------------------------------
    @classmethod
    def build(cls, spec, layer_count: Optional[Callable[[str], int]] = None,
              open_model: Optional[Callable] = None) -> "DataflowSpace":
        """Check the genome for a data-flow search (models, layouts, what folds where)."""
        stacking = parse_layer_stacking(spec.layer_stacking)
        if spec.merge_method != "passthrough":
            raise ConfigError("genome.merge_method", f"a data-flow search (layer_stacking) "
                                                     f"decodes to a passthrough frankenmerge; set "
                                                     f"merge_method: passthrough (got "
                                                     f"{spec.merge_method})")
        for key, default in (("base_model", None), ("layer_granularity", 0), ("filters", []),
                             ("smooth", False), ("parameters", None), ("fixed_parameters", None),
                             ("normalize", None)):
            if getattr(spec, key) != default:
                raise ConfigError(f"genome.{key}", "does not apply to a data-flow search (its "
                                                   "genes are the layer path and the hop scales); "
                                                   "remove it")
        if open_model is None:
            from merge.sources import ModelSource

            open_model = ModelSource.open
        from merge import architecture

        counts, folds, types, dtypes = {}, {}, {}, {}
        for i, ref in enumerate(spec.models):
            src = open_model(ref, f"genome.models[{i}]")
            arch = architecture.infer(src.config, list(src.tensors), f"genome.models[{i}]")
            counts[ref] = layer_count(ref) if layer_count else arch.num_layers
            types[ref] = arch.model_type
            dtypes[ref] = "/".join(sorted({getattr(t, "dtype", "?") for t in src.tensors.values()}))
            if stacking.scales == "none":
                folds[ref] = None
                continue
            try:
                folds[ref] = fold_lib.fold_for(arch.model_type, list(arch.layers[0]),
                                               f"genome.models[{i}]")
            except EvomergeError as e:
                raise ConfigError(f"{FIELD}.scales", str(e).split("; set")[0]
                                  + "; set scales: none") from None
            if not folds[ref].multiplicative:
                raise ConfigError(f"{FIELD}.scales",
                                  f"'{ref}' is {folds[ref].family}: its residual branches end in "
                                  f"a norm computing (1 + weight), so a folded hop scale is "
                                  f"(1 + w)/S - 1, which a passthrough `scale` cannot write; set "
                                  f"scales: none (the path alone evolves)")
        if len(set(types.values())) > 1:
            desc = ", ".join(f"{r}={t}" for r, t in types.items())
            raise ConfigError("genome.models", f"a layer path mixes architectures ({desc}); "
                                               f"use models of one family")
        space = cls(spec, stacking, counts, folds)
        if len(set(dtypes.values())) > 1 and not spec.dtype:
            desc = ", ".join(f"{short_name(r)} {d}" for r, d in dtypes.items())
            space.notes.append(f"the models are stored in different dtypes ({desc}): a candidate "
                               f"mixes them, and its scaled layers are rounded twice in memory; "
                               f"set genome.dtype for candidates that equal their checkpoint bit "
                               f"for bit")
        return space

    # --- the vector ----------------------------------------------------------------------------
    def initial_vector(self, random: bool = False, seed: int = 0) -> list[float]:
        """The first model's layers once (scales 1), or a uniform random point."""
        if random:
            return self.random_point(seed)
        first = self.models[0]
        on = self.stacking.start == "first_model"
        x = [0.5 if on and t < self.M and self.layers[t].model == first else -0.5
             for t in range(self.T)]
        lo, hi = self.stacking.scale_range
        span = hi - lo
        x += [float(min(max(1.0, lo + 0.1 * span), hi - 0.1 * span))] * self.n_scales
        return x

    # --- decoding ------------------------------------------------------------------------------
    def slots(self, x) -> list[int]:
        """The slots on the path, in order, with the depth bounds enforced: too few, the
        strongest excluded slots join; too many, the weakest included ones leave."""
        inc = x[: self.T]
        on = [t for t in range(self.T) if inc[t] > 0]
        if len(on) < self.min_layers:
            off = sorted((t for t in range(self.T) if inc[t] <= 0), key=lambda t: (-inc[t], t))
            on = sorted(on + off[: self.min_layers - len(on)])
        elif len(on) > self.max_layers:
            keep = sorted(on, key=lambda t: (-inc[t], t))[: self.max_layers]
            on = sorted(keep)
        return on

    def path(self, x) -> list[Hop]:
        """The decoded path: each layer with the scale on the hidden state entering it."""
        if len(x) != self.dim:
            raise ValueError(f"expected {self.dim} genes, got {len(x)}")
        x = self.clip(x)
        scales = x[self.T:]
        hops, prev = [], None
        for t in self.slots(x):
            layer = self.layers[t % self.M]
            w = 1.0 if prev is None else self._hop_scale(scales, prev, layer)
            hops.append(Hop(layer, w))
            prev = layer
        return hops

    def _hop_scale(self, scales, prev: Layer, nxt: Layer) -> float:
        mode = self.stacking.scales
        if mode == "none":
            return 1.0
        if mode == "pairs":
            return scales[prev.index * self.M + nxt.index]
        if prev.model == nxt.model and nxt.layer == prev.layer + 1:
            return 1.0      # the natural successor keeps the stream as its model made it
        k = len(self.models)
        return scales[self.models.index(prev.model) * k + self.models.index(nxt.model)]

    def decode(self, x) -> dict[str, Any]:
        return self.config_for(self.path(x))

    def config_for(self, hops: list[Hop]) -> dict[str, Any]:
        """The passthrough config of a path: runs of consecutive layers of one model under one
        cumulative scale share a slice; each slice folds 1/S into its residual-branch outputs."""
        cum = fold_lib.cumulative([h.scale for h in hops])
        slices: list[dict[str, Any]] = []
        run: Optional[list] = None     # [model, start, end, S]
        for hop, s in zip(hops, cum):
            l = hop.layer
            if run and run[0] == l.model and run[2] == l.layer and run[3] == s:
                run[2] += 1
                continue
            if run:
                slices.append(self._slice(*run))
            run = [l.model, l.layer, l.layer + 1, s]
        if run:
            slices.append(self._slice(*run))
        cfg: dict[str, Any] = {"merge_method": "passthrough", "slices": slices}
        spec = self.spec
        if spec.dtype:
            cfg["dtype"] = spec.dtype
        if spec.tokenizer_source:
            cfg["tokenizer_source"] = spec.tokenizer_source
        if spec.chat_template:
            cfg["chat_template"] = spec.chat_template
        return cfg

    def _slice(self, model: str, start: int, end: int, s: float) -> dict[str, Any]:
        src: dict[str, Any] = {"model": model, "layer_range": [start, end]}
        if s != 1.0:
            src["parameters"] = {"scale": self.folds[model].factor_filters(1.0 / s)}
        return {"sources": [src]}

    # --- encoding ------------------------------------------------------------------------------
    def encode(self, config: dict[str, Any]) -> list[float]:
        """A gene vector that decodes to `config` (a path config in this space's shape): each
        path layer takes the earliest free slot after the previous one; hop scales are recovered
        from the ratios of the folded cumulative scales."""
        path: list[tuple[Layer, float]] = []
        for i, sl in enumerate(config["slices"]):
            (src,) = sl["sources"]
            a, b = src["layer_range"]
            inv = 1.0
            for entry in (src.get("parameters") or {}).get("scale", []) or []:
                if isinstance(entry, dict) and entry.get("filter"):
                    inv = float(entry["value"])
            for j in range(a, b):
                layer = next(l for l in self.layers if l.model == src["model"] and l.layer == j)
                path.append((layer, 1.0 / inv))
        x = [-0.5] * self.T + [1.0] * self.n_scales
        t = -1
        for layer, _ in path:
            t = next((s for s in range(t + 1, self.T) if s % self.M == layer.index), None)
            if t is None:
                raise ConfigError("config", "this path does not fit the slots of the genome "
                                            f"({self.stacking.repeats} repeats of the layers)")
            x[t] = 0.5
        for k in range(1, len(path)):
            (pl, ps), (nl, ns) = path[k - 1], path[k]
            w = ns / ps
            if self.stacking.scales == "pairs":
                x[self.T + pl.index * self.M + nl.index] = w
            elif self.stacking.scales == "models" and not (
                    pl.model == nl.model and nl.layer == pl.layer + 1):
                m = self.models
                x[self.T + m.index(pl.model) * len(m) + m.index(nl.model)] = w
        return x

    # --- views -----------------------------------------------------------------------------------
    def _layer_label(self, layer: Layer) -> str:
        return f"{short_name(layer.model)}.{layer.layer}"

    def block_label(self, i: int) -> str:
        if i < self.T:
            return f"slot {i} ({self._layer_label(self.layers[i % self.M])}, repeat {i // self.M})"
        s = i - self.T
        if self.stacking.scales == "pairs":
            a, b = divmod(s, self.M)
            return f"{self._layer_label(self.layers[a])}→{self._layer_label(self.layers[b])}"
        a, b = divmod(s, len(self.models))
        return f"{short_name(self.models[a])}→{short_name(self.models[b])}"

    def grids(self, x) -> list[tuple[str, list[str], list[str], list[list[float]]]]:
        x = self.clip(x)
        cols = [self._layer_label(l) for l in self.layers]
        out = [("include (> 0: on the path)", [f"repeat {r}" for r in range(self.stacking.repeats)],
                cols, [x[r * self.M:(r + 1) * self.M] for r in range(self.stacking.repeats)])]
        scales = x[self.T:]
        if self.stacking.scales == "pairs":
            out.append(("scale (from row to column)", cols, cols,
                        [scales[i * self.M:(i + 1) * self.M] for i in range(self.M)]))
        elif self.stacking.scales == "models":
            names = [short_name(m) for m in self.models]
            k = len(names)
            out.append(("scale (from row to column model)", names, names,
                        [scales[i * k:(i + 1) * k] for i in range(k)]))
        return out

    def describe(self, x=None) -> str:
        st = self.stacking
        x = self.initial_vector() if x is None else x
        hops = self.path(x)
        lines = [f"search space: {self.dim} genes = {self.T} slot inclusions ({self.M} layers × "
                 f"{st.repeats} repeats) + {self.n_scales} hop scales ({st.scales})",
                 f"  data-flow (layer path) search, depth {self.min_layers}..{self.max_layers}, "
                 f"scales in [{st.scale_range[0]:g}, {st.scale_range[1]:g}]"]
        for m in self.models:
            lines.append(f"  {short_name(m)}: {fold_lib.describe(self.folds.get(m))}")
        lines.append("  start path: " + (" ".join(self._layer_label(h.layer) for h in hops)
                                         or "(empty)"))
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def path_of_config(config: dict) -> list[tuple[str, int]]:
    """(model, layer) for each output layer of a path config."""
    out = []
    for sl in config["slices"]:
        (src,) = sl["sources"]
        a, b = src["layer_range"]
        out += [(src["model"], j) for j in range(a, b)]
    return out


def is_path_config(config: dict) -> bool:
    """A passthrough frankenmerge over slices with one source each: what this space decodes to."""
    return (config.get("merge_method") == "passthrough" and "slices" in config
            and all(len(s.get("sources", [])) == 1 for s in config["slices"]))


def short_name(ref: str) -> str:
    return ref.rstrip("/").split("/")[-1] or ref
