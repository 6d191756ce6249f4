"""SIGINT and SIGTERM for a whole command: one flag that every model of a multi-model run and every point
of a sweep shares, so that a signal stops the command, not just the model being trained.

Inside a training loop (`STOP.stepping()`) a signal is noted and the loop stops after the current step,
checkpoints and says how to resume; the command then trains nothing more. Anywhere else in the command
(preparing data, the final evaluation) the signal is noted and interrupts at once, as Ctrl-C does by
default: nothing half-written is trusted there (prepared data and checkpoints are renamed into place when
complete). Either way the command exits with 128 + the signal's number (130 for SIGINT, 143 for SIGTERM),
the Unix convention, so that `pico-llm train ... && next-step` does not carry on.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Optional

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopFlag:
    """Re-entrant: the outermost `with STOP:` installs the handlers (main thread only) and clears the
    flag; inner ones share them. `signum` stays readable after the outermost exit."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._depth = 0
        self._stepping = 0
        self._old: dict = {}

    def __enter__(self) -> "StopFlag":
        if self._depth == 0:
            self.signum = None
            if threading.current_thread() is threading.main_thread():
                self._old = {s: signal.signal(s, self._handle) for s in SIGNALS}
        self._depth += 1
        return self

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        if self._depth == 0:
            for s, h in self._old.items():
                signal.signal(s, h)
            self._old = {}

    def _handle(self, signum, frame) -> None:
        first = self.signum is None
        self.signum = self.signum or signum
        if not (self._stepping and first):  # outside a loop, or a second signal: stop now
            raise KeyboardInterrupt

    @contextmanager
    def stepping(self):
        """A training loop, which checks `requested` between steps."""
        self._stepping += 1
        try:
            yield self
        finally:
            self._stepping -= 1

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> Optional[str]:
        return signal.Signals(self.signum).name if self.signum is not None else None

    def exit_status(self, default: int = 0) -> int:
        return 128 + self.signum if self.signum is not None else default


STOP = StopFlag()
