"""``python -m benchmarks.fill --quick`` runs every setting and compares their states (smoke-run figures mean
nothing)."""

from __future__ import annotations

import json

from benchmarks.fill import main


def test_quick_fill_benchmark_reports_every_setting(tmp_path, restore_threads):
    out = tmp_path / "fill.json"
    main(["--quick", "--threads", "2", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["batch"], r["workers"]) for r in rows] == [(32, 1), (64, 1), (128, 1), (256, 1), (64, 2), (32, 2)]
    assert all(r["median s"] > 0 for r in rows)
    threaded = [r for r in rows if r["workers"] == 2]
    assert all(r["torch threads per batch"] == 1 for r in threaded)
