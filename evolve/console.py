"""A readable console: our progress and results on the terminal, third-party chatter in a log file.

lm-eval warns on every candidate ("pretrained model kwarg is not of type str"), transformers
prints deprecations and weight-loading bars, datasets its split bars. None of it is actionable for
someone running a search, but it matters when something goes wrong, so it goes to a log file in
the storage folder (`STORAGE/logs/driver.log`, and one `worker-<pid>.log` per Ray worker) instead
of the terminal. Our own messages (click.echo, the progress bar) are untouched.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

THIRD_PARTY = ("lm_eval", "lm-eval", "transformers", "datasets", "huggingface_hub", "accelerate",
               "torch", "urllib3", "filelock", "fsspec", "evaluate", "sqlitedict", "absl")

_active: Optional[Path] = None
_handler: Optional[logging.Handler] = None


def route_third_party(log_file: Path) -> Optional[Path]:
    """Send third-party logging and Python warnings of this process to `log_file` (appended).
    Returns the file, or None when it cannot be opened (then nothing changes)."""
    global _active
    log_file = Path(log_file)
    try:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file, encoding="utf-8", delay=False)
    except OSError:
        return None
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    global _handler
    for name in THIRD_PARTY:
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            if h is _handler or (isinstance(h, logging.StreamHandler)
                                 and not isinstance(h, logging.FileHandler)):
                lg.removeHandler(h)
        lg.addHandler(handler)
        lg.propagate = False
    warn_log = logging.getLogger("py.warnings")
    warn_log.handlers = [handler]
    warn_log.propagate = False
    logging.captureWarnings(True)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    _quiet_transformers(handler)
    if _handler is not None:
        _handler.close()
    _handler = handler
    _active = log_file
    return log_file


def _quiet_transformers(handler: logging.Handler) -> None:
    """transformers keeps its own stderr handler and progress bars."""
    try:
        from transformers.utils import logging as tlog

        tlog.disable_default_handler()
        if _handler is not None:
            tlog.remove_handler(_handler)
        tlog.add_handler(handler)
        tlog.disable_progress_bar()
    except Exception:
        pass


def active_log() -> Optional[Path]:
    return _active
