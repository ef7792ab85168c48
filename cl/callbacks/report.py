"""The dashboard as a callback: ``RUN/report.html`` rewritten after every experience and at the end.

Open it while the run goes on (it says "in progress" until the last experience); ``cl run`` adds it
unless ``--no-report`` is given. Rendering takes about a second; a failure only warns.
"""

from __future__ import annotations

from typing import Any

from cl.callbacks.logger import RunLogger
from cl.registry import register_logger


@register_logger("report")
class ReportWriter(RunLogger):
    """The HTML dashboard RUN/report.html (cl report), refreshed after each experience."""

    name = "report"

    @property
    def path(self):
        return self.run_dir / "report.html"

    def _write(self) -> None:
        from cl.report import write_report

        write_report([self.run_dir], self.path)

    def _log_experience(self, step: int, record: dict[str, float], agent: Any) -> None:
        self._write()

    def _finish(self, summary: dict[str, float]) -> None:
        self._write()
