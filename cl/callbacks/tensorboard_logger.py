"""TensorBoard logger: scalars under ``RUN/tensorboard/experiences`` (step = experience) and
``RUN/tensorboard/epochs`` (step = epoch over the whole stream).

Tags: ``stream/accuracy_seen`` (and the running ``avg_incremental_accuracy``, ``avg_forgetting``,
``bwt``, cost and parameter counts), ``accuracy/exp_j``, strategy extras such as
``adapters_per_layer/<layer>``, ``events/<kind>`` counts, ``expansion/min_zscore/layer_<l>`` with
``expansion/tau``, and ``epoch/loss``.

The two step axes live in two writers so each can purge on resume: a resumed run opens its
writers with ``purge_step`` at the checkpoint, and TensorBoard hides whatever the interrupted
process logged after it, so no step shows twice. View with ``tensorboard --logdir RUN/tensorboard``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from cl.callbacks.logger import RunLogger
from cl.registry import register_logger


@register_logger("tensorboard")
class TensorBoardLogger(RunLogger):
    """TensorBoard scalars per experience and per epoch under RUN/tensorboard/."""

    name = "tensorboard"

    def __init__(self, run_dir: str | Path | None = None, config: dict[str, Any] | None = None) -> None:
        super().__init__(run_dir, config)
        self.dir = self.run_dir / "tensorboard"
        self.writers: dict[str, Any] = {}
        self._experiences_done = 0

    def before_run(self, agent: Any, stream: Any) -> None:
        self._experiences_done = len(agent.seen)
        super().before_run(agent, stream)

    def _open(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        purge = {"experiences": self._experiences_done, "epochs": self.epoch_step} if self.resumed else {}
        for axis in ("experiences", "epochs"):
            self.writers[axis] = SummaryWriter(str(self.dir / axis), purge_step=purge.get(axis), flush_secs=30)
        if not self.resumed and self.config:
            text = "```\n" + yaml.safe_dump(self.config, sort_keys=False) + "```"
            self.writers["experiences"].add_text("config", text, 0)

    def _log_epoch(self, step: int, record: dict[str, float]) -> None:
        w = self.writers["epochs"]
        for key, value in record.items():
            w.add_scalar(f"epoch/{key}", value, step)
        w.flush()  # epochs are few and slow: show each at once, and keep it if the process dies

    def _log_experience(self, step: int, record: dict[str, float], agent: Any) -> None:
        w = self.writers["experiences"]
        for key, value in record.items():  # TensorBoard sections by the tag's first part
            w.add_scalar(key if "/" in key else f"stream/{key}", value, step)
        for e in self.events:  # the decision statistic of this experience's expansion checks
            if e.get("experience") == record.get("experience_id") and e["kind"] in ("expansion", "reuse"):
                z = e.get("zscores") or {}
                if z and e.get("layer") is not None:
                    w.add_scalar(f"expansion/min_zscore/layer_{e['layer']}", min(z.values()), step)
                    w.add_scalar("expansion/tau", float(e.get("tau", 0.0)), step)
        for writer in self.writers.values():
            writer.flush()

    def _finish(self, summary: dict[str, float]) -> None:
        w = self.writers["experiences"]
        text = "\n".join(f"| {k} | {v:.6g} |" for k, v in summary.items())
        if text:
            w.add_text("summary", "| metric | value |\n|---|---|\n" + text, 0)

    def _close(self) -> None:
        for w in self.writers.values():
            w.close()
        self.writers = {}
