"""Where an experience's time goes: wall and CPU seconds per named phase (cache fill, training, evaluation, ...).

The engine and strategies mark phases with ``ctx.phase(name)``; the time of a phase started inside another counts
to the inner one only (exclusive), so the phases of an experience add up to its time. A phase of the same kind
(the part of the name before ``": "``) refines it: a strategy names a training loop ``"train: layer 13"``, and the
loop's own bare ``"train"`` inside it adds to that phase instead of starting another. ``MetricsCallback``
writes each experience's phases to ``metrics.json`` (``phase_time_s``, ``phase_cpu_s``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


def kind_of(name: str) -> str:
    """The kind of a phase: its name up to ``": "`` (``"train: layer 13"`` -> ``"train"``)."""
    return name.split(": ", 1)[0]


class PhaseClock:
    """Exclusive wall (``time.perf_counter``) and process CPU (``time.process_time``, every thread) seconds per
    phase since the last ``reset``."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._stack: list[list] = []  # [name, wall at (re)start, cpu at (re)start]

    def _stop_top(self, wall: float, cpu: float) -> None:
        name, w0, c0 = self._stack[-1]
        self.wall[name] = self.wall.get(name, 0.0) + wall - w0
        self.cpu[name] = self.cpu.get(name, 0.0) + cpu - c0

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Count the time inside the block to phase ``name`` (see the module docstring for nesting)."""
        if self._stack and name == kind_of(self._stack[-1][0]):  # a bare kind inside a phase of that kind
            yield
            return
        wall, cpu = time.perf_counter(), time.process_time()
        if self._stack:
            self._stop_top(wall, cpu)
        self._stack.append([name, wall, cpu])
        try:
            yield
        finally:
            wall, cpu = time.perf_counter(), time.process_time()
            self._stop_top(wall, cpu)
            self._stack.pop()
            if self._stack:
                self._stack[-1][1:] = [wall, cpu]

    def reset(self) -> None:
        """Forget the phases measured so far (a phase running now keeps counting from here)."""
        self.wall, self.cpu = {}, {}
        wall, cpu = time.perf_counter(), time.process_time()
        for entry in self._stack:
            entry[1:] = [wall, cpu]

    def totals(self, digits: int = 3) -> tuple[dict[str, float], dict[str, float]]:
        """(wall, cpu) seconds per phase so far, rounded; a running phase counts up to now."""
        wall, cpu = dict(self.wall), dict(self.cpu)
        if self._stack:
            name, w0, c0 = self._stack[-1]
            wall[name] = wall.get(name, 0.0) + time.perf_counter() - w0
            cpu[name] = cpu.get(name, 0.0) + time.process_time() - c0
        return ({k: round(v, digits) for k, v in wall.items()}, {k: round(v, digits) for k, v in cpu.items()})
