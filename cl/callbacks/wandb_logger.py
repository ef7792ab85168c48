"""Weights & Biases logger: config, per-experience metrics, the accuracy matrix and adapter-pool events.

Offline unless told otherwise: the mode is ``$WANDB_MODE`` (``cl`` sets ``offline`` when it is
unset), so nothing leaves the machine until ``WANDB_MODE=online`` or ``wandb sync RUN/wandb/offline-run-*``.
The W&B run lives in ``RUN/wandb/``; its id travels in the checkpoint, so a resumed run logs into
the same W&B run. Project, entity and tags come from the usual ``WANDB_PROJECT``/``WANDB_ENTITY``/
``WANDB_TAGS`` variables (project defaults to ``clagent``); runs of one config that differ only in
seed share a W&B group.

wandb's service process (``wandb-core``) keeps an offline run's rows in memory and writes them to
``run-<id>.wandb`` only when a 32 KiB block fills, every 15 s, or when the run's stream closes,
which happens after ``run.finish()`` returns; a SIGKILL loses what it holds. So every row is also
appended to ``RUN/wandb/history.jsonl`` (flushed per row, cut back to the checkpoint on resume like
``epochs.csv``), and an offline run that resumes replays it into a new ``offline-run-*`` directory,
moving the directories of earlier processes to ``RUN/wandb/superseded/``: the one left holds every
row exactly once.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from cl.callbacks.logger import RunLogger
from cl.registry import register_logger

EVENT_COLUMNS = ["experience", "kind", "layer", "adapter", "adapters", "tau", "min_zscore", "zscores"]


def seed_group(config: dict[str, Any]) -> str:
    """A W&B group name shared by runs that differ only in seed."""
    parts = [str(config.get(k, {}).get("name", "?")) for k in ("scenario", "strategy", "backbone")]
    return "-".join(parts)


@register_logger("wandb")
class WandbLogger(RunLogger):
    """Weights & Biases (offline by default): config, metrics per experience, matrix and event tables."""

    name = "wandb"

    def __init__(self, run_dir: str | Path | None = None, config: dict[str, Any] | None = None) -> None:
        super().__init__(run_dir, config)
        self.dir = self.run_dir / "wandb"
        self.run: Any = None
        self.run_id: str | None = None
        self._journal: Any = None
        # journal size at the checkpoint; None when resumed from a checkpoint written before the journal existed
        self._journal_offset: int | None = 0

    @property
    def journal_path(self) -> Path:
        return self.dir / "history.jsonl"

    def _open(self) -> None:
        import wandb
        from wandb.sdk.lib.runid import generate_id

        self.run_id = self.run_id or generate_id()
        mode = os.environ.get("WANDB_MODE") or "offline"
        self.dir.mkdir(parents=True, exist_ok=True)
        rows = self._restart_journal()
        replay = mode == "offline" and rows is not None
        if replay:
            self._supersede_offline_runs()
        tags = [t for t in os.environ.get("WANDB_TAGS", "").split(",") if t]
        tags += [str(self.config.get("strategy", {}).get("name", ""))]
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or "clagent", entity=os.environ.get("WANDB_ENTITY") or None,
            dir=str(self.run_dir), id=self.run_id, name=self.run_dir.name, group=seed_group(self.config),
            config=self.config, allow_val_change=True, tags=[t for t in tags if t], resume="allow", reinit="create_new",
            mode=mode, settings=wandb.Settings(console="off", silent=True, x_disable_stats=True),
        )
        self.run.define_metric("experience")
        self.run.define_metric("experience/*", step_metric="experience")
        self.run.define_metric("epoch")
        self.run.define_metric("epoch/*", step_metric="epoch")
        if replay:
            for row in rows:
                self.run.log(_from_journal(row))

    def _restart_journal(self) -> list[dict[str, Any]] | None:
        """Cut ``history.jsonl`` back to the checkpoint (to nothing for a fresh run) and open it for appending.

        Returns the rows it keeps, or None when it does not hold every row up to the checkpoint (a checkpoint
        older than the journal, or a journal shorter than it was then): such a journal is never replayed.
        """
        keep = self._journal_offset if self.resumed else 0
        data = b""
        if self.journal_path.exists():
            with open(self.journal_path, "r+b") as f:
                data = f.read(keep or 0)
                f.truncate(len(data))
        self._journal = open(self.journal_path, "a", encoding="utf-8")
        if keep is None or len(data) < keep:
            self._journal_offset = None
            return None
        return [json.loads(line) for line in data.decode("utf-8").splitlines()]

    def _supersede_offline_runs(self) -> None:
        """Move the offline runs of earlier processes out of ``RUN/wandb/``: the journal replaces them."""
        old = sorted(p for p in self.dir.glob("offline-run-*") if p.is_dir())
        for p in old:
            dest = self.dir / "superseded" / p.name
            dest.parent.mkdir(exist_ok=True)
            n = 0
            while dest.exists():
                n += 1
                dest = dest.with_name(f"{p.name}.{n}")
            p.rename(dest)

    def _log(self, data: dict[str, Any]) -> None:
        """One W&B row: first to the journal (a whole line, flushed), then to the run. Its wall time travels with
        it, so a replayed row keeps the time it was logged at."""
        import wandb

        data = {"_timestamp": time.time(), **data}
        entry = {k: (_table_json(v) if isinstance(v, wandb.Table) else v) for k, v in data.items()}
        self._journal.write(json.dumps(entry) + "\n")
        self._journal.flush()
        self.run.log(data)

    def _log_epoch(self, step: int, record: dict[str, float]) -> None:
        self._log({"epoch": step, **{f"epoch/{k}": v for k, v in record.items()}})

    def _log_experience(self, step: int, record: dict[str, float], agent: Any) -> None:
        import wandb

        data: dict[str, Any] = {"experience": step, **{f"experience/{k}": v for k, v in record.items()}}
        rows = self.accuracy_rows(agent)
        if rows:
            n = max(len(r) for r in rows)
            cols = ["after_experience", *[f"exp_{j}" for j in range(n)]]
            data["accuracy_matrix"] = wandb.Table(
                columns=cols, data=[[i, *r, *[None] * (n - len(r))] for i, r in enumerate(rows)]
            )
        if self.events:
            data["adapter_events"] = wandb.Table(columns=EVENT_COLUMNS, data=[_event_row(e) for e in self.events])
        self._log(data)

    def _finish(self, summary: dict[str, float]) -> None:
        for k, v in summary.items():
            self.run.summary[k] = v

    def _close(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        if self.run is not None:
            run, self.run = self.run, None
            run.finish()
            _wait_for_wandb_files()

    def state_dict(self) -> dict[str, Any]:
        offset = None
        if self._journal_offset is not None:
            if self._journal is not None:
                self._journal.flush()
                os.fsync(self._journal.fileno())
            offset = self.journal_path.stat().st_size if self.journal_path.exists() else 0
        return {**super().state_dict(), "run_id": self.run_id, "journal_offset": offset}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.run_id = state.get("run_id")
        self._journal_offset = state.get("journal_offset")


def _wait_for_wandb_files() -> None:
    """Block until wandb-core has written the finished run's files.

    ``run.finish()`` returns before the service closes the run's stream, and only that close writes the
    rows it still buffers to ``run-<id>.wandb``. Tearing the service down waits for it to exit, having
    closed every stream; skipped while another W&B run of this process is still active.
    """
    import wandb
    from wandb.sdk import wandb_setup

    if wandb_setup.singleton().most_recent_active_run is not None:
        return
    try:
        wandb.teardown()
    except SystemExit as e:  # wandb exits the process when its service failed; a logger only reports it
        raise RuntimeError(f"the W&B service exited with code {e.code}") from None


def _table_json(table: Any) -> dict[str, Any]:
    return {"_table": {"columns": list(table.columns), "data": [list(r) for r in table.data]}}


def _from_journal(row: dict[str, Any]) -> dict[str, Any]:
    import wandb

    return {k: (wandb.Table(**v["_table"]) if isinstance(v, dict) and "_table" in v else v) for k, v in row.items()}


def _event_row(e: dict[str, Any]) -> list[Any]:
    z = e.get("zscores") or {}
    zmin = min(z.values()) if isinstance(z, dict) and z else None
    return [e.get("experience"), e.get("kind"), e.get("layer"), e.get("adapter"), e.get("adapters"), e.get("tau"),
            zmin, json.dumps(z)]
