"""Progress bars (rich) for anything long; silent when output is not a terminal."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import (
    Progress as RichProgress,
)

T = TypeVar("T")


class Progress:
    """Callable ``progress(iterable, total, description)`` that shows one bar per running loop."""

    def __init__(self, enabled: bool = True, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.enabled = enabled and self.console.is_terminal
        self._bars: RichProgress | None = None
        self._depth = 0

    def __call__(self, iterable: Iterable[T], total: int | None = None, description: str = "") -> Iterator[T]:
        if not self.enabled:
            yield from iterable
            return
        if self._bars is None:
            self._bars = RichProgress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TimeRemainingColumn(), console=self.console, transient=True,
            )
            self._bars.start()
        self._depth += 1
        task = self._bars.add_task(description, total=total)
        try:
            for item in iterable:
                yield item
                self._bars.advance(task)
        finally:
            self._bars.remove_task(task)
            self._depth -= 1
            if self._depth == 0:
                self._bars.stop()
                self._bars = None
