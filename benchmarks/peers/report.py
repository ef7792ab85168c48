"""Aggregation of the per-run results: mean ± std over seeds, the Markdown table, the RESULTS.md section."""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

METRICS = ["final_accuracy", "avg_incremental_accuracy", "avg_forgetting", "learning_accuracy", "wall_s", "cpu_s",
           "peak_rss_mb"]
BEGIN, END = "<!-- peers-table:begin -->", "<!-- peers-table:end -->"
LABELS = {
    ("avalanche", "naive"): "Avalanche `Naive` (fine-tune all)",
    ("avalanche", "lwf"): "Avalanche `LwF` (alpha 1, T 2)",
    ("avalanche", "ewc"): "Avalanche `EWC` (lambda 100, separate)",
    ("avalanche", "replay"): "Avalanche `Replay` (2,000, experience-balanced random)",
    ("ours", "simplecil"): "ours `simplecil` (cosine NCM)",
    ("ours", "simplecil_lda"): "ours `simplecil`, LDA head",
    ("ours", "sema"): "ours `sema` (default: one pass, routed and classified with the prefix's taps)",
    ("ours", "sema_frozen"): "ours `sema`, frozen-embedding routing and [frozen, mixture] head (earlier default)",
    ("ours", "replay"): "ours `replay` (2,000 herded, last 2 blocks)",
    ("ours", "lae"): "ours `lae` (default, LDA head)",
    ("ours", "aper_lda"): "ours `aper`, LDA head",
}


def summarize_runs(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (stream, framework, method): seeds run, and mean / std over seeds of each metric."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        s = r["spec"]
        groups[(s["stream"], s["framework"], s["method"])].append(r)
    rows = []
    for (stream, framework, method), rs in groups.items():
        row: dict[str, Any] = {"stream": stream, "framework": framework, "method": method,
                               "seeds": sorted(r["spec"]["seed"] for r in rs)}
        for m in METRICS:
            vals = [float(learning_accuracy(r) if m == "learning_accuracy" else r[m]) for r in rs
                    if m == "learning_accuracy" or r.get(m) is not None]
            row[m] = statistics.fmean(vals) if vals else None
            row[f"{m}_std"] = statistics.stdev(vals) if len(vals) > 1 else None
        rows.append(row)
    return rows


def learning_accuracy(result: dict[str, Any]) -> float:
    """Mean accuracy on each experience right after learning it (the diagonal of the accuracy matrix)."""
    m = result["accuracy_matrix"]
    return statistics.fmean(m[i][i] for i in range(len(m)))


def check_class_orders(results: list[dict[str, Any]]) -> list[str]:
    """Problems: runs of one (stream, seed) whose class orders differ (should be none)."""
    orders: dict[tuple[str, int], set[str]] = defaultdict(set)
    for r in results:
        orders[(r["spec"]["stream"], r["spec"]["seed"])].add(repr(r["class_order"]))
    return [f"{k}: {len(v)} different class orders" for k, v in orders.items() if len(v) > 1]


def _pm(row: dict[str, Any], m: str, digits: int) -> str:
    mean, std = row[m], row[f"{m}_std"]
    if mean is None:
        return ""
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def markdown(rows: list[dict[str, Any]], headings: dict[str, str]) -> str:
    """One table per stream (best final accuracy in bold), each under its heading."""
    out = []
    for stream, heading in headings.items():
        rs = [r for r in rows if r["stream"] == stream]
        if not rs:
            continue
        best = max(r["final_accuracy"] for r in rs)
        out += [heading, "",
                "| method | seeds | final accuracy | avg incremental acc. | avg forgetting | learning acc. | wall s "
                "| CPU s | peak RSS MB |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(rs, key=lambda r: (r["framework"] != "avalanche", -r["final_accuracy"])):
            final = _pm(r, "final_accuracy", 4)
            out.append(f"| {LABELS.get((r['framework'], r['method']), r['framework'] + ' ' + r['method'])} "
                       f"| {','.join(map(str, r['seeds']))} "
                       f"| {f'**{final}**' if r['final_accuracy'] == best else final} "
                       f"| {_pm(r, 'avg_incremental_accuracy', 4)} | {_pm(r, 'avg_forgetting', 4)} "
                       f"| {_pm(r, 'learning_accuracy', 4)} "
                       f"| {_pm(r, 'wall_s', 0)} | {_pm(r, 'cpu_s', 0)} | {_pm(r, 'peak_rss_mb', 0)} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def update_results_md(path: Path, text: str) -> bool:
    """Replace the text between the peers markers of ``path``; False if the markers are missing."""
    doc = path.read_text()
    if BEGIN not in doc or END not in doc:
        return False
    head, rest = doc.split(BEGIN, 1)
    path.write_text(f"{head}{BEGIN}\n{text}{END}{rest.split(END, 1)[1]}")
    return True
