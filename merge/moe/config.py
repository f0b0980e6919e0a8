"""The mergekit-moe config: a base model, expert models with prompts, and how to build the router."""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from merge.config import _one_line, canonical_dtype
from merge.errors import ConfigError

GATE_MODES = ("hidden", "cheap_embed", "random", "uniform_random")
RANDOM_MODES = ("random", "uniform_random")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _prompt_list(v):
    if v is None:
        return []
    if isinstance(v, str):
        return [v]
    if not isinstance(v, list) or not all(isinstance(p, str) for p in v):
        raise ValueError("must be a list of prompt strings")
    return [p for p in v]


class Expert(_Strict):
    source_model: str
    positive_prompts: list[str] = Field(default_factory=list)
    negative_prompts: list[str] = Field(default_factory=list)
    residual_scale: Optional[float] = None   # scales the expert's output (its down_proj)
    noise_scale: Optional[float] = Field(default=None, ge=0)  # σ of seeded noise on its MLP weights

    _prompts = field_validator("positive_prompts", "negative_prompts", mode="before")(
        lambda cls, v: _prompt_list(v))

    @field_validator("source_model", mode="before")
    @classmethod
    def _model(cls, v):
        if not isinstance(v, str) or not v.strip():
            raise ValueError("must be a model path or hub id")
        return v.strip()

    def prompt_key(self) -> tuple:
        return (tuple(sorted(self.positive_prompts)), tuple(sorted(self.negative_prompts)))


class SharedExpert(Expert):
    pass


class MoEConfig(_Strict):
    base_model: str
    experts: list[Expert] = Field(min_length=1)
    gate_mode: Literal["hidden", "cheap_embed", "random", "uniform_random"] = "hidden"
    experts_per_token: int = 2
    dtype: Optional[str] = None
    shared_experts: Optional[list[SharedExpert]] = None
    architecture: Optional[str] = None      # mixtral | qwen2_moe | qwen3_moe | phimoe (from the base)
    norm_topk_prob: Optional[bool] = None   # qwen2/3_moe: renormalise the top-k routing weights
    tokenizer_source: Optional[str] = None  # accepted for compatibility; only "base" is supported

    @field_validator("base_model", mode="before")
    @classmethod
    def _base(cls, v):
        if not isinstance(v, str) or not v.strip():
            raise ValueError("must be a model path or hub id")
        return v.strip()

    @field_validator("gate_mode", mode="before")
    @classmethod
    def _gate_mode(cls, v):
        if v not in GATE_MODES:
            raise ValueError(f"unknown gate mode {v!r}; use one of {', '.join(GATE_MODES)}")
        return v

    @field_validator("experts_per_token")
    @classmethod
    def _k(cls, v):
        if v < 1:
            raise ValueError("must be at least 1")
        return v

    _dtype = field_validator("dtype")(lambda cls, v: canonical_dtype(v))

    @classmethod
    def from_dict(cls, data) -> "MoEConfig":
        if not isinstance(data, dict):
            raise ConfigError("config", "the YAML must be a mapping with 'base_model' and "
                                        "'experts'")
        try:
            cfg = cls.model_validate(data)
        except ValidationError as e:
            raise _one_line(e) from None
        cfg._check()
        return cfg

    def _check(self) -> None:
        n = len(self.experts)
        if self.experts_per_token > n:
            raise ConfigError("experts_per_token", f"{self.experts_per_token} is more than the "
                                                   f"{n} expert(s) listed; use at most {n}")
        if self.tokenizer_source not in (None, "base"):
            raise ConfigError("tokenizer_source", "only the base model's tokenizer is supported "
                                                  "for MoE merges; remove the key")
        if self.gate_mode in ("hidden", "cheap_embed"):
            for i, e in enumerate(self.experts):
                if not e.positive_prompts:
                    raise ConfigError(f"experts[{i}].positive_prompts",
                                      f"gate_mode {self.gate_mode} builds each router row from "
                                      f"the expert's prompts; give at least one prompt (or use "
                                      f"gate_mode: random)")
            if n > 1 and len({e.prompt_key() for e in self.experts}) == 1:
                raise ConfigError("experts", f"every expert has the same prompts, so every gate "
                                             f"would be identical and the router could not tell "
                                             f"them apart; give each expert its own "
                                             f"positive_prompts")
        if self.shared_experts is not None and len(self.shared_experts) != 1:
            raise ConfigError("shared_experts", f"Qwen2-MoE has exactly one shared expert; list "
                                                f"one, not {len(self.shared_experts)}")

    def to_dict(self) -> dict:
        return self.model_dump(mode="json", exclude_none=True)


def load_moe_config(path: str | Path) -> MoEConfig:
    from merge.config import read_yaml

    return MoEConfig.from_dict(read_yaml(path))
