"""Flat chunking: elementwise work runs over fixed-size pieces of a tensor so that fp32 temporaries
stay small whatever the tensor size (peak memory is bounded by the inputs plus one output buffer).

The chunk size is a constant, so random draws made chunk by chunk are reproducible.
"""
from __future__ import annotations

CHUNK = 1 << 22  # elements; 16 MiB of fp32


def spans(numel: int):
    for start in range(0, numel, CHUNK):
        yield slice(start, min(numel, start + CHUNK))


def flat(t):
    return t.reshape(-1)


def output_like(t, dtype):
    import torch

    return torch.empty(t.shape, dtype=dtype or torch.float32, device=t.device)
