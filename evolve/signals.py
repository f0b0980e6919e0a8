"""Clean stops: SIGTERM (a scheduler, `ray job stop`) and SIGINT end a search at once, resumable."""
from __future__ import annotations

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

    def install(self) -> None:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        for sig in self.SIGNALS:
            self.saved.setdefault(sig, signal.getsignal(sig))
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.count += 1
        if self.count == 1:
            raise Stopped(signum)
        if self.count == 2:
            self.log("still stopping (shutting the workers down); a third signal exits at once")
            return
        os._exit(128 + signum)

    def restore(self) -> None:
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)
        self.saved = {}
