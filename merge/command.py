"""What the build commands share (mergekit-yaml, mergekit-moe, mergekit-legacy, mergekit-extract-lora):
options from the common flags, the validate → dry-run → build flow, and errors as one line.

Kept light at import time: torch and transformers load only once a build actually runs, so
`--help` answers at once.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Any, Callable, NoReturn, Optional

import click

from merge.errors import EvomergeError


def fail(message: str) -> NoReturn:
    """Every user-facing error: one line on stderr, exit code 2, no traceback."""
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


@contextmanager
def reporting(target: str):
    """Turn our errors and Ctrl-C into one line and exit code 2 (`target`: what stays untouched)."""
    try:
        yield
    except EvomergeError as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail(f"interrupted; nothing was written to {target}")


def device(cuda: bool, device: Optional[str]) -> str:
    if cuda and device and not device.startswith("cuda"):
        raise EvomergeError(f"--cuda conflicts with --device {device}; give one of them")
    return device or ("cuda" if cuda else "cpu")


def options(cuda: bool = False, device_name: Optional[str] = None, out_shard_size: str = "5B",
            **fields: Any):
    """merge.engine.MergeOptions from command-line values (sizes as text, e.g. 5B or 500M)."""
    from merge.engine import MergeOptions
    from merge.writer import parse_size

    return MergeOptions(device=device(cuda, device_name),
                        out_shard_size=parse_size(out_shard_size), **fields)


def run_build(out_dir: str, *, load: Callable[[], Any], plan: Callable[[Any, Any], Any],
              build: Callable[[Any, Any, Any], Any], make_options: Callable[[], Any],
              dry_run: bool = False, verbose: bool = False, target: str = "OUT_DIR") -> None:
    """make_options() and load() → (unless dry-run) refuse a non-empty OUT_DIR → plan(config,
    options), printed on --dry-run/-v → build(config, options, plan) → 'wrote OUT_DIR'.

    Every check that needs no tensor happens before anything is written.
    """
    with reporting(target):
        opts = make_options()
        config = load()
        if not dry_run:
            from merge.writer import check_output_folder

            check_output_folder(out_dir, opts.overwrite, [])
        the_plan = plan(config, opts)
        if dry_run or verbose:
            click.echo(the_plan.summary())
        if dry_run:
            return
        build(config, opts, the_plan)
    if not opts.quiet:
        click.echo(f"wrote {out_dir}")
