"""Run many merge configs through one tool's `mergekit-yaml` in a single Python process.

    python batch.py reference|ours JOBS.json RESULTS.json

JOBS.json is a list of {"id", "config", "out", "seed"}. Each job goes through the tool's own
command-line entry point (the same click command the console script runs, arguments and all), so
what is compared is what a user gets from `mergekit-yaml CONFIG OUT --random-seed N`; only the
interpreter start-up and imports are shared between jobs. RESULTS.json maps each id to
{"ok", "error", "seconds"}.

This file runs under the reference's own virtual environment too: it imports nothing from this
repository, and it imports a tool only when asked to drive it.
"""
from __future__ import annotations

import contextlib
import io
import json
import sys
import time
import traceback


def _reference_command():
    from mergekit.scripts.run_yaml import main

    return main


def _our_command():
    from merge.cli import cli

    return cli


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    return (errors or lines or ["(no message)"])[-1][:400]


def run_job(command, job: dict) -> dict:
    args = [job["config"], job["out"], "--random-seed", str(job["seed"]), "--quiet"]
    stderr = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stderr(stderr):
            command.main(args=args, prog_name="mergekit-yaml", standalone_mode=False)
        ok, error = True, ""
    except SystemExit as e:  # our CLI reports a refused config as one line and exit 2
        ok = e.code in (0, None)
        error = "" if ok else f"exit {e.code}: {_last_line(stderr.getvalue())}"
    except Exception as e:  # noqa: BLE001 - a crash or a refusal of either tool is a result here
        ok = False
        tb = traceback.extract_tb(e.__traceback__)[-1]
        error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}" \
                f" (at {tb.filename.rsplit('/', 2)[-2:]}:{tb.lineno})"
    return {"ok": ok, "error": error, "seconds": round(time.perf_counter() - start, 3)}


def main() -> None:
    tool, jobs_file, results_file = sys.argv[1:4]
    command = _reference_command() if tool == "reference" else _our_command()
    with open(jobs_file) as f:
        jobs = json.load(f)
    results = {}
    for job in jobs:
        results[job["id"]] = run_job(command, job)
        with open(results_file, "w") as f:  # rewritten after every job: a crash keeps the rest
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
