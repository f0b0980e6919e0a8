"""Model access: resolve a reference to a folder, list its tensors from headers, read tensors lazily.

A reference is a local folder or a hub id, optionally `id@revision`, optionally `+lora_path`.
Safetensors are memory-mapped and read one tensor at a time; `.bin` checkpoints are unpickled with
`weights_only=True` and memory-mapped where torch supports it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Optional

from merge.errors import EvomergeError
from merge.headers import read_safetensors_header
from merge.lora import LoraAdapter

__all__ = ["ModelRef", "ModelSource", "TensorInfo", "read_safetensors_header", "resolve_folder"]

HUB_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "*.json", "*.model", "*.txt",
                "*.jinja", "*.tiktoken"]


@dataclass(frozen=True)
class ModelRef:
    path: str
    revision: str | None = None
    lora: str | None = None

    @classmethod
    def parse(cls, text: str) -> "ModelRef":
        lora = None
        if "+" in text:
            text, lora = text.split("+", 1)
        revision = None
        if "@" in text and not Path(text).exists():
            text, revision = text.rsplit("@", 1)
        return cls(text, revision, lora or None)

    def __str__(self) -> str:
        s = self.path + (f"@{self.revision}" if self.revision else "")
        return s + (f"+{self.lora}" if self.lora else "")


def resolve_folder(ref: ModelRef, field: str) -> Path:
    """A local folder holding the model's files; hub ids come from the Hugging Face cache."""
    local = Path(ref.path).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise EvomergeError(f"{field}: '{ref.path}' is a file; give the model's folder")
    looks_like_hub_id = ref.path.count("/") == 1 and not ref.path.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise EvomergeError(f"{field}: model folder '{ref.path}' does not exist; check the path")
    try:
        from huggingface_hub import snapshot_download

        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        # Read the cache location now, not at import: tools and tests set it per run.
        return Path(snapshot_download(ref.path, revision=ref.revision, allow_patterns=HUB_PATTERNS,
                                      local_files_only=offline,
                                      cache_dir=os.environ.get("HF_HUB_CACHE") or None))
    except Exception as e:  # the hub library raises many kinds; all mean "not available"
        raise EvomergeError(
            f"{field}: '{ref}' is neither a local folder nor available from the Hugging Face hub "
            f"or its cache ({type(e).__name__}); download it first or give a local path") from None


def open_adapter(text: str, label: str, base: "ModelSource") -> LoraAdapter:
    """Resolve an adapter reference (local folder or hub id) and validate it against its base."""
    ref = ModelRef(text)
    local = Path(text).expanduser()
    if local.exists() and not local.is_dir():
        raise EvomergeError(f"{label}: LoRA adapter '{text}' is a file; give the adapter's folder")
    if not local.exists() and (text.count("/") != 1 or text.startswith((".", "/", "~"))):
        raise EvomergeError(f"{label}: LoRA adapter folder '{text}' does not exist; check the "
                            f"path after '+'")
    folder = resolve_folder(ref, f"{label} (LoRA adapter)")
    adapter = LoraAdapter.open(folder, label, text)
    adapter.check_against(base.tensors, f"{label}: LoRA adapter '{text}'", base.config)
    return adapter


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype string, e.g. "BF16"
    file: Path
    start: int = -1  # absolute byte range of the data in a safetensors file
    end: int = -1


@dataclass
class ModelSource:
    """One input model: its config.json and a lazy view of its tensors."""

    ref: ModelRef
    folder: Path
    label: str = "model"   # the config field that names this model, for error messages
    _handles: dict[Path, Any] = field(default_factory=dict, repr=False)
    _bin_cache: dict[Path, dict] = field(default_factory=dict, repr=False)
    adapter: Optional[LoraAdapter] = None   # applied as tensors are read (`base+adapter`)

    @classmethod
    def open(cls, text: str, label: str = "model") -> "ModelSource":
        ref = ModelRef.parse(text)
        source = cls(ref, resolve_folder(ref, label), label)
        if ref.lora:
            # Validated against the base's headers now, applied lazily per tensor in read().
            source.adapter = open_adapter(ref.lora, label, source)
        return source

    @cached_property
    def config(self) -> dict[str, Any]:
        p = self.folder / "config.json"
        if not p.is_file():
            raise EvomergeError(f"{self.label}: '{self.ref}' has no config.json; is it a Hugging "
                                f"Face model folder?")
        return json.loads(p.read_text())

    @cached_property
    def tensors(self) -> dict[str, TensorInfo]:
        files = self._weight_files()
        out: dict[str, TensorInfo] = {}
        for f in files:
            if f.suffix == ".safetensors":
                header, data_start = read_safetensors_header(f, with_data_start=True)
                for name, meta in header.items():
                    a, b = meta["data_offsets"]
                    out[name] = TensorInfo(name, tuple(meta["shape"]), meta["dtype"], f,
                                           data_start + a, data_start + b)
            else:
                for name, t in self._load_bin(f).items():
                    out[name] = TensorInfo(name, tuple(t.shape), _torch_to_st(t.dtype), f)
        return out

    def _weight_files(self) -> list[Path]:
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index = self.folder / index_name
            if index.is_file():
                weight_map = json.loads(index.read_text()).get("weight_map", {})
                return [self.folder / f for f in dict.fromkeys(weight_map.values())]
        st = sorted(self.folder.glob("*.safetensors"))
        if st:
            return st
        bins = sorted(self.folder.glob("pytorch_model*.bin"))
        if bins:
            return bins
        raise EvomergeError(f"{self.label}: '{self.ref}' holds no *.safetensors or "
                            f"pytorch_model*.bin weights")

    def _load_bin(self, f: Path) -> dict:
        if f not in self._bin_cache:
            import torch

            try:
                state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise EvomergeError(f"{self.label}: cannot read '{f.name}' with weights-only "
                                    f"unpickling ({type(e).__name__}); convert it to "
                                    f"safetensors") from None
            self._bin_cache[f] = state
        return self._bin_cache[f]

    def read(self, name: str, device: str = "cpu"):
        """Load one tensor (a copy, independent of the memory map), with the LoRA applied if any."""
        if self.adapter is not None and name in self.adapter.targets:
            info = self.tensors[name]
            t = self.adapter.apply(name, lambda: self._read_base(name), st_to_torch(info.dtype))
            return t.to(device) if device != "cpu" else t
        return self._read_base(name, device)

    def _read_base(self, name: str, device: str = "cpu"):
        info = self.tensors[name]
        if info.file.suffix == ".safetensors":
            t = self._pread(info)
        else:
            t = self._load_bin(info.file)[name].clone()
        return t.to(device) if device != "cpu" else t

    def _pread(self, info: TensorInfo):
        """Read one tensor's bytes into fresh memory with pread.

        Not a memory map: mapped pages count as the process's resident memory for as long as the
        file stays open, so merging through mmap grows RSS with the model size. pread keeps peak
        memory at the tensors in flight (the page cache still serves repeated reads).
        """
        import torch

        fd = self._handles.get(info.file)
        if fd is None:
            fd = self._handles[info.file] = os.open(info.file, os.O_RDONLY)
        buf = torch.empty(info.end - info.start, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], info.start + done)
            if n <= 0:
                raise EvomergeError(f"{self.label}: '{info.file.name}' is truncated (tensor "
                                    f"'{info.name}'); re-download or re-save the model")
            done += n
        return buf.view(st_to_torch(info.dtype)).reshape(info.shape)

    def close(self) -> None:
        for fd in self._handles.values():
            os.close(fd)
        self._handles.clear()
        self._bin_cache.clear()
        if self.adapter is not None:
            self.adapter.close()


_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
              "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
              "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def st_to_torch(code: str):
    import torch

    return getattr(torch, _ST_DTYPES[code])


def _torch_to_st(dtype) -> str:
    name = str(dtype).replace("torch.", "")
    for code, n in _ST_DTYPES.items():
        if n == name:
            return code
    raise EvomergeError(f"unsupported tensor dtype {dtype}")


def torch_to_st(dtype) -> str:
    return _torch_to_st(dtype)


ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
               "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
