"""Progress bars (rich) for anything long; silent when output is not a terminal."""

from __future__ import annotations

import contextlib
import contextvars
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
_LIBRARY_BARS: contextvars.ContextVar[bool | None] = contextvars.ContextVar("library_bars", default=None)


@contextlib.contextmanager
def library_bars(enabled: bool) -> Iterator[None]:
    """Within the block, the progress bars of the libraries clagent calls (transformers' "Loading weights") show only
    when ``enabled`` (an agent's ``progress``); outside any block, only when stderr is a terminal."""
    token = _LIBRARY_BARS.set(bool(enabled))
    try:
        yield
    finally:
        _LIBRARY_BARS.reset(token)


def library_bars_enabled() -> bool:
    """Whether a library called now may draw its own progress bars (``library_bars``)."""
    enabled = _LIBRARY_BARS.get()
    return Console(stderr=True).is_terminal if enabled is None else enabled


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
