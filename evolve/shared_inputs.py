"""One copy of the input models per node: workers read their inputs as views of memory-mapped
safetensors files instead of private copies.

A worker keeps every input tensor for the whole search (merge.engine.InMemoryMerger). Read into
private memory, N workers on one node hold N copies: for three 7B inputs, 42 GB per worker. Mapped
from the files (MAP_PRIVATE: copy-on-write), the pages are the kernel's page cache, which every
process mapping the same file shares: one copy per node, plus one working model per worker. A
kernel that writes into an input (none should) gets a private copy of just the pages it touches.

Only for CPU workers and plain safetensors inputs; a GPU worker needs the tensors on its own
device anyway, and `.bin` checkpoints or `+lora` references are read as before.
"""
from __future__ import annotations

import mmap
import os
from pathlib import Path

from merge.engine import TensorReader


class SharedTensorReader(TensorReader):
    def __init__(self, plan_sources, device: str):
        super().__init__(plan_sources, device, keep=True)
        self._maps: dict[Path, mmap.mmap] = {}

    def read(self, model: str, tensor: str):
        key = (model, tensor)
        if key in self.cache:
            return self.cache[key]
        source = self.sources[model]
        info = source.tensors.get(tensor)
        if (self.device != "cpu" or info is None or info.file.suffix != ".safetensors"
                or getattr(source, "adapter", None) is not None or info.start < 0):
            return super().read(model, tensor)
        t = self._view(info)
        self.cache[key] = t
        return t

    def _view(self, info):
        import torch
        import warnings

        from merge.sources import st_to_torch

        mm = self._maps.get(info.file)
        if mm is None:
            fd = os.open(info.file, os.O_RDONLY)
            try:
                mm = self._maps[info.file] = mmap.mmap(fd, 0, flags=mmap.MAP_PRIVATE,
                                                       prot=mmap.PROT_READ | mmap.PROT_WRITE)
            finally:
                os.close(fd)
        dtype = st_to_torch(info.dtype)
        count = (info.end - info.start) // torch.empty((), dtype=dtype).element_size()
        if count == 0:
            return torch.empty(info.shape, dtype=dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            flat = torch.frombuffer(mm, dtype=dtype, count=count, offset=info.start)
        return flat.reshape(info.shape)

    def bytes_mapped(self) -> int:
        return sum(len(m) for m in self._maps.values())


def share_inputs(merger, config) -> bool:
    """Make `merger` (an InMemoryMerger, before its first merge) read its inputs as shared
    views. Returns False, changing nothing, when it cannot (not on the CPU, or already reading)."""
    if merger.options.device != "cpu":
        return False
    merger.plan(config)                  # opens the sources (headers only)
    reader = getattr(merger, "_reader", None)
    if reader is None or reader.cache:
        return False
    merger._reader = SharedTensorReader(merger.cache.models, merger.options.device)
    return True
