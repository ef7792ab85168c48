"""The dashboard as a callback: ``RUN/report.html`` written at the end of the run and refreshed as it goes.

Open it while a long run goes on (it says "in progress" until the last experience). Rendering takes
about a second, so a mid-run refresh happens only after an experience when the time since the last
one is at least ``10x`` what the last rendering took (at most ~10% overhead; a fast toy run renders
once, at the end). ``cl run`` adds this callback unless ``--no-report`` is given; a failure only warns.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from cl.callbacks.logger import RunLogger
from cl.registry import register_logger

OVERHEAD = 0.1  # at most this share of the run's time goes to mid-run refreshes


@register_logger("report")
class ReportWriter(RunLogger):
    """The HTML dashboard RUN/report.html (cl report), refreshed during the run and written at its end."""

    name = "report"

    def __init__(self, run_dir: str | Path | None = None, config: dict[str, Any] | None = None) -> None:
        super().__init__(run_dir, config)
        self._last_end = time.perf_counter()
        self._last_cost = 1.0  # seconds; a first guess until a rendering is timed

    @property
    def path(self) -> Path:
        return self.run_dir / "report.html"

    def _write(self) -> None:
        from cl.report import write_report

        start = time.perf_counter()
        write_report([self.run_dir], self.path)
        self._last_end = time.perf_counter()
        self._last_cost = self._last_end - start

    def _open(self) -> None:
        self._last_end = time.perf_counter()

    def _log_experience(self, step: int, record: dict[str, float], agent: Any) -> None:
        if time.perf_counter() - self._last_end >= self._last_cost / OVERHEAD:
            self._write()

    def _finish(self, summary: dict[str, float]) -> None:
        self._write()
