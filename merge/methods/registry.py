"""The method registry: a merge method is one kernel function plus its parameter declarations.

A kernel is a pure function `kernel(inputs: MergeInputs) -> Tensor`: no I/O, device-agnostic, fp32.
The planner validates every declared parameter (name, presence, range) and the model count before
any tensor is loaded, so kernels can trust what they receive.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from merge.errors import ConfigError

REQUIRED = object()


@dataclass(frozen=True)
class Param:
    name: str
    default: Any = REQUIRED
    per_model: bool = False     # a value per input model (weight, density) vs one per tensor (t)
    min: float | None = None
    max: float | None = None
    kind: type = float          # float or bool
    doc: str = ""
    inert: bool = False         # accepted for compatibility with the reference; has no effect

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


@dataclass
class MergeInputs:
    """Everything a kernel sees for one output tensor."""

    name: str                           # output tensor name
    tensors: list                       # tensors of the non-base inputs, in config order, in the
                                        # compute dtype; kernels upcast to fp32 as they go
    base: Any = None                    # base tensor, or None
    model_params: list[dict[str, Any]] = field(default_factory=list)  # per input, per-model params
    params: dict[str, Any] = field(default_factory=dict)              # per-tensor params
    seed: int | None = None             # --random-seed, mixed with the name for per-tensor masks
    out_dtype: Any = None               # dtype the result is stored in (kernels may write it directly)
    out: Any = None                     # optional destination (a live model's parameter): kernels
                                        # that make a fresh output write into it instead
    orders: Any = None                  # optional i -> MagnitudeOrder of |τᵢ| (or None): exact
                                        # magnitude thresholds without a pass (in-memory merges)

    def magnitude_order(self, i: int):
        """The cached order of |τᵢ| = |tensors[i] − base|, when the caller keeps one."""
        if self.orders is None or self.base is None:
            return None
        return self.orders(i)

    def output(self, like):
        """Where a kernel writes its result: `out` when it fits, else a new tensor like `like`.

        `out` lets an in-memory merge write straight into the evaluation model's parameters,
        sparing a multi-GB allocation and a copy per candidate. Kernels never read `out`, so its
        old contents cannot leak into the result.
        """
        from merge.methods.chunks import output_like

        return output_like(like, self.out_dtype, self.out)

    def per_model(self, key: str) -> list[Any]:
        return [p[key] for p in self.model_params]

    def generator(self, salt: str = ""):
        """A torch.Generator that depends only on the seed and this tensor's name.

        Processing order and thread count never change a random mask; the same seed gives
        bit-identical merges on disk and in memory.
        """
        import torch

        digest = hashlib.sha256(f"{self.seed}|{self.name}|{salt}".encode()).digest()
        g = torch.Generator(device=self.tensors[0].device if self.tensors else "cpu")
        g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
        return g


@dataclass(frozen=True)
class Method:
    name: str
    kernel: Callable[[MergeInputs], Any]
    params: dict[str, Param]
    needs_base: bool = False     # the base is required and is not one of the weighted inputs
    uses_base: bool = False      # a base is optional; when given it is used (not weighted)
    min_models: int = 1          # non-base inputs
    max_models: int | None = None
    paper: str = ""
    summary: str = ""
    # Cross-parameter checks run by the planner for every tensor, before loading anything:
    # check(model_params, params) returns an error message (naming the parameter) or None.
    check: Optional[Callable[[list[dict[str, Any]], dict[str, Any]], Optional[str]]] = None

    @property
    def takes_base(self) -> bool:
        return self.needs_base or self.uses_base

    def check_model_count(self, n: int, field: str) -> None:
        if n < self.min_models or (self.max_models is not None and n > self.max_models):
            if self.max_models == self.min_models:
                want = f"exactly {self.min_models}"
            elif self.max_models is None:
                want = f"at least {self.min_models}"
            else:
                want = f"{self.min_models} to {self.max_models}"
            base = " besides the base model" if self.takes_base else ""
            raise ConfigError(field, f"{self.name} takes {want} model(s){base}, got {n}")


METHODS: dict[str, Method] = {}


def register(name: str, params: list[Param] = (), **kwargs) -> Callable:
    def wrap(kernel):
        METHODS[name] = Method(name, kernel, {p.name: p for p in params}, **kwargs)
        return kernel

    return wrap


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ConfigError("merge_method", f"unknown method '{name}'; choose one of "
                                          f"{', '.join(sorted(METHODS))}")
    return METHODS[name]
