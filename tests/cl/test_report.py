"""`cl report`: one run, seeds grouped with mean ± std, unfinished runs, bad input, and the page
rendered by headless Chromium (no JavaScript errors, charts in the DOM, under 5 MB)."""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from cl.callbacks.base import Callback
from cl.cli import main
from cl.report import group_runs, load_run, load_runs, write_report
from cl.run import run
from tests.helpers import tiny_config

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"  # git-ignored: screenshots to look at
FIVE = {"n_classes": 10, "n_experiences": 5, "train_per_class": 16, "test_per_class": 8}


def sema_config(root, seed=0, **scenario):
    cfg = tiny_config(root, "sema", epochs=1, descriptor_epochs=2)
    cfg["scenario"].update(scenario)
    cfg.update(seed=seed, threads=1, out=str(root / f"sema-seed{seed}"))
    return cfg


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two seeds of a tiny 5-experience SEMA run and one SimpleCIL run."""
    root = tmp_path_factory.mktemp("runs")
    for seed in (0, 1):
        run(sema_config(root, seed, **FIVE))
    cfg = tiny_config(root, "simplecil")
    cfg["scenario"].update(FIVE)
    cfg.update(threads=1, out=str(root / "simplecil"))
    run(cfg)
    return root


def test_report_of_one_run(runs, tmp_path):
    out = write_report([runs / "sema-seed0"], tmp_path / "r.html")
    page = out.read_text()
    for element in ('id="chart-accuracy-seen"', 'id="chart-heatmap-0"', 'id="chart-forgetting"',
                    'id="chart-adapters-0"', 'id="chart-expansions-0"', 'id="chart-cost"', 'id="table-groups"'):
        assert element in page, element
    assert not re.search(r'(src|href)="(https?:)?//|url\((https?:)?//|@import', page)  # nothing to fetch
    assert "head_features: adapted" in page  # the resolved config
    assert "in progress" not in page


def test_two_seeds_are_grouped_with_mean_and_std(runs, tmp_path):
    groups = group_runs(load_runs([runs / "sema-seed0", runs / "sema-seed1"]))
    assert len(groups) == 1 and groups[0].seeds == [0, 1]
    page = write_report([runs / "sema-seed0", runs / "sema-seed1"], tmp_path / "r.html").read_text()
    table = page[page.index('id="table-groups"') : page.index("</table>", page.index('id="table-groups"'))]
    assert "±" in table and "0, 1" in table
    assert "mean ± std, 2 seeds" in page and "mean of 2 seeds" in page


def test_several_configs_are_labelled_by_what_differs(runs, tmp_path):
    groups = group_runs(load_runs([runs]))  # a folder of runs
    assert sorted(g.label for g in groups) == ["sema", "simplecil"]  # the strategy's name alone: all that differs
    sema = next(g for g in groups if "sema" in g.label)
    mean, std = sema.mean_std(lambda r: r.accuracy_seen)
    assert len(mean) == 5 and (std >= 0).all()

    # a strategy imported from a file: its imports differ too, and say nothing the name does not
    plugin = tmp_path / "plugin"
    shutil.copytree(runs / "simplecil", plugin)
    cfg = yaml.safe_load((plugin / "config.yaml").read_text())
    cfg.update(imports=["examples/statistics_strategy.py"], strategy={"name": "class_means", "batch_size": 64})
    (plugin / "config.yaml").write_text(yaml.safe_dump(cfg))
    labels = sorted(g.label for g in group_runs(load_runs([runs / "sema-seed0", runs / "simplecil", plugin])))
    assert labels == ["class_means", "sema", "simplecil"]
    lr = tmp_path / "lr"
    shutil.copytree(runs / "sema-seed0", lr)
    cfg = yaml.safe_load((lr / "config.yaml").read_text())
    cfg["strategy"]["lr"] = 0.5
    cfg["backbone"]["name"] = "other"
    (lr / "config.yaml").write_text(yaml.safe_dump(cfg))
    labels = sorted(g.label for g in group_runs(load_runs([runs / "sema-seed0", lr])))
    assert labels == ["backbone=other, strategy.lr=0.5", "backbone=vit_tiny_test, strategy.lr=0.001"]


def test_the_runs_column_counts_runs_and_names_their_seeds(runs, tmp_path):
    page = write_report([runs], tmp_path / "r.html").read_text()
    table = page[page.index('id="table-groups"') : page.index("</table>", page.index('id="table-groups"'))]
    assert ">runs (seeds)<" in table and ">seeds<" not in table
    assert "2 (seeds 0, 1)" in table and "1 (seed 0)" in table


def test_adapter_layers_with_equal_pools_stay_visible(runs, tmp_path):
    from cl.report import figures

    group = next(g for g in group_runs(load_runs([runs])) if g.label == "sema")
    per_layer = group.runs[0].adapters_per_layer()
    assert len(per_layer) == 3 and len({tuple(v) for v in per_layer.values()}) == 1  # all three pools grow alike
    ax = figures.adapters_figure(group, 0).axes[0]
    by_colour: dict[tuple, list] = {}
    for bar in ax.patches:
        by_colour.setdefault(tuple(bar.get_facecolor()), []).append(bar)
    assert len(by_colour) == 3  # one colour per layer
    spans = sorted((b.get_x(), b.get_x() + b.get_width()) for bars in by_colour.values() for b in bars)
    assert all(a[1] <= b[0] + 1e-9 for a, b in itertools.pairwise(spans))  # no bar hides another
    assert 'id="chart-adapters-0"' in write_report([runs / "sema-seed0"], tmp_path / "a.html").read_text()


def test_a_layers_first_adapter_is_not_drawn_as_a_z_score(runs):
    from cl.report import figures

    group = next(g for g in group_runs(load_runs([runs])) if g.label == "sema")
    checks = [c for r in group.runs for c in r.expansion_checks()]
    untested = [c for c in checks if c["min_z"] is None]
    assert untested and all(c["experience"] == 0 for c in untested)
    ax, strip = figures.expansion_figure(group, 0).axes  # the z-scores, and a strip of their own for the rest
    drawn = np.concatenate([c.get_offsets()[:, 1] for c in ax.collections])
    assert sorted(drawn.tolist()) == sorted(c["min_z"] for c in checks if c["min_z"] is not None)
    assert sum(len(line.get_xdata()) for line in strip.lines) == len(untested) and not strip.get_yticks().size
    assert "first adapter (no test)" in [t.get_text() for t in ax.get_legend().get_texts()]


class StopAt(Callback):
    def before_experience(self, agent, exp):
        if exp.id == 2:
            raise RuntimeError("stop")


@pytest.fixture(scope="module")
def partial(tmp_path_factory):
    """A run stopped after 2 of 5 experiences."""
    root = tmp_path_factory.mktemp("partial")
    cfg = sema_config(root, **FIVE)
    with pytest.raises(RuntimeError, match="stop"):
        run(cfg, extra_callbacks=[StopAt()])
    return Path(cfg["out"])


def test_run_in_progress_is_reported_as_such(partial, tmp_path):
    with open(partial / ".lock", "w") as lock:  # as a live `cl run` holds it
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        data = load_run(partial)
        page = write_report([partial], tmp_path / "r.html").read_text()
    assert data.status == "running" and data.experiences_done == 2
    assert "in progress: 2 of 5 experiences done" in page
    assert 'id="chart-heatmap-0"' in page


def test_interrupted_run_renders_what_exists(partial, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(partial, copy)
    (copy / "metrics.json").unlink()  # as if killed before the first metrics.json: events still have the evals
    with open(copy / "events.jsonl", "a") as f:
        f.write('{"t": 1, "experience": 2, "kind": "expans')  # a half-written last line
    data = load_run(copy)
    assert data.status == "incomplete" and len(data.accuracy_matrix) == 2
    page = write_report([copy], tmp_path / "r.html").read_text()
    assert "in progress or interrupted: 2 of 5" in page and "cl run --resume" in page
    assert 'id="chart-accuracy-seen"' in page


def test_route_and_retrieval_events_are_drawn(runs, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(runs / "sema-seed0", copy)
    with open(copy / "events.jsonl", "a") as f:
        for i in range(5):
            f.write(json.dumps({"t": 0, "experience": i, "kind": "route", "layer": 1,
                                "usage": {f"e{j}": 1.0 for j in range(i + 1)}}) + "\n")
            f.write(json.dumps({"t": 0, "experience": i, "kind": "retrieval", "hits": 8 - i, "queries": 10}) + "\n")
    data = load_run(copy)
    assert data.route_usage()[2] == pytest.approx({"e0": 1 / 3, "e1": 1 / 3, "e2": 1 / 3})
    assert data.retrieval_hit_rate()[4] == pytest.approx(0.4)
    page = write_report([copy], tmp_path / "r.html").read_text()
    assert 'id="chart-routes-0-0"' in page and 'id="chart-retrieval"' in page


def test_cl_run_writes_the_report_and_prints_its_path(tmp_path, capsys):
    cfg = tiny_config(tmp_path, "simplecil")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path)]) == 0
    assert f"report: {tmp_path / 'run' / 'report.html'}" in capsys.readouterr().out.replace("\n", "")
    page = (tmp_path / "run" / "report.html").read_text()
    assert "<td>finished</td>" in page and "in progress" not in page  # the last write saw the run finished
    cfg["out"] = str(tmp_path / "quiet")
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path), "--no-report"]) == 0
    assert not (tmp_path / "quiet" / "report.html").exists()


def test_long_runs_refresh_the_report_as_they_go(tmp_path, monkeypatch):
    import cl.callbacks.report

    monkeypatch.setattr(cl.callbacks.report, "OVERHEAD", float("inf"))  # as if every experience were long
    seen = {}

    class Probe(Callback):  # runs after the report logger
        def after_experience(self, agent, exp):
            seen[exp.id] = (tmp_path / "run" / "report.html").read_text()

    run(tiny_config(tmp_path, "simplecil"), report=True, extra_callbacks=[Probe()])
    assert "in progress: 2 of 3 experiences done" in seen[1]
    assert "in progress" not in (tmp_path / "run" / "report.html").read_text()


def test_cl_report_command(runs, tmp_path, capsys):
    out = tmp_path / "sub" / "all.html"
    assert main(["report", str(runs / "sema-seed0"), str(runs / "simplecil"), "--out", str(out)]) == 0
    assert f"report (2 runs): {out}" in capsys.readouterr().out.replace("\n", "")
    assert "2 runs in 2 configs" in out.read_text()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p, "is not a run directory (no config.yaml) and holds no runs"),
        (lambda p: p / "missing", "does not exist"),
        (lambda p: (p / "file.txt").write_text("x") and p / "file.txt", "is not a run directory"),
    ],
)
def test_bad_input_exits_2(tmp_path, capsys, make, message):
    assert main(["report", str(make(tmp_path)), "--out", str(tmp_path / "r.html")]) == 2
    assert message in capsys.readouterr().err.replace("\n", " ")
    assert not (tmp_path / "r.html").exists()


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def headless(*args: str) -> subprocess.CompletedProcess:
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
           "--enable-logging=stderr", "--v=0", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(chromium() is None and not os.environ.get("CI"),
                    reason="Chromium is not installed (`make test` installs the Debian package `chromium`)")
def test_chromium_renders_the_report_without_js_errors(runs, tmp_path):
    assert chromium(), "Chromium is required in CI: apt-get install chromium (make browser)"
    report = write_report([runs / "sema-seed0"], tmp_path / "report.html")
    assert report.stat().st_size < 5 * 2**20  # 5 experiences
    url = report.as_uri()
    dom = headless("--dump-dom", url)
    assert dom.returncode == 0, dom.stderr
    html = dom.stdout
    assert 'data-ready="1"' in html  # the page script ran to its end
    errors = re.search(r'<pre id="js-errors"([^>]*)>(.*?)</pre>', html, re.S)
    assert errors and "hidden" in errors.group(1) and errors.group(2) == "", errors and errors.group(2)
    assert "Uncaught" not in dom.stderr and "CONSOLE" not in dom.stderr, dom.stderr
    for chart in ('id="chart-heatmap-0" data-chart="heatmap"><svg', 'id="chart-accuracy-seen" data-chart="curves"><svg',
                  'id="chart-expansions-0" data-chart="expansion-timeline"><svg'):
        assert chart in html, chart
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report.png"
    done = headless("--window-size=1280,2400", f"--screenshot={shot}", url)
    assert done.returncode == 0 and shot.stat().st_size > 10_000, done.stderr
    # the error recorder works: a page that throws shows it in the DOM
    broken = tmp_path / "broken.html"
    broken.write_text(report.read_text().replace("</body>", "<script>throw new Error('boom')</script></body>"))
    thrown = headless("--dump-dom", broken.as_uri())
    assert "Uncaught Error: boom" in thrown.stdout and "Uncaught Error: boom" in thrown.stderr
