"""``Experience`` and ``Stream``: what a strategy learns from, one experience at a time.

The data contract between the engine and the streams: ``scenarios`` builds ``Stream``s of these (and re-exports
them), the engine and every strategy consume them; nothing here knows a dataset source.
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch.utils.data import Dataset

from cl.data import known_targets
from cl.errors import ConfigError, DataError

KINDS: tuple[str, ...] = ("class", "task", "domain")
"""How experiences relate: disjoint classes, tasks known at test time, or one label space in new domains."""


@dataclass
class Experience:
    """One step of a stream: its train and test data, the classes it holds, and its position.

    ``classes`` are global class ids (labels in ``train``/``test`` are global too).
    ``task_label`` is the task id given at test time in task-incremental streams (else 0);
    ``domain`` names the input distribution in domain-incremental streams.

    Construction checks what is cheap to check: ``classes`` are distinct ints >= 0, ``train`` has items,
    and where a dataset exposes ``targets`` (every dataset of ``scenarios`` does) its labels are among
    ``classes``; a violation raises ``DataError``. ``train``/``test`` may be None for an experience that
    only describes its classes.
    """

    id: int
    train: Dataset
    test: Dataset
    classes: list[int]
    task_label: int = 0
    domain: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.id = _as_int(self.id, "experience id")
        where = f"experience {self.id}"
        if isinstance(self.classes, (str, bytes)) or not isinstance(self.classes, Iterable):
            raise DataError(f"{where}: classes must be a list of class ids, got {self.classes!r}")
        classes = [_as_int(c, f"{where}: a class id") for c in self.classes]
        if not classes:
            raise DataError(f"{where} has no classes: list the class ids it holds")
        bad = sorted({c for c, n in Counter(classes).items() if c < 0 or n > 1})
        if bad:
            raise DataError(f"{where}: classes must be distinct ids >= 0, got {classes} (bad: {bad})")
        self.classes = classes
        if self.train is not None and len(self.train) == 0:
            raise DataError(f"{where} (classes {classes}) has no training items: drop it or give it data")
        for part in ("train", "test"):
            targets = known_targets(getattr(self, part))
            extra = sorted(set(targets.unique().tolist()) - set(classes)) if targets is not None else []
            if extra:
                raise DataError(
                    f"{where}: its {part} set has labels {extra[:10]} that are not among its classes {classes}; "
                    "add them to classes or drop those items"
                )

    def __repr__(self) -> str:
        sizes = {k: len(v) if v is not None else None for k, v in (("train", self.train), ("test", self.test))}
        return (
            f"Experience(id={self.id}, classes={self.classes}, train={sizes['train']}, "
            f"test={sizes['test']}, task_label={self.task_label})"
        )


def _as_int(value: Any, what: str) -> int:
    """``value`` as an int (numpy and torch integer scalars too); anything else raises DataError."""
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise DataError(f"{what} must be an int, got {value!r}") from None


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

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"unknown stream kind {self.kind!r} (choose one of {', '.join(KINDS)})")
        self.experiences = list(self.experiences)
        if not self.experiences:
            raise DataError(f"stream {self.name!r} has no experiences")
        not_exp = [type(e).__name__ for e in self.experiences if not isinstance(e, Experience)]
        if not_exp:
            raise DataError(f"stream {self.name!r} holds {not_exp[0]} items; it takes a list of Experience")
        ids = [e.id for e in self.experiences]
        if len(set(ids)) != len(ids):
            raise DataError(f"stream {self.name!r}: experience ids {ids} repeat; give each experience its own id")
        if self.kind == "class":
            first: dict[int, int] = {}
            for e in self.experiences:
                for c in e.classes:
                    if first.setdefault(c, e.id) != e.id:
                        raise DataError(
                            f"stream {self.name!r}: class {c} is in experience {first[c]} and in experience {e.id}; "
                            "a class-incremental stream gives each class to one experience "
                            "(use kind='domain' when classes recur)"
                        )

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
