"""Output: sharded safetensors streamed to disk, inside a folder that appears atomically.

The plan knows every output tensor's name, shape and dtype before the first one is computed, so each
shard's safetensors header is written up front and tensors are appended as they are produced: memory
holds one tensor at a time, never a whole shard.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import time
from pathlib import Path

from merge.errors import EvomergeError


def parse_size(text: str | int) -> int:
    """'5B', '500M', '2.5G', '1e9' or a byte count → bytes (B = billion bytes, as users write it)."""
    if isinstance(text, int):
        return text
    s = str(text).strip().upper()
    units = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}
    try:
        if s and s[-1] in units:
            return int(float(s[:-1]) * units[s[-1]])
        return int(float(s))
    except ValueError:
        raise EvomergeError(f"--out-shard-size: '{text}' is not a size; use e.g. 5B, 500M or a "
                            f"byte count") from None


class ShardedWriter:
    """Writes (name, shape, dtype) specs in order into shards no larger than `shard_size` bytes."""

    def __init__(self, folder: Path, specs: list[tuple[str, tuple, str, int]], shard_size: int):
        self.folder = Path(folder)
        shards: list[list[tuple[str, tuple, str, int]]] = [[]]
        size = 0
        for spec in specs:
            if shards[-1] and size + spec[3] > shard_size:
                shards.append([])
                size = 0
            shards[-1].append(spec)
            size += spec[3]
        self.shards = shards
        n = len(shards)
        self.names = (["model.safetensors"] if n == 1 else
                      [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
        self._order = [(i, spec) for i, shard in enumerate(shards) for spec in shard]
        self._next = 0
        self._file = None
        self._shard = -1

    def _open_shard(self, i: int) -> None:
        if self._file:
            self._file.close()
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, dtype, nbytes in self.shards[i]:
            header[name] = {"dtype": dtype, "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
        self._file = open(self.folder / self.names[i], "wb")
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)
        self._shard = i

    def write(self, name: str, tensor) -> None:
        shard, (expected, shape, _dtype, nbytes) = self._order[self._next]
        if name != expected:
            raise RuntimeError(f"writer expected tensor '{expected}', got '{name}'")
        if shard != self._shard:
            self._open_shard(shard)
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(_byte_dtype())
        if data.numel() != nbytes or tuple(tensor.shape) != tuple(shape):
            raise RuntimeError(f"tensor '{name}' has shape {list(tensor.shape)}, planned {shape}")
        self._file.write(memoryview(data.numpy()))
        self._next += 1

    def finish(self) -> None:
        if self._next != len(self._order):
            raise RuntimeError("not every planned tensor was written")
        if self._file:
            self._file.close()
        if len(self.shards) > 1:
            total = sum(spec[3] for spec in self._order_specs())
            index = {"metadata": {"total_size": total},
                     "weight_map": {spec[0]: self.names[i] for i, spec in self._order}}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    def _order_specs(self):
        return [spec for _, spec in self._order]

    def abort(self) -> None:
        if self._file:
            self._file.close()


def _byte_dtype():
    import torch

    return torch.uint8


def check_output_folder(out: Path, overwrite: bool, inputs: list[Path]) -> None:
    """Refuse to write over anything the user has, unless they said --overwrite."""
    out = Path(out).resolve()
    for p in inputs:
        if p.resolve() == out:
            raise EvomergeError(f"OUT_DIR: '{out}' is one of the input models; choose another "
                                f"output folder")
    if out.exists():
        if not out.is_dir():
            raise EvomergeError(f"OUT_DIR: '{out}' is a file; give a folder path")
        if any(out.iterdir()) and not overwrite:
            raise EvomergeError(f"OUT_DIR: '{out}' is not empty; choose an empty folder or pass "
                                f"--overwrite to replace it")


class AtomicFolder:
    """Build the output in a hidden sibling folder and move it into place only when complete."""

    def __init__(self, out: Path, overwrite: bool):
        self.out = Path(out).resolve()
        self.overwrite = overwrite
        self.tmp = self.out.parent / f".{self.out.name}.partial-{os.getpid()}-{int(time.time())}"

    def __enter__(self) -> Path:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        if self.out.exists():
            if any(self.out.iterdir()):
                old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
                os.replace(self.out, old)
                os.replace(self.tmp, self.out)
                shutil.rmtree(old, ignore_errors=True)
                return False
            self.out.rmdir()
        os.replace(self.tmp, self.out)
        return False
