"""Runs, resumes and reports under directory names with spaces, unicode, ``#``, ``?`` and ``%``.

SQLite reads a ``file:`` URI, where ``#`` starts a fragment, ``?`` a query and ``%`` an escape: a path put
into one unquoted opens (and creates) another file. Each case runs in ``tmp_path/<name>/run<name>`` and
checks that nothing but the run appeared, that the resumed run ends with the metrics of an uninterrupted
one, and that the report and the memory read back from there.
"""

from __future__ import annotations

import html
import json
import os
import re
import shlex
import shutil
import sqlite3

import numpy as np
import pytest
import yaml

from cl.cli import main
from cl.memory import ExperienceMemory
from cl.memory.store import sqlite_uri
from cl.report import write_report
from cl.report.figures import route_usage_plot
from cl.report.runs import load_run
from cl.run import run
from tests.helpers import StopBefore, one_thread, tiny_config

# [red] is rich console markup, $...$ matplotlib math text: a path printed or drawn as either loses characters
NAMES = ["with space", "ünï 数据", "hash#x", "what?mode=rwc", "pct%20x%", "all #?% é", "tag [red]x [bold]",
         "dollar $\\x$ _u"]
PARAMS = {"epochs": 1, "batch_size": 16, "budget": 12}


def config(tmp_path, name: str) -> dict:
    cfg = tiny_config(tmp_path, "replay", **PARAMS)
    cfg["out"] = str(tmp_path / name / f"run{name}")
    cfg["loggers"] = ["csv"]
    return cfg


def listing(root) -> set[str]:
    """Every file and folder under ``root``, relative to it, memory generations numbered ``gen-N``."""
    return {re.sub(r"gen-\d+", "gen-N", os.path.relpath(os.path.join(d, f), root))
            for d, dirs, files in os.walk(root) for f in dirs + files}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The metrics and memory of an uninterrupted run in a plain directory."""
    tmp = tmp_path_factory.mktemp("ref")
    cfg = config(tmp, "plain")
    with one_thread():
        metrics = run(cfg, report=True)  # as `cl run` does
    out = tmp / "plain" / "runplain"
    return {"metrics": metrics, "memory": ExperienceMemory.load(out / "memory").entries(), "files": listing(out),
            "out": out}


@pytest.mark.parametrize("name", NAMES)
def test_run_resume_report_under_an_awkward_name(tmp_path, name, reference, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "500")  # rich wraps printed paths at the terminal width otherwise
    cfg = config(tmp_path, name)
    folder, out = tmp_path / name, tmp_path / name / f"run{name}"
    folder.mkdir()
    cfg_file = folder / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    with one_thread():
        with pytest.raises(KeyboardInterrupt):
            run(cfg, extra_callbacks=[StopBefore(2)])
        interrupted = html.unescape(write_report([out], tmp_path / "interrupted.html").read_text(encoding="utf-8"))
        (tmp_path / "interrupted.html").unlink()
        command = re.search(r"continue with `(cl run --resume [^`]*)`", interrupted).group(1)
        assert shlex.split(command) == ["cl", "run", "--resume", str(out)]  # a command to paste into a shell
        assert main(["run", "--resume", str(out)]) == 0  # loads the memory saved after experience 1
        printed = capsys.readouterr().out
        assert f"resuming {out}: experiences [0, 1] already done" in printed and f"run directory: {out}" in printed
        assert main(["run", "--resume", str(out)]) == 0  # finished: loads the last memory, trains nothing
        assert f"resuming {out}: experiences [0, 1, 2] already done" in capsys.readouterr().out
        assert main(["report", str(folder)]) == 0  # a folder of runs: found by globbing under the odd name
        assert main(["report", str(out), "--out", str(out / "again.html")]) == 0

    metrics = json.loads((out / "metrics.json").read_text())
    ref = reference["metrics"]
    assert metrics["accuracy_matrix"] == ref["accuracy_matrix"] and metrics["bwt"] == ref["bwt"]
    mem, ref_mem = ExperienceMemory.load(out / "memory").entries(), reference["memory"]
    assert mem.ids.tolist() == ref_mem.ids.tolist() and mem.metadata == ref_mem.metadata
    assert np.array_equal(mem.vectors, ref_mem.vectors)
    assert sum(m["kind"] == "exemplar" for m in mem.metadata) == PARAMS["budget"]

    assert os.listdir(tmp_path) == [name], "a file appeared beside the run's folder"
    assert set(os.listdir(folder)) == {"cfg.yaml", out.name, "report.html"}, "a file appeared beside the run"
    assert listing(out) - {"again.html"} == reference["files"], "the run holds other files than a plain one"
    for page in (folder / "report.html", out / "again.html"):
        assert out.name in html.unescape(page.read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", ["a#b", "a?b", "a%20b", "a%b", "a?mode=rwc", "über space"])
def test_sqlite_uri_names_exactly_the_file(tmp_path, name):
    folder = tmp_path / name
    folder.mkdir()
    db = folder / "x.sqlite"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE t (a)")
    conn.close()
    ro = sqlite3.connect(sqlite_uri(db, mode="ro"), uri=True)
    try:
        assert ro.execute("SELECT name FROM sqlite_master").fetchall() == [("t",)]
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            ro.execute("CREATE TABLE u (a)")
    finally:
        ro.close()
    assert os.listdir(tmp_path) == [name] and os.listdir(folder) == ["x.sqlite"]


def test_sqlite_uri_of_a_relative_path_is_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = sqlite_uri("d#1/m.sqlite")
    assert uri.startswith("file:///") and uri.endswith("/d%231/m.sqlite") and "?" not in uri


def test_a_run_name_is_drawn_as_text_not_math_text(tmp_path, reference):
    """Chart titles hold run names: ``$\\x$`` in one must not be parsed (and fail) as matplotlib math text."""
    out = tmp_path / "runs $\\x$ and $y$"
    shutil.copytree(reference["out"], out)
    with open(out / "events.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"t": 0, "experience": 0, "kind": "route", "usage": {"a": 1.0}}) + "\n")
    svg = route_usage_plot(load_run(out))
    assert "runs $\\x$ and $y$" in html.unescape(svg)
