"""Base of the loggers that write outside the console (csv, tensorboard, wandb).

A ``RunLogger`` turns the engine's hooks into two streams of flat records: one per epoch (global
epoch step over the whole stream) and one per experience (step = position in the stream). Its
steps travel in the checkpoint, so a resumed run continues them instead of starting over. A
backend that fails (missing package, no network, full disk) is switched off with a warning: a
logger never stops a run.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cl.callbacks.base import Callback
from cl.callbacks.events import _jsonable


class LoggerWarning(RuntimeWarning):
    """A logger backend failed and was switched off; the run goes on without it."""


# event kinds that describe the adapter pool and routing; other events are counted only
POOL_EVENTS = ("expansion", "reuse", "route", "retrieval", "adapted", "merge")


def flatten(prefix: str, value: Any, out: dict[str, float]) -> None:
    """Numbers (and dicts of numbers) under ``prefix/key``; strings and lists are skipped."""
    if isinstance(value, bool):
        out[prefix] = int(value)
    elif isinstance(value, (int, float)):
        out[prefix] = value
    elif isinstance(value, dict):
        for k, v in value.items():
            flatten(f"{prefix}/{k}", v, out)


class RunLogger(Callback):
    """Common state of the file-backed loggers; subclasses implement the ``_open``/``_log_*``/``_close`` hooks.

    Args:
        run_dir: the run directory (``cl run`` passes it); files go under ``run_dir/<name>``.
        config: the resolved run config as plain data (logged where the backend has a place for it).
    """

    name = "logger"

    def __init__(self, run_dir: str | Path | None = None, config: dict[str, Any] | None = None) -> None:
        self.run_dir = Path(run_dir) if run_dir is not None else Path("runs") / "untitled"
        self.config = dict(config or {})
        self.enabled = True
        self.opened = False
        self.resumed = False  # load_state_dict was called: continue the steps of an earlier process
        self.epoch_step = 0  # epochs logged over the whole stream; experiences are stepped by stream position
        self.n_experiences: int | None = None
        self.events: list[dict[str, Any]] = []  # pool events of the stream so far (for tables)
        self._exp_events: dict[str, int] = {}
        self._last_eval: dict[str, Any] | None = None

    # ---- backend hooks (override) ---------------------------------------------------------
    def _open(self) -> None: ...
    def _log_epoch(self, step: int, record: dict[str, float]) -> None: ...
    def _log_experience(self, step: int, record: dict[str, float], agent: Any) -> None: ...
    def _finish(self, summary: dict[str, float]) -> None: ...
    def _close(self) -> None: ...

    # ---- guarded calls --------------------------------------------------------------------
    def _guard(self, what: str, fn: Callable[..., None], *args: Any) -> None:
        if not self.enabled:
            return
        try:
            fn(*args)
        except Exception as e:  # a logger must never stop a run
            self.enabled = False
            warnings.warn(
                f"{self.name} logger switched off: {what} failed ({type(e).__name__}: {e}); "
                "the run goes on without it",
                LoggerWarning, stacklevel=2,
            )
            try:
                self._close()
            except Exception:
                pass

    def _ensure_open(self) -> None:
        if not self.opened:
            self.opened = True
            self._guard("opening the backend", self._open)

    # ---- engine hooks ---------------------------------------------------------------------
    def before_run(self, agent: Any, stream: Any) -> None:
        self.n_experiences = len(stream)
        self._ensure_open()

    def before_experience(self, agent: Any, exp: Any) -> None:
        self._ensure_open()
        self._exp_events = {}

    def after_epoch(self, agent: Any, exp: Any, epoch: int, logs: dict[str, float]) -> None:
        record: dict[str, float] = {"experience": exp.id, "epoch_in_experience": epoch}
        for k, v in logs.items():
            flatten(k, v, record)
        self._guard("logging an epoch", self._log_epoch, self.epoch_step, record)
        self.epoch_step += 1

    def after_eval(self, agent: Any, exps: list[Any], results: dict[str, Any]) -> None:
        if results.get("purpose") == "stream":
            self._last_eval = results

    def on_event(self, agent: Any, kind: str, data: dict[str, Any]) -> None:
        self._exp_events[kind] = self._exp_events.get(kind, 0) + 1
        if kind in POOL_EVENTS:
            self.events.append({"experience": self._current_id(agent), "kind": kind, **_jsonable(data)})

    def after_experience(self, agent: Any, exp: Any) -> None:
        step = len(agent.seen) - 1  # position in the stream, right after a resume too
        self._guard("logging an experience", self._log_experience, step, self.experience_record(agent, exp), agent)

    def after_run(self, agent: Any) -> None:
        self._guard("writing the summary", self._finish, self.summary(agent))
        self.close()

    def close(self) -> None:
        if self.opened and self.enabled:
            self._guard("closing", self._close)
        self.opened = False

    # ---- records --------------------------------------------------------------------------
    @staticmethod
    def _current_id(agent: Any) -> int | None:
        exp = getattr(getattr(agent, "strategy", None), "experience", None)
        return getattr(exp, "id", None)

    def _metrics(self, agent: Any) -> dict[str, Any] | None:
        from cl.metrics import MetricsCallback

        cb = agent.callbacks.find(MetricsCallback) if agent is not None else None
        return cb.metrics(agent) if cb is not None and cb.rows else None

    def experience_record(self, agent: Any, exp: Any) -> dict[str, float]:
        """Flat numbers for one experience: accuracies, running summaries, cost, strategy extras, event counts."""
        rec: dict[str, float] = {"experience_id": exp.id}
        m = self._metrics(agent)
        if m is not None:
            row = m["accuracy_matrix"][-1]
            rec["accuracy_seen"] = m["accuracy_seen"][-1]
            for key in ("avg_incremental_accuracy", "avg_forgetting", "bwt"):
                rec[key] = m[key]
            per_experience = {"wall_time_s": "wall_time_per_experience_s", "peak_rss_mb": "peak_rss_mb_per_experience",
                              "params_trainable": "params_trainable_per_experience",
                              "params_added": "params_added_per_experience"}
            for key, per in per_experience.items():
                if m.get(per):
                    rec[key] = m[per][-1]
            if m.get("params_total") is not None:
                rec["params_total"] = m["params_total"]
            for key, value in agent.strategy.extra_metrics().items():
                flatten(key, value, rec)
        elif self._last_eval is not None:
            row = self._last_eval["accuracy"]
            rec["accuracy_seen"] = float(self._last_eval["accuracy_seen"])
        else:
            row = []
        for j, acc in enumerate(row):
            rec[f"accuracy/exp_{j}"] = float(acc)
        for kind, n in sorted(self._exp_events.items()):
            rec[f"events/{kind}"] = n
        return rec

    def summary(self, agent: Any) -> dict[str, float]:
        """Headline numbers of the whole run (final accuracy, forgetting, cost)."""
        m = self._metrics(agent)
        if m is None:
            return {}
        keys = ("final_accuracy", "avg_incremental_accuracy", "avg_forgetting", "bwt", "fwt", "params_total",
                "params_trainable", "wall_time_s", "peak_rss_mb", "peak_cuda_mb")
        out: dict[str, float] = {}
        for k in keys:
            if m.get(k) is not None:
                flatten(k, m[k], out)
        return out

    def accuracy_rows(self, agent: Any) -> list[list[float]]:
        m = self._metrics(agent)
        return [list(r) for r in m["accuracy_matrix"]] if m is not None else []

    # ---- resume ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"epoch_step": self.epoch_step, "events": self.events}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.resumed = True
        self.epoch_step = int(state.get("epoch_step", 0))
        self.events = list(state.get("events", []))
