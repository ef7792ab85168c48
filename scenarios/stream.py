"""``Experience`` and ``Stream``: what a strategy learns from, one experience at a time."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch.utils.data import Dataset


@dataclass
class Experience:
    """One step of a stream: its train and test data, the classes it holds, and its position.

    ``classes`` are global class ids (labels in ``train``/``test`` are global too).
    ``task_label`` is the task id given at test time in task-incremental streams (else 0);
    ``domain`` names the input distribution in domain-incremental streams.
    """

    id: int
    train: Dataset
    test: Dataset
    classes: list[int]
    task_label: int = 0
    domain: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        return (
            f"Experience(id={self.id}, classes={self.classes}, train={len(self.train)}, "
            f"test={len(self.test)}, task_label={self.task_label})"
        )


@dataclass
class Stream:
    """An ordered list of experiences plus what describes the whole stream.

    ``kind`` is ``"class"``, ``"task"`` or ``"domain"`` incremental; ``class_names`` maps
    global class ids to names where known.
    """

    experiences: list[Experience]
    kind: str = "class"
    name: str = "stream"
    class_names: Sequence[str] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __iter__(self) -> Iterator[Experience]:
        return iter(self.experiences)

    def __len__(self) -> int:
        return len(self.experiences)

    def __getitem__(self, i: int) -> Experience:
        return self.experiences[i]

    @property
    def classes(self) -> list[int]:
        """All class ids of the stream, in the order they appear."""
        seen: dict[int, None] = {}
        for e in self.experiences:
            seen.update(dict.fromkeys(e.classes))
        return list(seen)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def seen(self, upto: int) -> list[Experience]:
        """Experiences ``0..upto`` inclusive."""
        return self.experiences[: upto + 1]

    @property
    def task_aware(self) -> bool:
        """True when the task label is available at test time."""
        return self.kind == "task"
