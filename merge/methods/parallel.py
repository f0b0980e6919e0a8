"""Chunk-level parallelism for kernels that run many small element-wise ops per chunk.

Torch parallelises each op internally (OpenMP): every op ends in a barrier. A TIES or DARE chunk
runs ten to twenty ops per model, and on a loaded machine a barrier waits for a descheduled thread —
measured on the shared 2-core box (load 7–11): a DARE chunk loop took 8.3 s wall with 2 intra-op
threads against 0.74 s with one. So these kernels run each op on one thread and spread whole chunks
over `torch.get_num_threads()` Python threads instead (ops release the GIL): no barriers, and a
descheduled worker only delays its own chunk.

Results never depend on scheduling: every chunk writes its own slice, per-chunk partial results
come back in chunk order, and random draws use one generator per chunk (`MergeInputs.generator`
salted with the chunk index).
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, TypeVar

T = TypeVar("T")
R = TypeVar("R")

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_local = threading.local()


def _get_pool(n: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _lock:
        if _pool is None or _pool_size != n:
            if _pool is not None:
                _pool.shutdown(wait=True)
            _pool = ThreadPoolExecutor(n, thread_name_prefix="merge-chunks")
            _pool_size = n
        return _pool


_workers: int | None = None


def set_workers(n: int | None) -> None:
    """How many chunk workers kernels use (None: torch's thread count at call time)."""
    global _workers
    _workers = n


def map_chunks(fn: Callable[[T], R], items: Iterable[T], device) -> list[R]:
    """[fn(item) for item in items], run on CPU worker threads with single-threaded ops.

    On accelerators (one stream), with one worker, or for a single chunk, it is a plain loop.
    """
    import torch

    items = list(items)
    workers = _workers or torch.get_num_threads()
    on_cpu = torch.device(device).type == "cpu"
    if not on_cpu or workers <= 1 or len(items) <= 1 or getattr(_local, "inside", False):
        return [fn(item) for item in items]
    pool = _get_pool(workers)

    def run(item):
        _local.inside = True   # a kernel helper called from a worker never nests pools
        return fn(item)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return list(pool.map(run, items))
    finally:
        torch.set_num_threads(threads)


def buffer(name: str, size: int, device, dtype=None):
    """A per-thread scratch tensor of at least `size` elements (a view of exactly `size`).

    Kept between calls: allocating multi-megabyte buffers per chunk costs page faults that are
    slower than the arithmetic itself.
    """
    import torch

    dtype = dtype or torch.float32
    store = getattr(_local, "buffers", None)
    if store is None:
        store = _local.buffers = {}
    key = (name, str(device), dtype)
    buf = store.get(key)
    if buf is None or buf.numel() < size:
        buf = store[key] = torch.empty(max(size, 1), dtype=dtype, device=device)
    return buf[:size]
