"""What can go wrong around an evaluation, and the rules we apply: time limits for evaluations,
the health of the Ray cluster under the driver, and a full disk under the storage folder.

Kept free of Ray imports at module level: the rules are plain functions, tested on their own;
evolve.workers applies them to the actor pool.
"""
from __future__ import annotations

import errno
import os
import shutil
import socket
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from merge.errors import EvomergeError

# Test hook, like evolve.workers.DIE_ONCE_ENV: `PATH` or `PATH:N`. A worker's evaluation hangs
# (sleeps for an hour, after merging) while PATH holds fewer than N lines (default 1), adding one
# line each time, as an evaluation stuck in a task's code or a wedged device would.
HANG_ENV = "EVOMERGE_TEST_WORKER_HANG"


@dataclass
class EvalLimits:
    """How long an evaluation may take before its worker is killed and replaced.

    Without `fixed` (`--eval-timeout`), the limit adapts: `factor` × the median of the evaluations
    finished so far (per item, times the evaluation's items, when they are known), never below
    `floor`. An actor's first evaluation also reads its inputs and
    warms up (minutes on 7B models), so it gets `first` (or the adaptive limit, if larger).
    A timed-out candidate is retried on a fresh worker `retries` times, then recorded as failed.
    """

    fixed: Optional[float] = None
    first: float = 1800.0
    floor: float = 120.0
    factor: float = 5.0
    start: float = 3600.0          # an actor's start-up (inputs read, model and tasks built)
    retries: int = 1
    recent: list = field(default_factory=list)   # seconds of finished evaluations
    per_item: list = field(default_factory=list)  # ... per item, where the item count is known

    def observe(self, seconds: Optional[float], items: Optional[int] = None) -> None:
        if seconds is not None and seconds > 0:
            self.recent.append(float(seconds))
            del self.recent[:-200]
            if items:
                self.per_item.append(float(seconds) / items)
                del self.per_item[:-200]

    def limit(self, first_on_actor: bool, items: Optional[int] = None) -> float:
        """`items`: how many items the evaluation scores, when known (multi-fidelity rungs
        differ several-fold): the limit then scales with the median seconds per item."""
        if self.fixed is not None:
            return self.fixed
        if items and self.per_item:
            adaptive = self.factor * statistics.median(self.per_item) * items
        else:
            adaptive = self.factor * statistics.median(self.recent) if self.recent else 0.0
        if first_on_actor or not self.recent:
            return max(self.first, adaptive)
        return max(self.floor, adaptive)


def deadline_grace(timeout: Optional[float]) -> float:
    """How long evaluations in flight may run on once `--timeout` has passed: a tenth of the
    timeout, between 10 s and 60 s. Then they are abandoned (their candidates run again on
    --resume)."""
    if not timeout:
        return 60.0
    return min(60.0, max(10.0, 0.1 * timeout))


# --- the cluster under the driver ---------------------------------------------------------------
class ClusterHealth:
    """Noticing, within seconds, that the Ray processes the driver depends on are gone.

    Ray's own calls do not tell us: with the local raylet killed, `ray.wait` simply never returns,
    and with the head gone the driver retries its GCS connection for a minute before Ray ends the
    process with a fatal log. We check, at most every `period` seconds: the local raylet process
    (when this driver started the cluster) and a TCP connection to the GCS (the head), which must
    fail for `grace` seconds in a row to count as lost."""

    def __init__(self, period: float = 2.0, grace: float = 6.0):
        self.period, self.grace = period, grace
        self._last = 0.0
        self._gcs_down_since: Optional[float] = None
        self._raylet = None
        self._gcs: Optional[tuple[str, int]] = None
        try:
            import ray

            node = getattr(ray._private.worker, "_global_node", None)   # ours when we started it
            procs = (getattr(node, "all_processes", None) or {}).get("raylet") or []
            self._raylet = procs[0].process if procs else None
            host, _, port = ray.get_runtime_context().gcs_address.rpartition(":")
            self._gcs = (host, int(port))
        except Exception:   # another Ray version: the pool's own time limits still apply
            pass

    def check(self, now_please: bool = False) -> None:
        """Raise EvomergeError when the raylet or the head is gone. At most every `period`
        seconds unless `now_please` (e.g. a worker just died: was it the node?)."""
        now = time.monotonic()
        if now - self._last < self.period and not now_please:
            return
        self._last = now
        if self._raylet is not None and self._raylet.poll() is not None:
            raise EvomergeError(f"Ray: the local raylet died (exit status "
                                f"{self._raylet.returncode}); the run is saved, continue it with "
                                f"--resume")
        if self._gcs is None:
            return
        try:
            with socket.create_connection(self._gcs, timeout=1.0):
                pass
            self._gcs_down_since = None
        except OSError:
            self._gcs_down_since = self._gcs_down_since or now
            if now - self._gcs_down_since >= self.grace:
                host, port = self._gcs
                raise EvomergeError(f"Ray: lost the cluster's head (GCS at {host}:{port} does not "
                                    f"answer for {self.grace:g}s); the run is saved, continue it "
                                    f"with --resume once the cluster is back")


# --- a full disk --------------------------------------------------------------------------------
def is_disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def disk_full_error(e: OSError, root: Path, needs: int) -> EvomergeError:
    """One line naming the folder, what failed, what is free and about what the run needs."""
    root = Path(root)
    _remove_partial_files(root)
    where = root
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        free = 0
    what = f" {Path(e.filename).name}" if getattr(e, "filename", None) else ""
    reason = os.strerror(e.errno) if e.errno else str(e)
    return EvomergeError(f"--storage-path: no space left under '{root}' ({reason} while writing"
                         f"{what}); {_size(free)} free, the run needs about {_size(needs)} more "
                         f"there — free space or move the folder, then continue with --resume")


def storage_needs(root: Path, remaining_evals: int, model_bytes: int) -> int:
    """A rough estimate of what a run still writes: a history line per evaluation (the mean of
    those written so far), checkpoints and reports rewritten, and the merged best model."""
    root = Path(root)
    history = root / "history.jsonl"
    per_line = 4096
    try:
        lines = history.read_bytes().count(b"\n")
        if lines:
            per_line = max(1024, history.stat().st_size // lines)
    except OSError:
        pass
    rewritten = sum(_file_size(root / n) for n in ("checkpoint.pkl", "report.png",
                                                  "report.html")) * 2 or 2 * 2**20
    return remaining_evals * per_line + rewritten + model_bytes


def _remove_partial_files(root: Path) -> None:
    """Temporary files of atomic writes that the full disk cut short (`.NAME.tmp-PID`)."""
    try:
        for p in root.glob(".*.tmp-*"):
            p.unlink(missing_ok=True)
    except OSError:
        pass


def _file_size(p: Path) -> int:
    try:
        return p.stat().st_size
    except OSError:
        return 0


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"



def model_bytes(config: dict) -> int:
    """The size of one input model on disk (what best_model/ will take), when it is local."""
    refs = [m.get("model") for m in config.get("models") or []]
    refs += [s.get("model") for sl in config.get("slices") or [] for s in sl.get("sources", [])]
    for ref in [config.get("base_model"), *refs]:
        if isinstance(ref, str) and Path(ref.split("+")[0]).is_dir():
            folder = Path(ref.split("+")[0])
            return sum(_file_size(p) for p in folder.glob("*.safetensors")) or sum(
                _file_size(p) for p in folder.glob("*.bin"))
    return 0
