"""``cl report``: one self-contained HTML dashboard over one or more run directories.

``runs`` reads run directories and groups seeds (data only); ``figures`` draws SVG charts;
``page`` assembles the HTML. ``write_report`` ties them together::

    from cl.report import write_report
    write_report(["runs/a", "runs/b"], "report.html")
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from cl.errors import ConfigError
from cl.report.runs import RunData, RunGroup, find_runs, group_runs, load_run, load_runs


def default_title(groups: list[RunGroup]) -> str:
    runs = [r for g in groups for r in g.runs]
    if len(runs) == 1:
        return f"clagent report: {runs[0].name}"
    return f"clagent report: {len(runs)} runs, {len(groups)} config{'s' if len(groups) != 1 else ''}"


def write_report(paths: list[str | Path], out: str | Path, title: str | None = None) -> Path:
    """Read the runs under ``paths`` (run directories or folders of runs) and write the HTML page to ``out``.

    Raises ConfigError (exit code 2 in the CLI) when a path is not a run and holds none, when ``out`` is a directory
    or cannot be written (no ``OUT.tmp`` is left behind), or when a run's ``metrics.json`` is not clagent's.
    """
    from cl.report.page import render

    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"{out} is a directory: --out names the HTML file to write (e.g. {out / 'report.html'})")
    groups = group_runs(load_runs(paths))
    text = render(groups, title or default_title(groups))
    tmp = out.with_name(out.name + ".tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out)  # a browser reloading the page never reads half of it
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise ConfigError(f"cannot write the report {out}: {e.strerror or e}; pass --out a file you can write") \
            from None
    return out


__all__ = ["RunData", "RunGroup", "find_runs", "group_runs", "load_run", "load_runs", "write_report"]
