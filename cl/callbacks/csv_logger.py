"""CSV logger: ``RUN/csv/experiences.csv`` (a row per experience) and ``RUN/csv/epochs.csv`` (a row per epoch).

``experiences.csv`` is rewritten atomically after each experience from the rows held in the
checkpoint, so its columns can grow (a strategy that adds layers or event kinds later) and a
resumed run never repeats a row. ``epochs.csv`` is appended per epoch and cut back to its size at
the last checkpoint on resume, as ``events.jsonl`` is.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

from cl.callbacks.logger import RunLogger
from cl.registry import register_logger

FIRST_COLUMNS = ["step", "experience_id", "accuracy_seen", "avg_incremental_accuracy", "avg_forgetting", "bwt"]


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


@register_logger("csv")
class CSVLogger(RunLogger):
    """Per-experience and per-epoch metrics as CSV files under RUN/csv/."""

    name = "csv"

    def __init__(self, run_dir: str | Path | None = None, config: dict[str, Any] | None = None) -> None:
        super().__init__(run_dir, config)
        self.dir = self.run_dir / "csv"
        self.rows: list[dict[str, float]] = []
        self._epoch_file: Any = None
        self._epoch_columns: list[str] | None = None
        self._epoch_offset = 0

    @property
    def experiences_path(self) -> Path:
        return self.dir / "experiences.csv"

    @property
    def epochs_path(self) -> Path:
        return self.dir / "epochs.csv"

    def _open(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.resumed:  # drop epochs logged after the checkpoint; rewrite the experience rows it holds
            if self.epochs_path.exists():
                with open(self.epochs_path, "r+b") as f:
                    f.truncate(self._epoch_offset)
            self._write_experiences()
        else:
            for p in (self.epochs_path, self.experiences_path):
                p.unlink(missing_ok=True)
        if self.epochs_path.exists() and self.epochs_path.stat().st_size:
            with open(self.epochs_path, encoding="utf-8") as f:
                self._epoch_columns = next(csv.reader(f), None)
        self._epoch_file = open(self.epochs_path, "a", encoding="utf-8", newline="")

    def _log_epoch(self, step: int, record: dict[str, float]) -> None:
        row = {"step": step, **record}
        writer_needs_header = self._epoch_columns is None
        if self._epoch_columns is None:
            self._epoch_columns = list(row)
        w = csv.DictWriter(self._epoch_file, self._epoch_columns, extrasaction="ignore")
        if writer_needs_header:
            w.writeheader()
        w.writerow(row)
        self._epoch_file.flush()

    def _log_experience(self, step: int, record: dict[str, float], agent: Any) -> None:
        self.rows.append({"step": step, **record})
        self._write_experiences()

    def _write_experiences(self) -> None:
        keys = list(dict.fromkeys(k for r in self.rows for k in r))
        accuracy = sorted((k for k in keys if k.startswith("accuracy/exp_")), key=lambda k: int(k.rsplit("_", 1)[1]))
        columns = [c for c in FIRST_COLUMNS if c in keys] + accuracy
        columns += [k for k in keys if k not in columns]
        buf = io.StringIO()
        w = csv.DictWriter(buf, columns, lineterminator="\n")
        w.writeheader()
        w.writerows(self.rows)
        _write_atomic(self.experiences_path, buf.getvalue())

    def _close(self) -> None:
        if self._epoch_file is not None:
            self._epoch_file.close()
            self._epoch_file = None

    def state_dict(self) -> dict[str, Any]:
        if self._epoch_file is not None:
            self._epoch_file.flush()
        offset = self.epochs_path.stat().st_size if self.epochs_path.exists() else 0
        return {**super().state_dict(), "rows": self.rows, "epoch_offset": offset}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.rows = [dict(r) for r in state.get("rows", [])]
        self._epoch_offset = int(state.get("epoch_offset", 0))
