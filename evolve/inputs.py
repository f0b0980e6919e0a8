"""The input model folders, watched while a search runs."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional


class InputWatch:
    """The input model folders as the search started: a folder deleted, truncated or rewritten
    while the search runs is noticed before the next candidate and named by its genome field."""

    def __init__(self, genome):
        from merge.sources import ModelRef, resolve_folder

        refs: dict[str, str] = {}
        if genome.base_model:
            refs[genome.base_model] = "genome.base_model"
        for i, m in enumerate(genome.models):
            refs.setdefault(m, f"genome.models[{i}]")
        self.folders: dict[str, tuple[str, Path]] = {}
        for ref, field in refs.items():
            parsed = ModelRef.parse(ref)
            self.folders[ref] = (field, resolve_folder(parsed, field))
            if parsed.lora and Path(parsed.lora).is_dir():
                self.folders[ref + " (adapter)"] = (field, Path(parsed.lora))
        self.prints = {ref: _fingerprint(folder) for ref, (_, folder) in self.folders.items()}

    def changed(self) -> Optional[str]:
        """The first change, as `field: what; fix`, or None."""
        for ref, before in self.prints.items():
            field, folder = self.folders[ref]
            now = _fingerprint(folder)
            if now == before:
                continue
            if not folder.is_dir():
                what = "was removed"
            else:
                gone = sorted(set(before) - set(now))
                new = sorted(set(now) - set(before))
                edited = sorted(n for n in set(before) & set(now) if before[n] != now[n])
                what = ("lost " + ", ".join(gone[:3]) if gone else
                        "changed " + ", ".join(edited[:3]) if edited else
                        "gained " + ", ".join(new[:3]))
            return (f"{field}: the input model '{ref.removesuffix(' (adapter)')}' {what} during "
                    f"the search; restore it, then continue with --resume")
        return None


def _fingerprint(folder: Path) -> dict[str, tuple[int, int]]:
    """Name → (size, mtime) of the files at the top of a model folder (weights, config,
    tokenizer); symlinks (the Hugging Face cache) are followed."""
    out = {}
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return {}
    for e in entries:
        if e.name.startswith("."):
            continue
        try:
            st = os.stat(e.path)
        except OSError:
            out[e.name] = (-1, -1)        # a dangling link: the blob is gone
            continue
        if not os.path.isdir(e.path):
            out[e.name] = (st.st_size, st.st_mtime_ns)
    return out
