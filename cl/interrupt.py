"""Graceful stops: SIGINT / SIGTERM finish the current training step, then the run exits resumably.

``cl run`` installs ``GracefulStop`` around a run. The first signal only records a request; the engine checks it
after every training step and before each experience and evaluation (``Context.check_stop``; in a distributed
run every rank stops at the same step) and raises ``RunInterrupted``. Checkpoints are written after each
finished experience, so the interrupted experience is redone on ``--resume``. A second signal stops at once.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any


class RunInterrupted(KeyboardInterrupt):
    """The run stopped on request (SIGINT/SIGTERM); its last checkpoint is consistent and resumable."""

    def __init__(self, message: str, signal_name: str = "SIGINT") -> None:
        super().__init__(message)
        self.signal_name = signal_name
        self.partial: dict | None = None  # a resume point inside the experience (``Strategy.fit``), if any


class GracefulStop:
    """Context manager: the first SIGINT/SIGTERM sets ``requested`` (the signal's name), a second one raises
    ``KeyboardInterrupt`` immediately. Handlers are restored on exit; outside the main thread it does nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping now")
        self.requested = signal.Signals(signum).name

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
