"""What a local search may start on this machine, and the Ray temp folders killed runs left."""
from __future__ import annotations

import os
import time
from pathlib import Path

from merge.errors import EvomergeError


RAY_DIR_PREFIX = "evomerge-ray-"     # evolve.workers.RaySession's private temp folders


def sweep_stale_ray_dirs(roots=None, min_age: float = 120.0) -> list[Path]:
    """Remove the Ray temp folders of local runs that were killed (kill -9 leaves them): ours
    by name, older than `min_age` seconds, and named by no live process (every running Ray
    session has its folder in its raylet's and GCS server's command lines)."""
    import shutil
    import tempfile

    roots = roots or list(dict.fromkeys([tempfile.gettempdir(), "/tmp"]))
    candidates = [p for root in roots if os.path.isdir(root)
                  for p in Path(root).glob(RAY_DIR_PREFIX + "*")
                  if p.is_dir() and not p.is_symlink() and p.stat().st_uid == os.getuid()
                  and time.time() - p.stat().st_mtime > min_age]
    if not candidates:
        return []
    alive = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            alive.append((proc / "cmdline").read_bytes())
        except OSError:
            continue
    removed = []
    for p in candidates:
        if not any(str(p).encode() in cmd for cmd in alive):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def local_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def check_local_placement(workers: int, cpus: float, gpus: float) -> None:
    """A local run starts its own Ray sized to this machine: refuse at once (nothing started,
    nothing written) what it cannot place, instead of a Ray sized to the request."""
    have = local_cpus()
    if workers * cpus > have + 1e-9:
        raise EvomergeError(f"--workers: {workers} worker(s) × {cpus:g} CPU need "
                            f"{workers * cpus:g} CPU but this machine has {have}; lower --workers "
                            f"or --cpus-per-worker, or run on a cluster with --ray-address")
    if gpus > 0:
        import torch

        from evolve.workers import _workers_on_node

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if _workers_on_node({"CPU": float(have), "GPU": float(count)}, cpus, gpus) < workers:
            raise EvomergeError(f"--workers: {workers} worker(s) × {gpus:g} GPU need "
                                f"{workers * gpus:g} GPU but this machine has {count}; lower "
                                f"--workers or --gpus-per-worker, or run on a cluster with "
                                f"--ray-address")
