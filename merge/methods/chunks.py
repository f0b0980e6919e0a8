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


def output_like(t, dtype, out=None):
    """Where a kernel writes a result shaped like `t` in `dtype`: `out` when it fits (same shape,
    dtype and device, contiguous) — a live destination such as an evaluation model's parameter,
    which kernels write but never read — else a new tensor."""
    import torch

    if (out is not None and tuple(out.shape) == tuple(t.shape) and out.dtype == dtype
            and out.device == t.device and out.is_contiguous()):
        return out
    return torch.empty(t.shape, dtype=dtype or torch.float32, device=t.device)


def numel_of(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def row_length(shape) -> int:
    """Length of one "row" of a tensor: dim 0 indexes rows, the rest is flattened (a matrix's row
    is `W[r, :]`); a 1-D or 0-D tensor is a single row."""
    if len(shape) >= 2:
        return numel_of(shape[1:])
    return max(1, numel_of(shape))


PIPE_CHUNK = 1 << 20  # elements per chunk for multi-op kernels: 4 MiB fp32 buffers stay in cache


def row_spans(shape, length: int | None = None, chunk: int = PIPE_CHUNK):
    """Flat spans of about `chunk` elements that always hold whole rows of `length` elements
    (default `row_length(shape)`), so row-wise statistics can be computed chunk by chunk.

    A row longer than `chunk` makes a chunk of its own. The layout depends only on the shape, so
    random draws made chunk by chunk stay reproducible. Kernels that run many element-wise ops per
    chunk use the smaller PIPE_CHUNK: their scratch buffers then stay in the CPU cache, which made
    a TIES chunk about twice as fast as with 16 MiB buffers.
    """
    n = numel_of(shape)
    step = max_span(shape, length, chunk) or 1
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def max_span(shape, length: int | None = None, chunk: int = PIPE_CHUNK) -> int:
    """The largest span `row_spans` yields (0 for an empty tensor)."""
    n = numel_of(shape)
    length = length or row_length(shape)
    return min(n, max(1, chunk // length) * length) if n else 0


def scratch(count: int, size: int, device, dtype=None) -> list:
    """`count` reusable fp32 buffers of `size` elements.

    Kernels write into these with `out=` and in-place ops instead of allocating per chunk: a fresh
    multi-megabyte allocation costs page faults that are slower than the arithmetic itself
    (an allocating `a + b` on 11.5M floats took 32 ms; an in-place `a.mul_(s)` 2.3 ms).
    """
    import torch

    return [torch.empty(size, dtype=dtype or torch.float32, device=device) for _ in range(count)]


def f32(x):
    """An fp32 copy of a chunk that kernels may modify in place.

    `x.float()` returns `x` itself when it is already fp32, and inputs may be views of a
    memory-mapped file or of the in-memory merger's cache: modifying them would corrupt every later
    read of the same tensor (a tied head reads its embedding twice).
    """
    import torch

    return x.to(torch.float32, copy=True)


SUM_BLOCK = 4096


def stable_sum(t) -> float:
    """Σ t (1-D fp32) as a Python float, the same whatever the thread count.

    A whole-tensor `sum` splits the range over the intra-op threads, so its fp32 rounding depends
    on their number; here each block of SUM_BLOCK entries is summed by one thread (a row-wise
    reduction parallelises over rows only) and the block sums are added in fp64, in order.
    """
    import torch

    n = t.numel()
    full = n - n % SUM_BLOCK
    total = torch.zeros((), dtype=torch.float64)
    if full:
        total += t[:full].view(-1, SUM_BLOCK).sum(dim=1).sum(dtype=torch.float64)
    if full < n:
        total += t[full:].sum(dtype=torch.float64)
    return float(total)



def stable_sum_halves(pair) -> tuple[float, float]:
    """(stable_sum(pair[:k]), stable_sum(pair[k:])) for k = len(pair)/2 a multiple of SUM_BLOCK,
    bit for bit, with one block reduction: each block sum is the same reduction of the same 4096
    values, and each half's block sums are added in fp64 as `stable_sum` adds them."""
    import torch

    blocks = pair.view(-1, SUM_BLOCK).sum(dim=1)
    nb = blocks.numel() // 2
    return (float(blocks[:nb].sum(dtype=torch.float64)),
            float(blocks[nb:].sum(dtype=torch.float64)))
