"""Weights & Biases logger: config, per-experience metrics, the accuracy matrix and adapter-pool events.

Offline unless told otherwise: the mode is ``$WANDB_MODE`` (``cl`` sets ``offline`` when it is
unset), so nothing leaves the machine until ``WANDB_MODE=online`` or ``wandb sync RUN/wandb/offline-run-*``.
The W&B run lives in ``RUN/wandb/``; its id travels in the checkpoint, so a resumed run logs into
the same W&B run. Project, entity and tags come from the usual ``WANDB_PROJECT``/``WANDB_ENTITY``/
``WANDB_TAGS`` variables (project defaults to ``clagent``); runs of one config that differ only in
seed share a W&B group.
"""

from __future__ import annotations

import json
import os
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
        self.run: Any = None
        self.run_id: str | None = None

    def _open(self) -> None:
        import wandb
        from wandb.sdk.lib.runid import generate_id

        self.run_id = self.run_id or generate_id()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tags = [t for t in os.environ.get("WANDB_TAGS", "").split(",") if t]
        tags += [str(self.config.get("strategy", {}).get("name", ""))]
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or "clagent", entity=os.environ.get("WANDB_ENTITY") or None,
            dir=str(self.run_dir), id=self.run_id, name=self.run_dir.name, group=seed_group(self.config),
            config=self.config, allow_val_change=True, tags=[t for t in tags if t], resume="allow", reinit="create_new",
            mode=os.environ.get("WANDB_MODE") or "offline",
            settings=wandb.Settings(console="off", silent=True, x_disable_stats=True),
        )
        self.run.define_metric("experience")
        self.run.define_metric("experience/*", step_metric="experience")
        self.run.define_metric("epoch")
        self.run.define_metric("epoch/*", step_metric="epoch")

    def _log_epoch(self, step: int, record: dict[str, float]) -> None:
        self.run.log({"epoch": step, **{f"epoch/{k}": v for k, v in record.items()}})

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
        self.run.log(data)

    def _finish(self, summary: dict[str, float]) -> None:
        for k, v in summary.items():
            self.run.summary[k] = v

    def _close(self) -> None:
        if self.run is not None:
            run, self.run = self.run, None
            run.finish()
            _wait_for_wandb_files()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "run_id": self.run_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.run_id = state.get("run_id")


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


def _event_row(e: dict[str, Any]) -> list[Any]:
    z = e.get("zscores") or {}
    zmin = min(z.values()) if isinstance(z, dict) and z else None
    return [e.get("experience"), e.get("kind"), e.get("layer"), e.get("adapter"), e.get("adapters"), e.get("tau"),
            zmin, json.dumps(z)]
