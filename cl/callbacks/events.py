"""The event journal: ``RUN/events.jsonl``, one JSON object a line, flushed per event."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from cl.callbacks.base import Callback


def _jsonable(x: Any) -> Any:
    if hasattr(x, "tolist"):
        return x.tolist()
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


class EventLog(Callback):
    """Appends strategy events and run milestones to ``events.jsonl``.

    Its state is the file size at the last checkpoint: a resumed run truncates the events written
    after that point (a run killed before its first checkpoint starts the file again), so the journal of a
    resumed run equals an uninterrupted one: each experience starts and ends once.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = None
        self.experience: int | None = None
        self.restored = False  # load_state_dict was called: the file is cut back to the checkpoint

    def _write(self, kind: str, data: dict[str, Any]) -> None:
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")
        rec = {"t": round(time.time(), 3), "experience": self.experience, "kind": kind, **_jsonable(data)}
        self._file.write(json.dumps(rec) + "\n")
        self._file.flush()

    def before_run(self, agent: Any, stream: Any) -> None:
        if not self.restored:  # a fresh run: drop the events of an earlier attempt that reached no checkpoint
            self._truncate(0)

    def before_experience(self, agent: Any, exp: Any) -> None:
        self.experience = exp.id
        self._write("experience_start", {"classes": exp.classes})

    def after_epoch(self, agent: Any, exp: Any, epoch: int, logs: dict[str, float]) -> None:
        self._write("epoch", {"epoch": epoch, **logs})

    def after_eval(self, agent: Any, exps: list[Any], results: dict[str, Any]) -> None:
        self._write("eval", {"accuracy": results["accuracy"], "accuracy_seen": results["accuracy_seen"]})

    def after_experience(self, agent: Any, exp: Any) -> None:
        self._write("experience_end", {})

    def on_event(self, agent: Any, kind: str, data: dict[str, Any]) -> None:
        self._write(kind, data)

    def after_run(self, agent: Any) -> None:
        self._write("run_end", {})
        self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def state_dict(self) -> dict[str, Any]:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
        return {"offset": self.path.stat().st_size if self.path.exists() else 0, "experience": self.experience}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.restored = True
        self.experience = state.get("experience")  # what later events (run_end) are stamped with
        self._truncate(state.get("offset", 0))

    def _truncate(self, offset: int) -> None:
        self.close()
        if self.path.exists():
            with open(self.path, "r+b") as f:
                f.truncate(offset)
