"""The report page: one self-contained HTML file (inline SVG, CSS and a little vanilla JS; no network)."""

from __future__ import annotations

import datetime as _dt
import html
import math
from typing import Any

import yaml

from cl.report import figures
from cl.report.runs import RunData, RunGroup

CSS = """
:root { --fg:#1d2330; --muted:#5b6472; --line:#d9dde4; --bg:#fff; --warn:#fff4d6; --warn-line:#e0b341; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
       background: var(--bg); margin: 0 auto; max-width: 1180px; padding: 0 20px 40px; }
header { padding: 18px 0 6px; border-bottom: 1px solid var(--line); }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 18px; margin: 28px 0 8px; }
h3 { font-size: 15px; margin: 14px 0 6px; }
.muted, figcaption { color: var(--muted); font-size: 12.5px; }
nav { position: sticky; top: 0; background: var(--bg); padding: 8px 0; border-bottom: 1px solid var(--line);
      z-index: 1; }
nav a { margin-right: 14px; color: #2456a6; text-decoration: none; }
nav button { float: right; font-size: 12px; }
.banner { background: var(--warn); border: 1px solid var(--warn-line); border-radius: 6px; padding: 8px 12px;
          margin: 10px 0; }
table { border-collapse: collapse; margin: 8px 0; font-size: 13px; }
th, td { border-bottom: 1px solid var(--line); padding: 4px 10px; text-align: right; white-space: nowrap; }
th { white-space: normal; vertical-align: bottom; }
th:first-child, td:first-child { text-align: left; white-space: normal; }
th { cursor: pointer; user-select: none; background: #f5f6f8; }
th.sorted-asc::after { content: " \\25B2"; }
th.sorted-desc::after { content: " \\25BC"; }
.grid { display: flex; flex-wrap: wrap; gap: 14px; align-items: flex-start; }
figure { margin: 8px 0; }
figure svg { max-width: 100%; height: auto; }
pre { background: #f5f6f8; padding: 10px; border-radius: 6px; overflow: auto; font-size: 12px; }
#js-errors { background: #fde8e8; color: #8a1c1c; }
.empty { color: var(--muted); font-style: italic; }
.scroll { max-height: 360px; overflow: auto; }
.wide { overflow-x: auto; }
"""

# Records uncaught errors into #js-errors (a test reads it from the DOM), then adds table sorting.
ERROR_JS = """
(function () {
  var box = document.getElementById("js-errors");
  function record(text) { box.hidden = false; box.textContent += text + "\\n"; document.body.dataset.jsErrors = "1"; }
  window.onerror = function (msg, src, line, col) { record(msg + " at " + line + ":" + col); };
  window.addEventListener("unhandledrejection", function (e) { record("unhandled rejection: " + e.reason); });
})();
"""

PAGE_JS = """
(function () {
  function key(cell) {
    var v = cell.getAttribute("data-sort");
    if (v === null) v = cell.textContent.trim();
    var n = parseFloat(v);
    return isNaN(n) ? v.toLowerCase() : n;
  }
  document.querySelectorAll("table.sortable th").forEach(function (th, _) {
    th.addEventListener("click", function () {
      var table = th.closest("table"), body = table.tBodies[0];
      var idx = Array.prototype.indexOf.call(th.parentNode.children, th);
      var asc = !th.classList.contains("sorted-asc");
      table.querySelectorAll("th").forEach(function (h) { h.classList.remove("sorted-asc", "sorted-desc"); });
      th.classList.add(asc ? "sorted-asc" : "sorted-desc");
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = key(a.cells[idx]), y = key(b.cells[idx]);
        if (typeof x !== typeof y) { x = String(x); y = String(y); }
        return (x < y ? -1 : x > y ? 1 : 0) * (asc ? 1 : -1);
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
  var toggle = document.getElementById("toggle-details");
  toggle.addEventListener("click", function () {
    var all = document.querySelectorAll("details"), open = toggle.dataset.open !== "1";
    all.forEach(function (d) { d.open = open; });
    toggle.dataset.open = open ? "1" : "0";
    toggle.textContent = open ? "collapse all" : "expand all";
  });
  document.body.dataset.ready = "1";
})();
"""

SECTIONS = [("summary", "Summary"), ("accuracy", "Accuracy"), ("forgetting", "Forgetting"),
            ("adapters", "Adapters"), ("routing", "Routing"), ("expansions", "Expansions"),
            ("cost", "Time & memory"), ("config", "Config")]


def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def fmt(mean: float, std: float, n: int, scale: float = 1.0, digits: int = 2) -> str:
    if n == 0 or math.isnan(mean):
        return "–"
    text = f"{scale * mean:,.{digits}f}"
    return text + (f" ± {scale * std:,.{digits}f}" if n > 1 else "")


def figure(svg: str | None, fig_id: str, kind: str, caption: str) -> str:
    if svg is None:
        return ""
    return (f'<figure class="chart" id="{esc(fig_id)}" data-chart="{esc(kind)}">{svg}'
            f"<figcaption>{esc(caption)}</figcaption></figure>")


def empty(text: str) -> str:
    return f'<p class="empty">{esc(text)}</p>'


def table(headers: list[str], rows: list[list[Any]], table_id: str) -> str:
    """A sortable table; a cell may be ``(text, sort_key)``."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for c in row:
            if isinstance(c, tuple):
                text, sort = c
                cells.append(f'<td data-sort="{esc(sort)}">{esc(text)}</td>')
            else:
                cells.append(f"<td>{esc(c)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<div class="wide"><table class="sortable" id="{esc(table_id)}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>")


METRICS = [  # (metrics.json key, column, scale, digits)
    ("final_accuracy", "final acc. (%)", 100, 2), ("avg_incremental_accuracy", "avg. incr. acc. (%)", 100, 2),
    ("avg_forgetting", "avg. forgetting (pp)", 100, 2), ("bwt", "BWT (pp)", 100, 2),
    ("params_trainable", "trainable params", 1, 0), ("wall_time_s", "wall time (s)", 1, 1),
    ("peak_rss_mb", "peak RSS (MiB)", 1, 0),
]


def summary_section(groups: list[RunGroup], runs: list[RunData]) -> str:
    rows = []
    for g in groups:
        done = sum(r.finished for r in g.runs)
        status = "finished" if done == len(g.runs) else f"{done}/{len(g.runs)} finished"
        row: list[Any] = [g.label, (g.runs_text, len(g.runs)), status]
        for key, _, scale, digits in METRICS:
            mean, std, n = g.scalar(key)
            row.append((fmt(mean, std, n, scale, digits), "" if math.isnan(mean) else mean))
        rows.append(row)
    parts = [
        "<h3>Comparison (mean ± sample std over seeds)</h3>" if any(len(g.runs) > 1 for g in groups)
        else "<h3>Comparison</h3>",
        table(["config", "runs (seeds)", "status", *[m[1] for m in METRICS]], rows, "table-groups"),
    ]
    run_rows = []
    for r in runs:
        row = [r.name, r.seed, r.status_text]
        for key, _, scale, digits in METRICS:
            v = r.metrics.get(key)
            ok = isinstance(v, (int, float)) and not math.isnan(v)
            row.append((fmt(float(v), 0.0, 1, scale, digits), v) if ok else ("–", ""))
        run_rows.append(row)
    if len(runs) > 1:
        parts.append("<details open><summary>Runs</summary>"
                     + table(["run", "seed", "status", *[m[1] for m in METRICS]], run_rows, "table-runs")
                     + "</details>")
    return "".join(parts)


def accuracy_section(groups: list[RunGroup]) -> str:
    curves = figure(figures.accuracy_curves(groups), "chart-accuracy-seen", "curves",
                    "Accuracy on the test sets of all experiences seen so far, after each experience"
                    + (" (bands: ± sample std over seeds)" if any(len(g.runs) > 1 for g in groups) else ""))
    maps = []
    for i, g in enumerate(groups):
        title = g.label + (f" (mean of {len(g.runs)} seeds)" if len(g.runs) > 1 else "")
        maps.append(figure(figures.heatmap(g.matrix_mean(), title), f"chart-heatmap-{i}", "heatmap",
                           "Accuracy matrix R[i][j] (%): rows after training experience i, columns test set j"))
    body = '<div class="grid">' + curves + "".join(maps) + "</div>"
    return body if "<figure" in body else empty("no experience has been evaluated yet")


def forgetting_section(groups: list[RunGroup]) -> str:
    svg = figures.forgetting_bars(groups)
    if svg is None:
        return empty("forgetting needs at least two evaluated experiences")
    return figure(svg, "chart-forgetting", "forgetting",
                  "f_j = best accuracy ever reached on experience j minus its accuracy after the last experience "
                  "(docs/metrics.md)")


def adapters_section(groups: list[RunGroup]) -> str:
    caption = "Adapters per layer after each experience, from expansion/reuse events"
    figs = [figure(figures.adapters_plot(g, i), f"chart-adapters-{i}", "adapters", caption)
            for i, g in enumerate(groups)]
    finals = []
    for g in groups:
        r = g.runs[0]
        per_layer = r.metrics.get("adapters_per_layer")
        if isinstance(per_layer, dict) and not r.adapters_per_layer():
            finals.append([g.label, ", ".join(f"layer {k}: {v}" for k, v in per_layer.items())])
    out = "".join(figs)
    if finals:
        out += "<h3>Adapters at the end (no per-experience events)</h3>" + table(["config", "adapters"], finals,
                                                                                  "table-adapters-final")
    return out or empty("no adapter pools in these runs (no expansion/reuse events, no adapters_per_layer)")


def routing_section(groups: list[RunGroup]) -> str:
    figs = [figure(figures.route_usage_plot(r), f"chart-routes-{i}-{k}", "routes",
                   f"Router usage per experience ({r.name}), from route events")
            for i, g in enumerate(groups) for k, r in enumerate(g.runs[:1])]
    figs.append(figure(figures.retrieval_plot(groups), "chart-retrieval", "retrieval",
                       "Retrieval hits per experience, from retrieval events"))
    out = "".join(figs)
    return out or empty("no route or retrieval events in these runs (docs/dashboard.md lists the event fields "
                        "that fill this section)")


def expansions_section(groups: list[RunGroup]) -> str:
    parts = []
    for i, g in enumerate(groups):
        svg = figures.expansion_timeline(g, i)
        if svg is None:
            continue
        parts.append(figure(svg, f"chart-expansions-{i}", "expansion-timeline",
                            "Expansion checks: smallest z-score of the new data under the layer's descriptors, against "
                            "tau (filled: a new adapter; hollow: reuse; the strip below: a layer's first adapter, "
                            "which has nothing to be tested against)"))
        rows = []
        for r in g.runs:
            for c in r.expansion_checks():
                z = ", ".join(f"{k}: {v:.2f}" for k, v in c["zscores"].items()) if c["zscores"] else "–"
                min_z = "–" if c["min_z"] is None else f"{c['min_z']:.2f}"
                rows.append([r.name, c["experience"], c["layer"], c["kind"], c["adapter"] or "–", c["adapters"],
                             c["tau"], (min_z, "" if c["min_z"] is None else c["min_z"]), z])
        parts.append(f"<details><summary>{esc(g.label)}: {len(rows)} checks</summary><div class='scroll'>"
                     + table(["run", "experience", "layer", "decision", "adapter", "pool size", "tau", "min z",
                              "z-scores"], rows, f"table-expansions-{i}") + "</div></details>")
    return "".join(parts) or empty("no expansion events in these runs (only self-expanding strategies emit them)")


def cost_section(groups: list[RunGroup]) -> str:
    svg = figures.cost_plot(groups)
    if svg is None:
        return empty("no time or memory figures yet")
    return figure(svg, "chart-cost", "cost", "Wall time of each experience (training + evaluation) and peak "
                  "resident memory of the process after it")


def config_section(groups: list[RunGroup]) -> str:
    parts = []
    for i, g in enumerate(groups):
        seeds = f" (seeds {', '.join(map(str, g.seeds))}; shown: {g.runs[0].name})" if len(g.runs) > 1 else ""
        text = yaml.safe_dump(g.config, sort_keys=False)
        parts.append(f"<details {'open' if i == 0 else ''}><summary>{esc(g.label)}{esc(seeds)}</summary>"
                     f"<pre>{esc(text)}</pre></details>")
    return "".join(parts)


def render(groups: list[RunGroup], title: str) -> str:
    """The whole page as one HTML string."""
    runs = [r for g in groups for r in g.runs]
    banners = "".join(
        f'<div class="banner" data-status="{esc(r.status)}"><b>{esc(r.name)}</b>: {esc(r.status_text)}; '
        "the report shows what it has so far.</div>"
        for r in runs if not r.finished
    )
    built = {
        "summary": summary_section(groups, runs), "accuracy": accuracy_section(groups),
        "forgetting": forgetting_section(groups), "adapters": adapters_section(groups),
        "routing": routing_section(groups), "expansions": expansions_section(groups),
        "cost": cost_section(groups), "config": config_section(groups),
    }
    nav = "".join(f'<a href="#{k}">{esc(v)}</a>' for k, v in SECTIONS)
    body = "".join(f'<section id="{k}"><h2>{esc(v)}</h2>{built[k]}</section>' for k, v in SECTIONS)
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    paths = ", ".join(esc(r.path) for r in runs)
    counts = f"{len(runs)} run{'s' if len(runs) != 1 else ''} in {len(groups)} config{'s' if len(groups) != 1 else ''}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title><style>{CSS}</style></head>
<body>
<pre id="js-errors" hidden></pre>
<script>{ERROR_JS}</script>
<header><h1>{esc(title)}</h1>
<div class="muted">{counts} · written {stamp} by <code>cl report</code> · {paths}</div>{banners}</header>
<nav>{nav}<button id="toggle-details" type="button">expand all</button></nav>
{body}
<script>{PAGE_JS}</script>
</body></html>
"""
