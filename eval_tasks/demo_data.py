"""Dataset loader for the demo_* lm-eval tasks (referenced from their YAMLs as `!function demo_data.load`).

lm-eval reads `dataset_kwargs.data_files` paths relative to the process's working directory, so
tasks with `dataset_path: json` and relative paths break as soon as they run from anywhere else
(a Ray worker, an installed package, a test's tmp dir). lm-eval resolves `!function` modules
relative to the YAML file instead, and this module resolves the data relative to itself: the tasks
work from any working directory, with no path rewriting by the caller.
"""
from __future__ import annotations

import json
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"


def load(data_file: str, **_metadata):
    """lm-eval `custom_dataset` hook: {"test": Dataset} from eval_tasks/data/<data_file>.

    lm-eval passes the task's `metadata` and `dataset_kwargs` as keyword arguments; only
    `data_file` is ours, the rest (e.g. `version`) is ignored."""
    import datasets

    path = Path(data_file)
    if not path.is_absolute():
        path = DATA_DIR / path
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
