"""Stream metrics (definitions in docs/metrics.md) and the callback that records them.

``R[i][j]`` is the accuracy (0-1) on experience ``j``'s test set after training experience ``i``.
Rows hold ``j <= i``; with ``eval.future`` on, they hold every ``j`` (for forward transfer).
"""

from __future__ import annotations

import json
import os
import resource
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cl.callbacks.base import Callback


def as_matrix(rows: Sequence[Sequence[float]], n: int | None = None) -> np.ndarray:
    """Rows of unequal length -> a square ``[T, T]`` array, NaN where not measured."""
    t = n or max(len(rows), max((len(r) for r in rows), default=0))
    m = np.full((len(rows), t), np.nan)
    for i, r in enumerate(rows):
        m[i, : len(r)] = r
    return m


def avg_incremental_accuracy(accuracy_seen: Sequence[float]) -> float:
    """Mean over steps of the accuracy on all classes seen so far: (1/T) sum_i A_i."""
    return float(np.mean(accuracy_seen)) if len(accuracy_seen) else float("nan")


def forgetting_per_experience(rows: Sequence[Sequence[float]]) -> list[float]:
    """f_j = max_{l in [j, T-2]} R[l][j] - R[T-1][j] for every j < T-1 (Chaudhry et al., 2018)."""
    m = as_matrix(rows)
    last = len(rows) - 1
    return [float(np.nanmax(m[j:last, j]) - m[last, j]) for j in range(last)]


def avg_forgetting(rows: Sequence[Sequence[float]]) -> float:
    """Mean of ``forgetting_per_experience``; 0.0 for a single experience."""
    f = forgetting_per_experience(rows)
    return float(np.mean(f)) if f else 0.0


def backward_transfer(rows: Sequence[Sequence[float]]) -> float:
    """BWT = 1/(T-1) sum_{j<T-1} (R[T-1][j] - R[j][j]) (Lopez-Paz & Ranzato, 2017); 0.0 if T = 1."""
    m = as_matrix(rows)
    last = len(rows) - 1
    if last < 1:
        return 0.0
    return float(np.mean([m[last, j] - m[j, j] for j in range(last)]))


def forward_transfer(rows: Sequence[Sequence[float]], baseline: Sequence[float] | None) -> float | None:
    """FWT = 1/(T-1) sum_{i>=1} (R[i-1][i] - b_i); None unless future experiences were evaluated."""
    if baseline is None or len(rows) < 2 or any(len(rows[i - 1]) <= i for i in range(1, len(rows))):
        return None
    return float(np.mean([rows[i - 1][i] - baseline[i] for i in range(1, len(rows))]))


def summarize(
    rows: Sequence[Sequence[float]], accuracy_seen: Sequence[float], baseline: Sequence[float] | None = None
) -> dict[str, Any]:
    """Headline numbers of an accuracy matrix."""
    return {
        "avg_incremental_accuracy": avg_incremental_accuracy(accuracy_seen),
        "final_accuracy": float(accuracy_seen[-1]) if len(accuracy_seen) else float("nan"),
        "avg_forgetting": avg_forgetting(rows),
        "forgetting_per_experience": forgetting_per_experience(rows),
        "bwt": backward_transfer(rows),
        "fwt": forward_transfer(rows, baseline),
    }


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` via a temporary file and rename, so readers never see half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


#: figures recorded per experience (``per_exp``): seconds and CPU seconds of the experience (training, evaluation
#: and the callbacks before the metrics'), each phase's (``cl.phases``; ``other``: the rest), memory, parameters
PER_EXPERIENCE = ("wall_time_s", "cpu_time_s", "phase_time_s", "phase_cpu_s", "peak_rss_mb", "params_total",
                  "params_trainable", "params_added")


class MetricsCallback(Callback):
    """Builds the accuracy matrix and cost figures; writes ``RUN/metrics.json`` after each experience."""

    def __init__(self, path: str | Path | None = None, n_experiences: int | None = None) -> None:
        self.path = Path(path) if path else None
        self.n_experiences = n_experiences
        self.rows: list[list[float]] = []
        self.accuracy_seen: list[float] = []
        self.baseline: list[float] | None = None
        self.per_exp: dict[str, list[Any]] = {k: [] for k in PER_EXPERIENCE}
        self._t0 = self._c0 = 0.0
        self._params_before = 0
        self._trainable = 0

    def before_experience(self, agent: Any, exp: Any) -> None:
        self._t0, self._c0 = time.perf_counter(), time.process_time()
        agent.ctx.clock.reset()
        self._params_before = agent.strategy.count_params()["params_total"]
        self._trainable = 0
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def _track_trainable(self, agent: Any) -> None:
        self._trainable = max(self._trainable, agent.strategy.count_params()["params_trainable"])

    def before_epoch(self, agent: Any, exp: Any, epoch: int) -> None:
        self._track_trainable(agent)  # strategies may add parameters inside fit

    def after_training(self, agent: Any, exp: Any) -> None:
        self._track_trainable(agent)

    def after_eval(self, agent: Any, exps: list[Any], results: dict[str, Any]) -> None:
        if results.get("purpose") == "baseline":
            self.baseline = list(results["accuracy"])
        elif results.get("purpose") == "stream":
            self.rows.append(list(results["accuracy"]))
            self.accuracy_seen.append(float(results["accuracy_seen"]))

    def after_experience(self, agent: Any, exp: Any) -> None:
        counts = agent.strategy.count_params()
        wall, cpu = time.perf_counter() - self._t0, time.process_time() - self._c0
        phase_wall, phase_cpu = agent.ctx.clock.totals()
        phase_wall["other"] = round(max(wall - sum(phase_wall.values()), 0.0), 3)
        phase_cpu["other"] = round(max(cpu - sum(phase_cpu.values()), 0.0), 3)
        self.per_exp["wall_time_s"].append(wall)
        self.per_exp["cpu_time_s"].append(cpu)
        self.per_exp["phase_time_s"].append(phase_wall)
        self.per_exp["phase_cpu_s"].append(phase_cpu)
        self.per_exp["peak_rss_mb"].append(peak_rss_mb())
        self.per_exp["params_total"].append(counts["params_total"])
        self.per_exp["params_trainable"].append(self._trainable)
        self.per_exp["params_added"].append(counts["params_total"] - self._params_before)
        if self.path is not None:
            write_json_atomic(self.path, self.metrics(agent))

    def metrics(self, agent: Any = None) -> dict[str, Any]:
        """The metrics.json content (see docs/metrics.md)."""
        out: dict[str, Any] = {
            "accuracy_matrix": self.rows,
            "accuracy_seen": self.accuracy_seen,
            **summarize(self.rows, self.accuracy_seen, self.baseline),
            "experiences_done": len(self.rows),
            "n_experiences": self.n_experiences,
            "params_total": self.per_exp["params_total"][-1] if self.per_exp["params_total"] else None,
            "params_trainable": max(self.per_exp["params_trainable"], default=None),
            "params_trainable_per_experience": self.per_exp["params_trainable"],
            "params_added_per_experience": self.per_exp["params_added"],
            "wall_time_s": float(sum(self.per_exp["wall_time_s"])),
            "wall_time_per_experience_s": self.per_exp["wall_time_s"],
            "cpu_time_s": float(sum(c for c in self.per_exp["cpu_time_s"] if c is not None)),
            "phase_time_s": self.per_exp["phase_time_s"],
            "phase_cpu_s": self.per_exp["phase_cpu_s"],
            "peak_rss_mb": max(self.per_exp["peak_rss_mb"], default=peak_rss_mb()),
            "peak_rss_mb_per_experience": self.per_exp["peak_rss_mb"],
        }
        if torch.cuda.is_available():
            out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
        if agent is not None:
            out.update(agent.strategy.extra_metrics())
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "accuracy_seen": self.accuracy_seen, "baseline": self.baseline,
                "per_exp": self.per_exp}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows = [list(r) for r in state["rows"]]
        self.accuracy_seen = list(state["accuracy_seen"])
        self.baseline = state["baseline"]
        n = len(self.rows)  # a checkpoint from before a figure was recorded: none for its experiences
        self.per_exp = {k: [None] * n for k in PER_EXPERIENCE}
        self.per_exp.update({k: list(v) for k, v in state["per_exp"].items()})
