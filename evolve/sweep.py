"""Command-line overrides of the genome file, and what changes when a W&B sweep agent starts us.

A sweep (configs/sweeps/, docs/wandb.md) varies the search's own settings: `--sigma0`, `--popsize`
and the genome's `limit` and `layer_granularity`, which `--limit` / `--layer-granularity` override
here. The overrides are recorded in run.json: `--resume` reuses them, and a resume that asks for
different values is refused, naming the option.

Under an agent (`WANDB_SWEEP_ID` and `WANDB_RUN_ID` in the environment) every run needs its own
storage folder: `--storage-path DIR` then means `DIR/<run id>`, or the `{run_id}` placeholder is
filled in where the user put it.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any, Mapping, Optional

from merge.errors import ConfigError, EvomergeError

RUN_ID_PLACEHOLDER = "{run_id}"

# option name → (where the value lives in the genome file, its field in genome-file errors)
OVERRIDES = {
    "limit": (("limit",), "limit"),
    "layer_granularity": (("genome", "layer_granularity"), "genome.layer_granularity"),
}


def option_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def parse_limit(text: Any):
    """`--limit`: an item count (int) or, below 1, a fraction — as `limit:` in the genome file."""
    if text is None or isinstance(text, (int, float)) and not isinstance(text, bool):
        return text
    s = str(text).strip()
    try:
        return int(s)
    except ValueError:
        pass
    try:
        return float(s)
    except ValueError:
        raise ValueError(f"'{text}' is not a number; give an item count (200) or a fraction "
                         f"(0.1)") from None


# --- sweeps -------------------------------------------------------------------------------------
def sweep_agent(env: Mapping[str, str] = os.environ) -> Optional[tuple[str, str]]:
    """(sweep id, run id) when a W&B sweep agent started this process, else None."""
    sweep, run = env.get("WANDB_SWEEP_ID"), env.get("WANDB_RUN_ID")
    return (sweep, run) if sweep and run else None


def resolve_storage_path(path: str, resume: bool,
                         env: Mapping[str, str] = os.environ) -> tuple[str, Optional[str]]:
    """The storage folder to use, and why it differs from `path` (None when it does not).

    `{run_id}` becomes the agent's run id (a fresh id outside a sweep); under an agent a path
    without the placeholder gets the run id as a subfolder, so parallel agents never share one.
    """
    agent = sweep_agent(env)
    if RUN_ID_PLACEHOLDER in path:
        if agent is None and resume:
            raise EvomergeError(f"--storage-path: {RUN_ID_PLACEHOLDER} names a new folder each "
                                f"time; to resume, give the folder the first run printed")
        run_id = agent[1] if agent else (env.get("WANDB_RUN_ID") or uuid.uuid4().hex[:8])
        return path.replace(RUN_ID_PLACEHOLDER, run_id), "filled in " + RUN_ID_PLACEHOLDER
    if agent is not None:
        return str(Path(path) / agent[1]), f"one folder per run of W&B sweep {agent[0]}"
    return path, None


# --- overrides ----------------------------------------------------------------------------------
def _stored_value(identity: dict, name: str) -> Any:
    value: Any = identity
    for key in OVERRIDES[name][0]:
        value = (value or {}).get(key)
    return value


def resolve_overrides(given: dict[str, Any], storage_path: Optional[str],
                      resume: bool) -> dict[str, Any]:
    """The overrides of this invocation: those given, plus on --resume those in run.json.

    A resume that asks for another value than the run was started with is refused: the results
    so far were measured with the old value, so they would not be comparable.
    """
    from evolve.storage import RunStore

    given = {k: v for k, v in given.items() if v is not None}
    store = RunStore(storage_path) if storage_path else None
    if not (resume and store and store.run_json.is_file()):
        return given
    try:
        meta = store.read_run()
    except EvomergeError:
        return given     # reported by the run itself, in its own words
    identity = (meta.get("identity") or {}).get("evolve") or {}
    for name, value in given.items():
        before = _stored_value(identity, name)
        if before != value:
            raise EvomergeError(f"{option_name(name)}: the run in '{storage_path}' was started "
                                f"with {name} {before}, not {value}; resume without "
                                f"{option_name(name)} (run.json keeps it) or use a new "
                                f"--storage-path")
    return {**(meta.get("overrides") or {}), **given}


def apply_overrides(cfg, overrides: dict[str, Any]):
    """A copy of the EvolveConfig `cfg` with the overrides, checked like the genome file itself;
    errors name the option instead of the file's field."""
    from evolve.genome import parse_evolve_config

    if not overrides:
        return cfg
    data = cfg.model_dump(mode="python")
    for name, value in overrides.items():
        *parents, leaf = OVERRIDES[name][0]
        target = data
        for key in parents:
            target = target[key]
        target[leaf] = value
    try:
        return parse_evolve_config(data)
    except ConfigError as e:
        raise rename_error(e, overrides) from None


def rename_error(e: ConfigError, overrides: dict[str, Any]) -> ConfigError:
    """A genome-file error about an overridden value, re-addressed to its command-line option."""
    for name in overrides:
        field = OVERRIDES[name][1]
        if e.field == field:
            message = str(e).split(": ", 1)[1] if ": " in str(e) else str(e)
            return ConfigError(option_name(name), message)
    return e
