"""The storage folder of one search. Everything a resume needs is here:

    run.json          what this run is (genome, options): a resume must match it
    history.jsonl     the archive: one JSON line per finished evaluation, appended and fsynced
    checkpoint.pkl    the pickled CMA-ES state, the generation and its asked candidates, per-
                      generation statistics; replaced atomically (write, fsync, rename)

On resume, evaluations of the in-flight generation that are already in history.jsonl are reused,
so no evaluation is lost or repeated. A line torn by a kill is cut off and its candidate re-run.
"""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any, Optional

from merge.errors import EvomergeError

FORMAT_VERSION = 1


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
        self.run_json = self.root / "run.json"
        self.history = self.root / "history.jsonl"
        self.checkpoint = self.root / "checkpoint.pkl"
        self.best_config = self.root / "best_config.yaml"
        self.report_png = self.root / "report.png"
        self.report_html = self.root / "report.html"
        self.best_model = self.root / "best_model"
        self.tasks_dir = self.root / "tasks"

    # --- identity --------------------------------------------------------------------------------
    def prepare(self, identity: dict, resume: bool) -> bool:
        """Check the folder before anything starts; True when an existing run is resumed."""
        if self.root.exists() and not self.root.is_dir():
            raise EvomergeError(f"--storage-path: '{self.root}' is a file; give a folder")
        if not self.run_json.is_file():
            if self.root.is_dir() and any(p for p in self.root.iterdir()
                                          if not p.name.startswith(".")):
                raise EvomergeError(f"--storage-path: '{self.root}' is not empty and holds no "
                                    f"mergekit-evolve run; choose a new or empty folder")
            return False
        stored = self.read_run()
        if not resume:
            raise EvomergeError(f"--storage-path: '{self.root}' already holds a run (started "
                                f"{stored.get('started', '?')}); pass --resume to continue it or "
                                f"choose another folder")
        diff = _first_difference(stored.get("identity"), identity)
        if diff:
            raise EvomergeError(f"--resume: '{self.root}' holds a run of a different genome "
                                f"({diff} differs); use a new --storage-path for this genome")
        return True

    def read_run(self) -> dict:
        try:
            return json.loads(self.run_json.read_text())
        except (OSError, ValueError) as e:
            raise EvomergeError(f"--storage-path: cannot read {self.run_json}: {e}") from None

    def write_run(self, meta: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        write_atomic(self.run_json, (json.dumps(meta, indent=2) + "\n").encode())

    # --- history ---------------------------------------------------------------------------------
    def read_history(self) -> list[dict]:
        """Every complete record; a torn last line (killed mid-write) is cut off the file."""
        if not self.history.is_file():
            return []
        raw = self.history.read_bytes()
        records, good = [], 0
        for line in raw.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break
            try:
                records.append(json.loads(line))
            except ValueError:
                break
            good += len(line)
        if good < len(raw):
            with open(self.history, "r+b") as f:
                f.truncate(good)
        return records

    def append(self, record: dict) -> None:
        line = json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n"
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.history, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

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
