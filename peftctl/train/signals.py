"""SIGTERM and SIGINT during training: the first asks the loop to stop after the current step (it
then writes a checkpoint and the summary); a second one stops at once.

A signal that comes within a second of the first is the same event, not a second one: a batch
system that signals a whole process group reaches each worker directly and again through the
launcher (torchrun forwards what it receives), within milliseconds.
"""

from __future__ import annotations

import os
import signal
import threading
import time

from peftctl.errors import PeftctlError

_NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}
SAME_EVENT_S = 1.0


class Interrupted(PeftctlError):
    """The run stopped on a signal; the exit code is the shell's 128 + signal number (130, 143)."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


class StopNow(BaseException):
    """Raised by the second signal. A BaseException, so that no `except Exception` swallows it."""

    def __init__(self, signum: int):
        super().__init__(_NAMES.get(signum, str(signum)))
        self.signum = signum


class StopRequest:
    """Installs the handlers while the loop runs (main thread only: signals are delivered there)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._first_at = 0.0
        self._previous: dict[int, object] = {}

    @property
    def name(self) -> str:
        return _NAMES.get(self.signum or 0, str(self.signum))

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            if time.monotonic() - self._first_at < SAME_EVENT_S:
                return
            raise StopNow(signum)
        self.signum, self._first_at = signum, time.monotonic()
        # A plain write: safe inside a handler, whatever the main thread was printing.
        os.write(2, f"\n{_NAMES.get(signum, signum)}: stopping after this step (again to stop now)\n".encode())

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in _NAMES:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
