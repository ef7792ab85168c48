"""The report's charts: matplotlib figures rendered to inline SVG strings (no files, no network).

Each function takes ``RunGroup``s (or a run) and returns an ``<svg>`` element as text, or None when
the runs hold nothing to draw. Text stays text (``svg.fonttype: none``) so the page is small and
searchable; group ``i`` always has colour ``C{i}``.
"""

from __future__ import annotations

import functools
import io
import re
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from cl.report.runs import RunData, RunGroup

STYLE = {
    "svg.fonttype": "none", "font.size": 9, "axes.spines.top": False, "axes.spines.right": False,
    "axes.grid": True, "grid.alpha": 0.3, "legend.frameon": False, "figure.dpi": 100,
    "text.parse_math": False,  # labels and titles hold run names and config values: "$" is text, not math
}
LAYER_MARKERS = "osD^vP*Xh<>p"
P = ParamSpec("P")
R = TypeVar("R")


def color(i: int) -> str:
    return f"C{i % 10}"


def to_svg(fig: Figure) -> str:
    """The figure as one inline ``<svg>`` element, with ids nothing refers to removed (they repeat across figures)."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None, "Creator": None})
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    refs = set(re.findall(r"url\(#([^)]+)\)", text)) | set(re.findall(r'href="#([^"]+)"', text))
    text = re.sub(r'\sid="([^"]+)"', lambda m: m.group(0) if m.group(1) in refs else "", text)
    text = re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.S)
    return re.sub(r"<!--.*?-->", "", text, flags=re.S)


def styled(fn: Callable[P, R]) -> Callable[P, R]:
    """Draw (and render) under the report's matplotlib style, leaving the caller's rcParams alone."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with matplotlib.rc_context(STYLE):
            return fn(*args, **kwargs)

    return wrapper


def _figure(w: float = 6.4, h: float = 3.4) -> Figure:
    return Figure(figsize=(w, h))


def _axes(fig: Figure, *args: Any) -> Any:
    return fig.add_subplot(*args)


def _steps(ax: Any, n: int, label: str = "after experience") -> None:
    ax.set_xlabel(label)
    if n:
        ax.set_xticks(range(n))
        ax.set_xlim(-0.3, n - 0.7)


@styled
def accuracy_curves(groups: list[RunGroup]) -> str | None:
    """Accuracy on all seen classes after each experience, one line per group (mean ± std band over seeds)."""
    if not any(r.accuracy_seen for g in groups for r in g.runs):
        return None
    fig = _figure()
    ax = _axes(fig, 1, 1, 1)
    n = 0
    for i, g in enumerate(groups):
        mean, std = g.mean_std(lambda r: r.accuracy_seen)
        x = np.arange(len(mean))
        n = max(n, len(mean))
        label = g.label + (f" (mean ± std, {len(g.runs)} seeds)" if len(g.runs) > 1 else "")
        ax.plot(x, 100 * mean, marker="o", ms=4, color=color(i), label=label)
        if len(g.runs) > 1:
            ax.fill_between(x, 100 * (mean - std), 100 * (mean + std), color=color(i), alpha=0.2, lw=0)
    _steps(ax, n)
    ax.set_ylabel("accuracy on all seen classes (%)")
    ax.legend(fontsize=8, loc="best")
    return to_svg(fig)


@styled
def heatmap(matrix: np.ndarray, title: str) -> str | None:
    """Accuracy matrix: row = after training experience i, column = test set of experience j (percent)."""
    if matrix.size == 0:
        return None
    t_rows, t_cols = matrix.shape
    size = min(7.0, 2.2 + 0.45 * max(t_rows, t_cols))
    fig = _figure(size + 0.8, size)
    ax = _axes(fig, 1, 1, 1)
    ax.grid(False)
    masked = np.ma.masked_invalid(100 * matrix)
    mesh = ax.pcolormesh(np.arange(t_cols + 1) - 0.5, np.arange(t_rows + 1) - 0.5, masked, cmap="viridis",
                         vmin=0, vmax=100, edgecolors="white", linewidth=0.5)
    ax.invert_yaxis()
    ax.set_xticks(range(t_cols))
    ax.set_yticks(range(t_rows))
    ax.set_xlabel("test set of experience j")
    ax.set_ylabel("after training experience i")
    ax.set_title(title, fontsize=9)
    if max(t_rows, t_cols) <= 15:
        for i in range(t_rows):
            for j in range(t_cols):
                if not np.isnan(matrix[i, j]):
                    v = 100 * matrix[i, j]
                    ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7,
                            color="black" if v > 60 else "white")
    fig.colorbar(mesh, ax=ax, fraction=0.046, pad=0.04, label="accuracy (%)")
    return to_svg(fig)


@styled
def forgetting_bars(groups: list[RunGroup]) -> str | None:
    """Forgetting f_j of each experience at the end of the stream (so far, for unfinished runs)."""
    if not any(r.forgetting for g in groups for r in g.runs):
        return None
    fig = _figure()
    ax = _axes(fig, 1, 1, 1)
    width = 0.8 / len(groups)
    n = 0
    for i, g in enumerate(groups):
        mean, std = g.mean_std(lambda r: r.forgetting)
        n = max(n, len(mean))
        x = np.arange(len(mean)) - 0.4 + width * (i + 0.5)
        ax.bar(x, 100 * mean, width, yerr=100 * std if len(g.runs) > 1 else None, color=color(i), label=g.label,
               capsize=2)
    _steps(ax, n, "experience j")
    ax.axhline(0, color="black", lw=0.6)
    ax.set_ylabel("forgetting f_j (percentage points)")
    ax.legend(fontsize=8, loc="best")
    return to_svg(fig)


@styled
def adapters_plot(group: RunGroup, index: int) -> str | None:
    """Adapters in each layer's pool after each experience (mean over seeds)."""
    fig = adapters_figure(group, index)
    return None if fig is None else to_svg(fig)


def adapters_figure(group: RunGroup, index: int) -> Figure | None:
    """``adapters_plot``'s figure: one bar per layer side by side at each experience, a colour per layer, so layers
    whose pools grow alike stay visible (lines of equal counts would hide one another)."""
    layers = sorted({layer for r in group.runs for layer in r.adapters_per_layer()}, key=_as_int)
    if not layers:
        return None
    fig = _figure(6.4, 3.0)
    ax = _axes(fig, 1, 1, 1)
    n = 0
    width = 0.8 / len(layers)
    for k, layer in enumerate(layers):
        mean, _ = group.mean_std(lambda r, layer=layer: r.adapters_per_layer().get(layer, []))
        n = max(n, len(mean))
        ax.bar(np.arange(len(mean)) - 0.4 + width * (k + 0.5), mean, width, color=color(k), label=f"layer {layer}")
    _steps(ax, n)
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_ylabel("adapters in the pool")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_title(group.label, fontsize=9, color=color(index))
    ax.legend(fontsize=8, loc="upper left")
    return fig


@styled
def expansion_timeline(group: RunGroup, index: int) -> str | None:
    """Each expansion check: the smallest z-score over the layer's adapters against the threshold tau.

    SEMA adds an adapter when every descriptor's z-score is above tau, i.e. when the smallest one is.
    Filled markers: expansion; hollow: reuse. A layer's first adapter has no test (nothing to compare with): those
    are marked in a strip along the bottom, not at a z-score.
    """
    fig = expansion_figure(group, index)
    return None if fig is None else to_svg(fig)


def expansion_figure(group: RunGroup, index: int) -> Figure | None:
    """``expansion_timeline``'s figure."""
    checks = [(r, c) for r in group.runs for c in r.expansion_checks()]
    if not checks:
        return None
    layers = sorted({str(c["layer"]) for _, c in checks}, key=_as_int)
    fig = _figure(6.4, 3.4)
    untested = any(c["min_z"] is None for _, c in checks)
    if untested:  # a strip of its own under the z-scores: a first adapter has no z-score to draw
        ax, strip = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [8, 1], "hspace": 0.08})
        strip.set_yticks([])
        strip.set_ylim(-1, 1)
        strip.set_ylabel("no test", rotation=0, ha="right", va="center", fontsize=8)
        strip.spines["left"].set_visible(False)
        strip.grid(False)
    else:
        ax, strip = _axes(fig, 1, 1, 1), None
    taus = sorted({float(c["tau"]) for _, c in checks if c["tau"] is not None})
    zs = [c["min_z"] for _, c in checks if c["min_z"] is not None]
    for k, layer in enumerate(layers):
        dx = 0.5 * (k + 0.5) / len(layers) - 0.25
        for kind, filled in (("expansion", True), ("reuse", False)):
            pts = [c for _, c in checks if str(c["layer"]) == layer and c["kind"] == kind and c["min_z"] is not None]
            if pts:
                ax.scatter([c["experience"] + dx for c in pts], [c["min_z"] for c in pts], marker=_marker(k), s=30,
                           facecolors=f"C{k}" if filled else "none", edgecolors=f"C{k}", label=f"layer {layer} {kind}",
                           zorder=3)
        first = [c["experience"] + dx for _, c in checks if str(c["layer"]) == layer and c["min_z"] is None]
        if first and strip is not None:
            strip.plot(first, [0] * len(first), ls="none", marker=_marker(k), ms=5, mfc="none", mec=f"C{k}")
    if strip is not None:
        ax.plot([], [], ls="none", marker="o", ms=5, mfc="none", mec="grey", label="first adapter (no test)")
    for tau in taus:
        ax.axhline(tau, color="crimson", ls="--", lw=1, label=f"tau = {tau:g}")
    if taus:  # the threshold inside the axes, not on their edge
        ax.update_datalim([(0, t) for t in taus])
        ax.autoscale_view()
    if zs and max(zs) > 20 * max(taus or [1.0]):
        ax.set_yscale("symlog", linthresh=max(taus or [1.0]))
    n = max(int(c["experience"]) for _, c in checks) + 1
    _steps(strip if strip is not None else ax, n, "experience")
    if strip is not None:
        ax.tick_params(labelbottom=False)
    ax.set_ylabel("min z-score over the pool")
    title = group.label + (f" ({len(group.runs)} seeds overlaid)" if len(group.runs) > 1 else "")
    ax.set_title(title, fontsize=9, color=color(index))
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


@styled
def route_usage_plot(run: RunData) -> str | None:
    """Share of routing weight per adapter in each experience (stacked), from ``route`` events."""
    usage = run.route_usage()
    if not usage:
        return None
    names = sorted({a for u in usage.values() for a in u})
    fig = _figure(6.4, 3.0)
    ax = _axes(fig, 1, 1, 1)
    x = np.array(sorted(usage))
    bottom = np.zeros(len(x))
    for k, a in enumerate(names):
        h = np.array([100 * usage[i].get(a, 0.0) for i in x])
        ax.bar(x, h, 0.7, bottom=bottom, label=a, color=f"C{k % 10}")
        bottom += h
    _steps(ax, int(x.max()) + 1, "experience")
    ax.set_ylabel("routing weight (%)")
    ax.set_title(run.name, fontsize=9)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return to_svg(fig)


@styled
def retrieval_plot(groups: list[RunGroup]) -> str | None:
    """Retrieval hit rate per experience, one line per group, from ``retrieval`` events."""
    if not any(r.retrieval_hit_rate() for g in groups for r in g.runs):
        return None
    fig = _figure(6.4, 3.0)
    ax = _axes(fig, 1, 1, 1)
    n = 0
    for i, g in enumerate(groups):
        def series(r: RunData) -> list[float]:
            h = r.retrieval_hit_rate()
            return [h.get(j, np.nan) for j in range(max(h, default=-1) + 1)]
        mean, _ = g.mean_std(series)
        if len(mean):
            ax.plot(np.arange(len(mean)), 100 * mean, marker="o", ms=4, color=color(i), label=g.label)
            n = max(n, len(mean))
    _steps(ax, n, "experience")
    ax.set_ylabel("retrieval hits (%)")
    ax.legend(fontsize=8)
    return to_svg(fig)


@styled
def cost_plot(groups: list[RunGroup]) -> str | None:
    """Wall time and peak resident memory after each experience, one line per group (mean over seeds)."""
    if not any(r.wall_time_per_experience_s or r.peak_rss_mb_per_experience for g in groups for r in g.runs):
        return None
    fig = _figure(8.0, 3.0)
    ax_t, ax_m = _axes(fig, 1, 2, 1), _axes(fig, 1, 2, 2)
    n = 0
    for i, g in enumerate(groups):
        for ax, get in ((ax_t, lambda r: r.wall_time_per_experience_s), (ax_m, lambda r: r.peak_rss_mb_per_experience)):
            mean, std = g.mean_std(get)
            if len(mean):
                x = np.arange(len(mean))
                ax.plot(x, mean, marker="o", ms=3, color=color(i), label=g.label)
                if len(g.runs) > 1:
                    ax.fill_between(x, mean - std, mean + std, color=color(i), alpha=0.2, lw=0)
                n = max(n, len(mean))
    for ax, label in ((ax_t, "wall time of the experience (s)"), (ax_m, "peak RSS so far (MiB)")):
        _steps(ax, n, "experience")
        ax.set_ylabel(label)
    ax_t.legend(fontsize=7)
    fig.tight_layout()
    return to_svg(fig)


def _as_int(layer: str) -> tuple[int, Any]:
    try:
        return (0, int(layer))
    except ValueError:
        return (1, layer)


def _marker(k: int) -> str:
    return LAYER_MARKERS[k % len(LAYER_MARKERS)]
