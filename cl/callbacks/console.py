"""Console logger: a line per epoch and experience, and a final accuracy-matrix table."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.table import Table

from cl.callbacks.base import Callback
from cl.registry import register_logger


def matrix_table(metrics: dict[str, Any], title: str = "accuracy matrix") -> Table:
    """Rows: after training experience i; columns: test set of experience j (percent)."""
    rows = metrics["accuracy_matrix"]
    n = max((len(r) for r in rows), default=0)
    table = Table(title=title)
    table.add_column("after exp", justify="right")
    for j in range(n):
        table.add_column(f"exp {j}", justify="right")
    table.add_column("all seen", justify="right")
    for i, r in enumerate(rows):
        cells = [f"{100 * v:.1f}" for v in r] + [""] * (n - len(r))
        table.add_row(str(i), *cells, f"{100 * metrics['accuracy_seen'][i]:.1f}")
    return table


def headline(metrics: dict[str, Any]) -> str:
    """One line with the numbers a reader looks for first."""
    parts = [
        f"final accuracy {metrics['final_accuracy']:.4f}",
        f"avg incremental accuracy {metrics['avg_incremental_accuracy']:.4f}",
        f"avg forgetting {metrics['avg_forgetting']:.4f}",
        f"BWT {metrics['bwt']:+.4f}",
        f"trainable params {metrics['params_trainable']:,}",
        f"wall time {metrics['wall_time_s']:.1f} s",
        f"peak RSS {metrics['peak_rss_mb']:.0f} MiB",
    ]
    return " | ".join(parts)


@register_logger("console")
class ConsoleLogger(Callback):
    """Prints progress lines and, at the end, the accuracy matrix and headline metrics."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console()
        self._t = 0.0

    def before_experience(self, agent: Any, exp: Any) -> None:
        self._t = time.perf_counter()
        self.console.print(f"[bold]experience {exp.id}[/]: classes {exp.classes}, {len(exp.train)} train items")

    def after_epoch(self, agent: Any, exp: Any, epoch: int, logs: dict[str, float]) -> None:
        self.console.print(f"  epoch {epoch + 1}: loss {logs['loss']:.4f}")

    def on_event(self, agent: Any, kind: str, data: dict[str, Any]) -> None:
        self.console.print(f"  [dim]{kind}[/]: {data}")

    def after_eval(self, agent: Any, exps: list[Any], results: dict[str, Any]) -> None:
        if results.get("purpose") == "stream":
            accs = " ".join(f"{100 * a:.1f}" for a in results["accuracy"])
            self.console.print(
                f"  accuracy per experience: {accs} | all seen: {100 * results['accuracy_seen']:.2f}% "
                f"({time.perf_counter() - self._t:.1f} s)"
            )

    def after_run(self, agent: Any) -> None:
        from cl.metrics import MetricsCallback

        metrics_cb = agent.callbacks.find(MetricsCallback)
        if metrics_cb is None or not metrics_cb.rows:
            return
        m = metrics_cb.metrics(agent)
        self.console.print(matrix_table(m))
        self.console.print(headline(m))
