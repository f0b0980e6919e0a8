"""The merge config: parse and validate the YAML format users already write, loading no tensor.

Parameter values come in three shapes (see docs/configuration.md):
  * a scalar                      weight: 0.5
  * a gradient                    weight: [0, 0.5, 1]      anchors spread evenly over a slice's layers
  * a conditional list            weight: [{filter: self_attn, value: 0.3}, {value: 0.7}]
A conditional entry's value may itself be a gradient. Lookup order for one tensor and one model:
source parameters, slice parameters, top-level parameters, method default; a conditional list with no
matching entry falls through to the next level.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from merge.errors import ConfigError

Scalar = Union[bool, int, float, str]


class _Strict(BaseModel):
    # Keys we do not know are kept and reported as warnings, not refused: the reference toolkit
    # ignores them, and a config it accepts must run here too (see MergeConfig.warnings).
    model_config = ConfigDict(extra="allow", populate_by_name=True)


def _check_parameters(value: Any) -> Optional[dict[str, Any]]:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError("must be a mapping of parameter name to value")
    for name, v in value.items():
        _check_value(str(name), v)
    return value


def _check_value(name: str, v: Any) -> None:
    if isinstance(v, (bool, int, float, str)):
        return
    if isinstance(v, dict) and "value" in v:   # a single conditional entry, without a list
        v = [v]
    if isinstance(v, list) and v:
        if all(isinstance(x, (bool, int, float, str)) for x in v):
            return
        if all(isinstance(x, dict) for x in v):
            for entry in v:
                unknown = set(entry) - {"filter", "value"}
                if unknown or "value" not in entry:
                    raise ValueError(
                        f"'{name}': each conditional entry needs 'value' and optionally 'filter' "
                        f"(got keys {sorted(entry)})")
                if entry.get("filter") is not None and not isinstance(entry["filter"], str):
                    raise ValueError(f"'{name}': a filter must be a string (a tensor-name substring)")
                _check_value(name, entry["value"])
            return
    raise ValueError(
        f"'{name}' must be a number, a list of numbers (gradient) or a list of "
        f"{{filter, value}} entries, got {v!r}")


class InputModel(_Strict):
    model: str
    parameters: Optional[dict[str, Any]] = None

    _params = field_validator("parameters", mode="before")(lambda cls, v: _check_parameters(v))

    @field_validator("model", mode="before")
    @classmethod
    def _model_str(cls, v):
        return model_reference(v)


def model_reference(v: Any) -> str:
    """A model reference as text: 'path', 'path@rev', 'path+lora'; also the reference toolkit's
    mapping forms {model: path | {path, revision}, lora: path | {path, revision}}."""
    def path_text(p):
        if isinstance(p, dict) and "path" in p:
            return p["path"] + (f"@{p['revision']}" if p.get("revision") else "")
        return p

    if isinstance(v, dict) and "model" in v:
        lora = path_text(v.get("lora"))
        v = path_text(v["model"])
        if isinstance(v, str) and isinstance(lora, str) and lora:
            v = f"{v}+{lora}"
    if not isinstance(v, str) or not v.strip():
        raise ValueError("must be a model path or hub id")
    return v.strip()


class SliceSource(InputModel):
    layer_range: tuple[int, int]

    @field_validator("layer_range")
    @classmethod
    def _range(cls, v):
        a, b = v
        if a < 0 or b <= a:
            raise ValueError(f"[{a}, {b}) is empty or negative; use [start, end) with 0 <= start < end")
        return v


class Slice(_Strict):
    sources: list[SliceSource] = Field(min_length=1)
    parameters: Optional[dict[str, Any]] = None
    base_model: Optional[str] = None     # this slice's base, instead of the top-level one
    _params = field_validator("parameters", mode="before")(lambda cls, v: _check_parameters(v))
    _base = field_validator("base_model", mode="before")(
        lambda cls, v: None if v is None else model_reference(v))


class TokenizerConfig(_Strict):
    source: str = "union"                # the reference's default for the block form
    tokens: Optional[dict[str, Any]] = None
    pad_to_multiple_of: Optional[int] = None


DTYPES = {"float32": "float32", "fp32": "float32", "float": "float32",
          "float16": "float16", "fp16": "float16", "half": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16", "float64": "float64"}


def canonical_dtype(v: Optional[str]) -> Optional[str]:
    """A dtype name as users write it (bf16, half, torch.float16 ...) → its torch name; unknown
    names refused."""
    if v is None:
        return v
    if isinstance(v, str) and v.startswith("torch."):
        v = v[len("torch."):]
    if v not in DTYPES:
        raise ValueError(f"unknown dtype '{v}'; use one of float32, float16, bfloat16")
    return DTYPES[v]


class MergeConfig(_Strict):
    merge_method: str
    models: Optional[list[InputModel]] = None
    slices: Optional[list[Slice]] = None
    base_model: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    dtype: Optional[str] = None
    out_dtype: Optional[str] = None
    tokenizer_source: Optional[str] = None
    tokenizer: Optional[TokenizerConfig] = None
    chat_template: Optional[str] = None
    name: Optional[str] = None  # accepted for compatibility with existing configs (not used)
    _warnings: list[str] = PrivateAttr(default_factory=list)

    _params = field_validator("parameters", mode="before")(lambda cls, v: _check_parameters(v))

    @field_validator("merge_method", mode="before")
    @classmethod
    def _method(cls, v):
        if not isinstance(v, str) or not v.strip():
            raise ValueError("must be a method name, e.g. linear, slerp, ties")
        return v.strip().lower()

    @field_validator("base_model", mode="before")
    @classmethod
    def _base(cls, v):
        return None if v is None else model_reference(v)

    _dtype = field_validator("dtype", "out_dtype")(lambda cls, v: canonical_dtype(v))

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Any) -> "MergeConfig":
        if not isinstance(data, dict):
            raise ConfigError("config", "the YAML must be a mapping with at least 'merge_method' "
                                        "and 'models' or 'slices'")
        if data.get("modules") is not None:
            raise ConfigError("modules", "per-module merges (multimodal models) are not supported; "
                                         "use 'models' or 'slices'")
        data = {k: v for k, v in data.items() if not (k in ("models", "slices") and v == []
                                                      and data.get("slices" if k == "models"
                                                                    else "models"))}
        try:
            cfg = cls.model_validate(data)
        except ValidationError as e:
            raise _one_line(e) from None
        cfg._check_structure()
        cfg._warnings = list(_unknown_keys(cfg, "")) + cfg._warnings
        return cfg

    @property
    def warnings(self) -> list[str]:
        """One line per key that is accepted but has no effect (the reference ignores it too)."""
        return self._warnings

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True, by_alias=True)

    def _check_structure(self) -> None:
        if (self.models is None) == (self.slices is None):
            raise ConfigError("models/slices", "give exactly one of 'models' (whole models) or "
                                               "'slices' (layer ranges)")
        if self.models is not None and not self.models:
            raise ConfigError("models", "the list is empty; list at least one model")
        if self.slices is not None and not self.slices:
            raise ConfigError("slices", "the list is empty; give at least one slice")
        for i, s in enumerate(self.slices or []):
            lengths = {src.layer_range[1] - src.layer_range[0] for src in s.sources}
            if len(lengths) > 1:
                ranges = [list(src.layer_range) for src in s.sources]
                raise ConfigError(f"slices[{i}].sources",
                                  f"layer ranges {ranges} have unequal lengths; every source of "
                                  f"one slice must cover the same number of layers")
        if self.tokenizer is not None and self.tokenizer_source is not None:
            raise ConfigError("tokenizer_source", "give either 'tokenizer_source' or the "
                                                  "'tokenizer:' block, not both")

    # --- views ----------------------------------------------------------------------------------
    def referenced_models(self) -> list[str]:
        """Every model reference in order of first appearance, base first."""
        refs: list[str] = []
        if self.base_model:
            refs.append(self.base_model)
        for m in self.models or []:
            refs.append(m.model)
        for s in self.slices or []:
            refs.extend(src.model for src in s.sources)
        return list(dict.fromkeys(refs))


def _unknown_keys(obj: BaseModel, path: str):
    for key in (obj.model_extra or {}):
        where = f"{path}.{key}" if path else key
        yield f"{where}: unknown key, ignored (check its spelling against docs/configuration.md)"
    for name in type(obj).model_fields:
        value = getattr(obj, name)
        items = list(enumerate(value)) if isinstance(value, list) else [(None, value)]
        for i, item in items:
            if isinstance(item, BaseModel):
                sub = f"{path}.{name}" if path else name
                yield from _unknown_keys(item, sub if i is None else f"{sub}[{i}]")


def _one_line(e: ValidationError) -> ConfigError:
    err = e.errors()[0]
    field = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in err["loc"])
    field = field.replace(".[", "[") or "config"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if err["type"] == "extra_forbidden":
        msg = "unknown key; check its spelling against docs/configuration.md"
    elif err["type"] == "missing":
        msg = "required but missing"
    return ConfigError(field, msg)


def read_yaml(path: str | Path, field: str = "config") -> Any:
    """A YAML file's data, or a one-line ConfigError (missing file, or where the syntax breaks)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(field, f"no such file '{path}'")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "invalid syntax"
        raise ConfigError(str(path), f"malformed YAML{where}: {problem}") from None


def load_config(path: str | Path) -> MergeConfig:
    return MergeConfig.from_dict(read_yaml(path))
