"""The storage folder of one search. Everything a resume needs is here:

    run.json          what this run is (genome, options): a resume must match it
    history.jsonl     the archive: one JSON line per finished evaluation, appended and fsynced
    checkpoint.pkl    the pickled CMA-ES state, the generation and its asked candidates, per-
                      generation statistics; replaced atomically (write, fsync, rename)

    best.json         the best record so far (fitness, config): outputs are only replaced by a
                      better candidate, even when the history was lost or repaired

On resume, evaluations of the in-flight generation that are already in history.jsonl are reused,
so no evaluation is lost or repeated. Only a torn *last* line (a kill mid-append) is dropped, and
said so; a damaged line anywhere else stops the resume until `--repair-history` moves it aside.
"""
from __future__ import annotations

import json
import os
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from merge.errors import EvomergeError

FORMAT_VERSION = 1
RECORD_KEYS = ("generation", "index", "genome")


@dataclass
class HistoryScan:
    """What history.jsonl holds: the readable records, and the lines that are not."""

    records: list[dict] = field(default_factory=list)
    damaged: list[int] = field(default_factory=list)   # 1-based line numbers, torn last excluded
    torn_last: Optional[int] = None                     # a last line cut short by a kill
    lines: list[bytes] = field(default_factory=list)    # raw lines (kept for a repair)
    good: list[int] = field(default_factory=list)       # line numbers of `records`


def _record(line: bytes) -> Optional[dict]:
    try:
        value = json.loads(line)
    except ValueError:
        return None
    if not isinstance(value, dict) or any(k not in value for k in RECORD_KEYS):
        return None
    return value


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RunStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.restarted = False    # prepare() found a start that never began and cleared it
        self.run_json = self.root / "run.json"
        self.history = self.root / "history.jsonl"
        self.checkpoint = self.root / "checkpoint.pkl"
        self.best_config = self.root / "best_config.yaml"
        self.report_png = self.root / "report.png"
        self.report_html = self.root / "report.html"
        self.best_model = self.root / "best_model"
        self.tasks_dir = self.root / "tasks"

    # --- identity --------------------------------------------------------------------------------
    def begun(self) -> bool:
        """Whether the run got as far as its first checkpoint (before that, nothing is lost by
        starting over: a start that failed or was killed must not block the next attempt)."""
        return self.checkpoint.is_file() or (self.history.is_file()
                                             and self.history.stat().st_size > 0)

    def clear_unbegun(self) -> None:
        """Remove what a start that never began left behind: only files this tool writes."""
        import shutil

        self.run_json.unlink(missing_ok=True)
        for folder in (self.tasks_dir, self.root / "wandb"):
            shutil.rmtree(folder, ignore_errors=True)

    def prepare(self, identity: dict, resume: bool) -> bool:
        """Check the folder before anything starts; True when an existing run is resumed."""
        if self.root.exists() and not self.root.is_dir():
            raise EvomergeError(f"--storage-path: '{self.root}' is a file; give a folder")
        if self.run_json.is_file() and not self.begun():
            # a start that failed (or was killed) before its first checkpoint: begin again,
            # unless --resume names a different genome (then the path is probably wrong)
            if resume:
                self._check_identity(identity)
            self.clear_unbegun()
            self.restarted = True
        if not self.run_json.is_file():
            if self.root.is_dir() and any(p for p in self.root.iterdir()
                                          if not p.name.startswith(".")):
                raise EvomergeError(f"--storage-path: '{self.root}' is not empty and holds no "
                                    f"mergekit-evolve run; choose a new or empty folder")
            if resume and not self.restarted:
                raise EvomergeError(f"--resume: there is no run to resume in '{self.root}' (no "
                                    f"run.json); check the path, or drop --resume to start one")
            return False
        stored = self.read_run()
        if not resume:
            raise EvomergeError(f"--storage-path: '{self.root}' already holds a run (started "
                                f"{stored.get('started', '?')}); pass --resume to continue it or "
                                f"choose another folder")
        self._check_identity(identity, stored)
        return True

    def _check_identity(self, identity: dict, stored: Optional[dict] = None) -> None:
        stored = self.read_run() if stored is None else stored
        diff = _first_difference(stored.get("identity"), identity)
        if diff:
            raise EvomergeError(f"--resume: '{self.root}' holds a run of a different genome "
                                f"({diff} differs); use a new --storage-path for this genome")

    def create(self) -> Optional[Path]:
        """Make the folder and check that it can be written. Returns the topmost folder this
        created (to remove again if the start fails), or None when it existed. Every reason it
        cannot be used is one EvomergeError naming the path."""
        root = Path(os.path.abspath(self.root))
        first_missing = None
        for folder in [root, *root.parents]:
            if os.path.lexists(folder):
                if not folder.is_dir():
                    raise EvomergeError(f"--storage-path: cannot create '{self.root}': "
                                        f"'{folder}' is a file, not a folder; choose another path")
                break
            first_missing = folder
        try:
            root.mkdir(parents=True, exist_ok=True)
            probe = root / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            if first_missing is not None:
                import shutil

                shutil.rmtree(first_missing, ignore_errors=True)
            what = "create" if first_missing is not None else "write to"
            raise EvomergeError(f"--storage-path: cannot {what} '{self.root}' "
                                f"({e.strerror or type(e).__name__}); choose a folder you can "
                                f"write") from None
        return first_missing

    def read_run(self) -> dict:
        try:
            return json.loads(self.run_json.read_text())
        except (OSError, ValueError) as e:
            raise EvomergeError(f"--storage-path: cannot read {self.run_json}: {e}") from None

    def write_run(self, meta: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        write_atomic(self.run_json, (json.dumps(meta, indent=2) + "\n").encode())

    # --- history ---------------------------------------------------------------------------------
    def scan_history(self) -> HistoryScan:
        scan = HistoryScan()
        if not self.history.is_file():
            return scan
        raw = self.history.read_bytes()
        scan.lines = raw.splitlines(keepends=True)
        for n, line in enumerate(scan.lines, start=1):
            if not line.strip():
                continue
            record = _record(line)
            last = n == len(scan.lines)
            if record is None:
                if last and not line.endswith(b"\n"):
                    scan.torn_last = n        # killed mid-append: the candidate is re-run
                else:
                    scan.damaged.append(n)
                continue
            scan.records.append(record)
            scan.good.append(n)
        return scan

    def read_history(self, repair: bool = False,
                     log=lambda message: None) -> list[dict]:
        """Every readable record. A torn last line is dropped (with a note); any other damaged
        line stops here, naming it, unless `repair`: then the bad lines move to a side file and
        every readable record stays."""
        scan = self.scan_history()
        if scan.damaged and not repair:
            first = scan.damaged[0]
            more = f" (and {len(scan.damaged) - 1} more)" if len(scan.damaged) > 1 else ""
            raise EvomergeError(
                f"--resume: {self.history} line {first}{more} is damaged (not a complete "
                f"record); nothing was changed. Continue with --repair-history to keep all "
                f"{len(scan.records)} readable records and move the bad line(s) to "
                f"{self.history.name}.damaged")
        unterminated = bool(scan.good) and not scan.lines[scan.good[-1] - 1].endswith(b"\n")
        if scan.damaged or scan.torn_last or unterminated:
            self._rewrite_history(scan, log)
        return scan.records

    def _rewrite_history(self, scan: HistoryScan, log) -> None:
        bad = scan.damaged + ([scan.torn_last] if scan.torn_last else [])
        if scan.damaged:
            side = self.history.with_name(self.history.name + ".damaged")
            with open(side, "ab") as f:
                f.write(f"# {time.strftime('%Y-%m-%dT%H:%M:%S')} moved lines {bad} of "
                        f"{self.history.name}\n".encode())
                for n in bad:
                    line = scan.lines[n - 1]
                    f.write(line if line.endswith(b"\n") else line + b"\n")
                f.flush()
                os.fsync(f.fileno())
            log(f"note: moved {len(bad)} damaged line(s) of {self.history.name} (line "
                f"{', '.join(map(str, bad))}) to {side.name}; kept {len(scan.records)} records")
        elif scan.torn_last:
            log(f"note: the last line of {self.history.name} (line {scan.torn_last}) was cut "
                f"short by a kill; dropped, its candidate is evaluated again")
        keep = b"".join(line if line.endswith(b"\n") else line + b"\n"
                        for line in (scan.lines[n - 1] for n in scan.good))
        write_atomic(self.history, keep)

    def append(self, record: dict) -> None:
        line = json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n"
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.history, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    # --- the best so far ---------------------------------------------------------------------
    @property
    def best_record_path(self) -> Path:
        return self.root / "best.json"

    def read_best(self) -> Optional[dict]:
        try:
            record = json.loads(self.best_record_path.read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) and record.get("fitness") is not None else None

    def write_best(self, record: dict) -> None:
        write_atomic(self.best_record_path,
                     (json.dumps(record, allow_nan=False) + "\n").encode())

    # --- checkpoint ------------------------------------------------------------------------------
    def save_checkpoint(self, state: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        write_atomic(self.checkpoint, pickle.dumps({"version": FORMAT_VERSION, **state}))

    def load_checkpoint(self) -> Optional[dict]:
        if not self.checkpoint.is_file():
            return None
        try:
            state = pickle.loads(self.checkpoint.read_bytes())
        except Exception as e:
            raise EvomergeError(f"--resume: the checkpoint {self.checkpoint} cannot be read "
                                f"({type(e).__name__}); it was written by another version or "
                                f"is damaged") from None
        if state.get("version") != FORMAT_VERSION:
            raise EvomergeError(f"--resume: {self.checkpoint} has format {state.get('version')}, "
                                f"this version reads {FORMAT_VERSION}")
        return state


def _first_difference(a: Any, b: Any, path: str = "") -> Optional[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(dict.fromkeys([*a, *b])):
            d = _first_difference(a.get(key), b.get(key), f"{path}.{key}" if path else str(key))
            if d:
                return d
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            d = _first_difference(x, y, f"{path}[{i}]")
            if d:
                return d
        return None
    return None if a == b else (path or "the genome")
