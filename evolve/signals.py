"""Clean stops: SIGTERM (a scheduler, `ray job stop`) and SIGINT end a search at once, resumable."""
from __future__ import annotations

import contextlib
import os
import signal


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGINT: the search stops at once, cleanly, resumable."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class SignalGuard:
    """SIGTERM and SIGINT raise Stopped in the main thread (Ray's own SIGTERM handler calls
    sys.exit, and the interpreter then aborts in Ray's C++ threads). A second signal while
    cleaning up is ignored, a third ends the process at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, log):
        self.log, self.count, self.saved = log, 0, {}
        self.pending = None      # a signal that arrived inside `held()`, raised on leaving it

    def install(self) -> None:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        global _ACTIVE
        for sig in self.SIGNALS:
            self.saved.setdefault(sig, signal.getsignal(sig))
            signal.signal(sig, self._handle)
        _ACTIVE = self

    def _handle(self, signum, frame):
        if _HELD.depth and self.pending is None and self.count == 0:
            self.pending = signum
            return
        self.count += 1
        if self.count == 1:
            raise Stopped(signum)
        if self.count == 2:
            self.log("still stopping (shutting the workers down); a third signal exits at once")
            return
        os._exit(128 + signum)

    def restore(self) -> None:
        global _ACTIVE
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)
        self.saved = {}
        if _ACTIVE is self:
            _ACTIVE = None


class _Held:
    depth = 0


_HELD = _Held()
_ACTIVE = None     # the installed guard, if any


@contextlib.contextmanager
def _held(guard):
    _HELD.depth += 1
    try:
        yield
    finally:
        _HELD.depth -= 1
        if not _HELD.depth and guard is not None and guard.pending is not None:
            signum, guard.pending = guard.pending, None
            guard._handle(signum, None)


def held():
    """A section a stop must not split (a record written to the history and to the search's own
    list; a state change and its checkpoint): a first signal inside it is raised as Stopped when
    the section ends. A plain section when no guard is installed."""
    return _held(_ACTIVE)
