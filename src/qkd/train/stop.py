"""Graceful stop: Ctrl-C (SIGINT) or SIGTERM asks the trainer to save and stop at the next step boundary.

A second Ctrl-C stops at once (the last saved checkpoint stays intact: files are replaced atomically).
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Set by a signal; the training loop polls it (``bool(request)``) between steps."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __bool__(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGINT)

    @property
    def name(self) -> str:
        return "Ctrl-C" if self.signum in (None, signal.SIGINT) else signal.Signals(self.signum).name

    def _handle(self, signum: int, frame) -> None:
        if self and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        self.signum = signum
        # not logging: a handler may run while the logging lock is held
        sys.stderr.write(f"\n{self.name}: saving at the next step and stopping (Ctrl-C again to stop at once)\n")

    @contextmanager
    def installed(self) -> Iterator[StopRequest]:
        """Catch SIGINT and SIGTERM while training (only the main thread can; elsewhere this does nothing)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        before = {s: signal.getsignal(s) for s in _SIGNALS}
        for s in _SIGNALS:
            signal.signal(s, self._handle)
        try:
            yield self
        finally:
            for s, handler in before.items():
                signal.signal(s, handler)
